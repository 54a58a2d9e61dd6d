"""User-facing errors: one line that names the file, field or option at fault."""


class CachedetError(Exception):
    """An error caused by the user's input (a file, a field, an option), not by a bug.

    The command-line interface prints its message on one line and exits with status 2.
    """


class NonFiniteFeatures(CachedetError):
    """Backbone features that the store's dtype cannot hold (inf/NaN, or beyond float16's range)."""


class StoreDamaged(CachedetError):
    """A feature store file that cannot be read or decoded (a truncated or garbled ``zarr.json``,
    metadata or box chunk, feature shard or mask array): one line naming the store and the file or
    array, and what mends it (``--repair``, ``cachedet cache repair``, or a rebuild)."""


class WriteError(CachedetError):
    """A file could not be written (disk full, read-only folder, no permission): one line naming
    the path, the bytes it needed and the space its folder has; what was there before is intact.
    ``path``: the file; callers add the command that continues (``with_next_step``)."""

    def __init__(self, message: str, path: str):
        super().__init__(message)
        self.path = path

    def with_next_step(self, step: str) -> "WriteError":
        """The same error with ``step`` (what to run once space is freed) appended."""
        return WriteError(f"{self}; {step}", self.path)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with one line saying what was kept and how to go on (the CLI prints it and exits
    with status 130). A KeyboardInterrupt still, so callers that catch that see it unchanged."""


def check_number(
    field: str,
    value,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    optional: bool = False,
) -> None:
    """Raise CachedetError ``field: expected an integer >= 1, got -8`` unless ``value`` is a number
    of the right type (``integer``: an int, never a bool or 1.5; otherwise a finite int or float) in
    [``low``, ``high``] (``low_open``: ``low`` itself excluded). ``optional``: None passes."""
    import math
    import numbers

    if value is None and optional:
        return
    shown = lambda v: str(int(v)) if float(v).is_integer() else f"{v:g}"  # noqa: E731
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {shown(low)}")
    if high is not None:
        parts.append(f"<= {shown(high)}")
    want = f"{'an integer' if integer else 'a number'}{' ' + ' and '.join(parts) if parts else ''}"
    kind = numbers.Integral if integer else numbers.Real  # numpy's integers and floats too
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CachedetError(f"{field}: expected {want}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise CachedetError(f"{field}: expected {want}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise CachedetError(f"{field}: expected {want}, got {value!r}")
    if high is not None and value > high:
        raise CachedetError(f"{field}: expected {want}, got {value!r}")
