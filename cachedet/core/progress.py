"""Progress bars for long work (rich): items done, rate, and time left."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s")


class ViewProgress:
    """A context manager with ``advance(n)``; silent when ``enabled`` is False."""

    def __init__(self, label: str, total: int, unit: str = "views", enabled: bool = True):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self._progress = None

    def __enter__(self) -> "ViewProgress":
        if self.enabled and self.total:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _RateColumn(self.unit),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, status="")
        return self

    def advance(self, n: int = 1, status: str | None = None):
        if self._progress is not None:
            kwargs = {"status": status} if status is not None else {}
            self._progress.update(self._task, advance=n, **kwargs)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False
