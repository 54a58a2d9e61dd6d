"""Watching a run: TensorBoard event files and RUN/curves.png.

``TensorBoardHook`` writes RUN/tensorboard (``torch.utils.tensorboard.SummaryWriter``): every loss
term under ``loss/``, ``train/lr``, ``train/views_per_s`` and ``train/step_s`` per step, and each
validation summary under ``val/`` (``val/bbox.AP``...). tensorboard is optional: without it the run
warns once (``pip install tensorboard``) and goes on. ``CurvesHook`` redraws RUN/curves.png
(``cachedet.core.plots.plot_curves``) after each validation and at the end of the run; without
matplotlib it warns once. Both run on the main process only.
"""

from __future__ import annotations

import warnings

from cachedet.core.plots import NOT_LOSSES, matplotlib_available, plot_curves
from cachedet.engine.trainer import Hook, Trainer
from cachedet.engine.validation import SUMMARY_PARTS

TRAIN_SCALARS = {"lr": "train/lr", "views_per_s": "train/views_per_s", "step_s": "train/step_s"}


def summary_writer(logdir: str):
    """A SummaryWriter on ``logdir``, or None (with one warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(
            "tensorboard is not installed, so this run writes no TensorBoard files "
            "(pip install tensorboard); metrics.jsonl and curves.png are written anyway",
            stacklevel=2,
        )
        return None
    return SummaryWriter(logdir)


class TensorBoardHook(Hook):
    """Scalars of every step and every validation into ``logdir`` (see module docstring)."""

    def __init__(self, logdir: str):
        self.logdir, self.writer = logdir, None

    def before_train(self, trainer: Trainer) -> None:
        self.writer = summary_writer(self.logdir)

    def after_step(self, trainer: Trainer, record: dict) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key in TRAIN_SCALARS:
                self.writer.add_scalar(TRAIN_SCALARS[key], value, step)
            elif key not in NOT_LOSSES:
                self.writer.add_scalar(f"loss/{key}", value, step)

    def after_eval(self, trainer: Trainer, line: dict) -> None:
        if self.writer is None:
            return
        for part in SUMMARY_PARTS:
            for stat, value in (line["val"].get(part) or {}).items():
                if value is not None:
                    self.writer.add_scalar(f"val/{part}.{stat}", value, line["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class CurvesHook(Hook):
    """Redraws ``out`` (curves.png) from ``metrics_path`` after each validation and at the end."""

    def __init__(self, metrics_path: str, out: str):
        self.metrics_path, self.out = metrics_path, out
        self.enabled = matplotlib_available()
        if not self.enabled:
            warnings.warn(
                "matplotlib is not installed, so this run draws no curves.png (pip install matplotlib)",
                stacklevel=2,
            )

    def draw(self) -> None:
        if self.enabled:
            plot_curves(self.metrics_path, self.out)

    def after_eval(self, trainer: Trainer, line: dict) -> None:
        self.draw()

    def after_train(self, trainer: Trainer) -> None:
        self.draw()
