"""The progress line fits 80 columns without cutting a part, and its rate and time left keep a
value through a validation pause."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from cachedet.core import progress as progress_module
from cachedet.core.progress import ViewProgress

STATUS = "epoch 3/10 loss 1.234 lr 0.005"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _line(bar: ViewProgress, width: int) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    console.print(bar._progress.make_tasks_table(bar._progress.tasks))
    return out.getvalue().rstrip("\n")


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=fake), raising=False)
    return fake


def _steps(bar, clock, n, seconds=0.5):
    for _ in range(n):
        clock.now += seconds
        bar.advance(1, status=STATUS)


@pytest.mark.parametrize("width", [80, 60, 120])
def test_line_fits_without_cuts(clock, width):
    quiet = Console(file=io.StringIO(), width=width)
    with ViewProgress("train-heads", 2000, unit="steps", console=quiet) as bar:
        _steps(bar, clock, 200)
        line = _line(bar, width)
    assert "\n" not in line and len(line) <= width, line
    assert "…" not in line and "200/2000" in line and "ETA 0:15:00" in line, line
    if width >= 80:
        assert "2 steps/s" in line and STATUS in line, line
    if width >= 120:
        assert "━" in line, line  # room for the bar too


def test_rate_and_eta_survive_a_validation_pause(clock):
    quiet = Console(file=io.StringIO(), width=80)
    with ViewProgress("train-heads", 2000, unit="steps", console=quiet) as bar:
        _steps(bar, clock, 50)
        clock.now += 120  # a validation pass, then training goes on at the same pace
        for k in range(3):
            _steps(bar, clock, 1)
            line = _line(bar, 80)
            assert "2 steps/s" in line and "ETA 0:16:" in line, (k, line)
        clock.now += 30  # the work itself gets slower: the estimate follows after two steps
        _steps(bar, clock, 2, seconds=30)
        assert "0.0333 steps/s" in _line(bar, 80)


def test_a_slow_first_advance_counts_only_until_the_next():
    rate = progress_module.RecentRate()
    rate.start(0.0)
    rate.add(1, 30.0)  # workers starting, kernels chosen
    assert rate.per_second() == pytest.approx(1 / 30)
    for k in range(1, 4):
        rate.add(1, 30.0 + 0.5 * k)
    assert rate.per_second() == pytest.approx(2.0)
