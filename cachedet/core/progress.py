"""Progress bars for long work (rich): items done, rate, and time left.

The line fits the terminal: when it is narrow (80 columns), the parts that matter least (the bar,
then the elapsed time, the status, the rate) are left out whole rather than cut ("200/…").
The rate and the time left come from the recent advances with pauses left out (a validation pass
between two training steps), so they keep a value through and after a pause.
"""

from __future__ import annotations

import time
from collections import deque

from rich.console import Console
from rich.progress import BarColumn, Progress, Task
from rich.table import Column, Table
from rich.text import Text


class RecentRate:
    """Items per second over the last ``window`` advances, without pauses.

    An advance that took more than ``pause_factor`` times the recent time per item (and over
    ``min_pause`` seconds) is a pause (validation, a checkpoint) and left out; a second such advance
    in a row is a real slow-down, and the estimate starts again from it. The first advance (warm-up)
    counts only until a second one arrives.
    """

    def __init__(self, window: int = 50, pause_factor: float = 5.0, min_pause: float = 1.0):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.pause_factor, self.min_pause = pause_factor, min_pause
        self.last: float | None = None
        self._paused = False
        self._warmup: tuple[int, float] | None = (
            None  # the first sample (workers starting, kernels chosen)
        )
        self._added = 0

    def start(self, now: float) -> None:
        self.last = now

    def add(self, n: int, now: float) -> None:
        """``n`` items were done by ``now`` (time.monotonic seconds)."""
        if self.last is None or n <= 0:
            self.last = now if self.last is None else self.last
            return
        dt, self.last = now - self.last, now
        per_item = self.per_item()
        pause = (
            per_item is not None and dt > self.min_pause and dt > self.pause_factor * per_item * n
        )
        if pause and not self._paused:
            self._paused = True
            return
        if pause:  # twice in a row: the work itself got slower
            self.samples.clear()
        self._paused = False
        if self._warmup is not None and self._warmup in self.samples:
            self.samples.remove(self._warmup)  # the first advance counts only until a second
        self._warmup = (n, dt) if self._added == 0 else None
        self._added += 1
        self.samples.append((n, dt))

    def per_item(self) -> float | None:
        seconds = sum(dt for _, dt in self.samples)
        items = sum(n for n, _ in self.samples)
        return seconds / items if items and seconds > 0 else None

    def per_second(self) -> float | None:
        per = self.per_item()
        return 1.0 / per if per else None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


class _FittedProgress(Progress):
    """A ``Progress`` whose one line fits the console: text parts are kept whole in priority order
    and the bar takes what width is left (at most 40 columns, left out below 10)."""

    PRIORITY = ("label", "count", "eta", "rate", "status", "elapsed")

    def __init__(self, parts, **kwargs):
        self.parts = parts  # {name: callable(task) -> str}, in display order, "bar" among them
        super().__init__(**kwargs)

    def make_tasks_table(self, tasks) -> Table:
        tasks = [t for t in tasks if t.visible]
        if not tasks:  # also while Progress is being built (before its console exists)
            return Table.grid()
        texts = {n: [f(t) for t in tasks] for n, f in self.parts.items() if n != "bar"}
        widths = {n: max((Text(v).cell_len for v in vs), default=0) for n, vs in texts.items()}
        room, keep = self.console.width, set()
        for name in self.PRIORITY:
            need = widths[name] + (1 if keep else 0)
            if widths[name] and need <= room:
                keep.add(name)
                room -= need
        bar = min(40, room - 1)
        if bar >= 10:
            keep.add("bar")
        names = [n for n in self.parts if n in keep]
        table = Table.grid(*(Column(no_wrap=True) for _ in names), padding=(0, 1))
        for i, task in enumerate(tasks):
            cells = [
                BarColumn(bar_width=bar)(task) if n == "bar" else Text(texts[n][i]) for n in names
            ]
            table.add_row(*cells)
        return table


class ViewProgress:
    """A context manager with ``advance(n, status)``; silent when ``enabled`` is False.

    ``console``: where to draw (default: rich's, sized by the terminal or ``COLUMNS``).
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "views",
        enabled: bool = True,
        console: Console | None = None,
    ):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.console = console
        self.rate = RecentRate()
        self._progress = None

    def _parts(self) -> dict:
        def rate(task: Task) -> str:
            speed = self.rate.per_second()
            if not speed:
                return f"- {self.unit}/s"
            return f"{speed:,.0f} {self.unit}/s" if speed >= 100 else f"{speed:.3g} {self.unit}/s"

        def eta(task: Task) -> str:
            if task.finished:
                return "done"
            speed = self.rate.per_second()
            return "ETA " + _clock((task.total - task.completed) / speed if speed else None)

        def elapsed(task: Task) -> str:
            return _clock(task.finished_time if task.finished else task.elapsed)

        return {
            "label": lambda task: task.description,
            "bar": None,
            "count": lambda task: f"{int(task.completed)}/{int(task.total)}",
            "rate": rate,
            "status": lambda task: task.fields.get("status", ""),
            "elapsed": elapsed,
            "eta": eta,
        }

    def __enter__(self) -> "ViewProgress":
        if self.enabled and self.total:
            self._progress = _FittedProgress(self._parts(), transient=False, console=self.console)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, status="")
            self.rate.start(time.monotonic())
        return self

    def advance(self, n: int = 1, status: str | None = None):
        if self._progress is not None:
            self.rate.add(n, time.monotonic())
            kwargs = {"status": status} if status is not None else {}
            self._progress.update(self._task, advance=n, **kwargs)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False
