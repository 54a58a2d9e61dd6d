"""User-facing errors: one line that names the file, field or option at fault."""


class CachedetError(Exception):
    """An error caused by the user's input (a file, a field, an option), not by a bug.

    The command-line interface prints its message on one line and exits with status 2.
    """
