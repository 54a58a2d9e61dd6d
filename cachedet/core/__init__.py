"""Base utilities every stage uses: errors, structures, run-time settings, paths, atomic writes,
progress bars, plots and the named recipes. Imports nothing else of cachedet."""
