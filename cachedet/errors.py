"""User-facing errors: one line that names the file, field or option at fault."""


class CachedetError(Exception):
    """An error caused by the user's input (a file, a field, an option), not by a bug.

    The command-line interface prints its message on one line and exits with status 2.
    """


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
