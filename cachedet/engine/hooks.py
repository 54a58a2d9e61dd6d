"""The hooks every train-heads run uses: metric lines with a progress bar, and checkpoints.

See ``cachedet.engine.trainer`` for when hooks run. Both run on the main process only.
"""

from __future__ import annotations

import json

import torch

from cachedet.core.atomic import write_error
from cachedet.engine.trainer import Hook, Trainer
from cachedet.runs.record import RunRecord, save_run_checkpoint


class MetricsHook(Hook):
    """Appends each metrics line (one per ``log_every`` steps) to metrics.jsonl, flushed per line,
    and advances a progress bar by the steps it covers."""

    def __init__(self, path: str, steps: int, epochs: int, progress: bool = True):
        self.path, self.steps, self.epochs, self.progress = path, steps, epochs, progress
        self._file = self._bar = None
        self._step = 0  # the step of the last line written

    def before_train(self, trainer: Trainer) -> None:
        from cachedet.core.progress import ViewProgress

        self._step = trainer.state.step
        try:
            self._file = open(self.path, "a")
        except OSError as e:
            raise write_error(e, self.path) from None
        self._bar = ViewProgress(
            "train-heads", self.steps, unit="steps", enabled=self.progress
        ).__enter__()

    def write(self, record: dict) -> None:
        """One line of metrics.jsonl (other hooks log validation results through this too)."""
        line = json.dumps(record) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as e:
            raise write_error(e, self.path, len(line)) from None

    def log(self, text: str) -> None:
        """A console line, printed above the progress bar when there is one."""
        progress = getattr(self._bar, "_progress", None)
        if progress is not None:
            progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def after_step(self, trainer: Trainer, record: dict) -> None:
        self.write(record)
        self._bar.advance(
            record["step"] - self._step,
            status=f"epoch {record['epoch']}/{self.epochs} loss {record['loss']:.3f} "
            f"lr {record['lr']:.2g}",
        )
        self._step = record["step"]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None


class CheckpointHook(Hook):
    """Writes checkpoints/last.pt (atomically) after every epoch: weights, optimiser, scheduler, record,
    and the best validation result so far (``trainer.state.extra["best"]``, set by the EvalHook)."""

    def __init__(self, path: str, record: RunRecord):
        self.path, self.record = path, record

    def state(self, trainer: Trainer) -> dict:
        model = trainer.model
        backbone = model.backbone
        keep_backbone = backbone is not None and (backbone.trainable or backbone.has_adapters)
        projection = getattr(trainer.source, "projection", None)
        state = {
            "detector": model.detector.state_dict(),
            "backbone": backbone.state_dict() if keep_backbone else None,
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
        }
        if projection is not None:  # the map from images to the features the heads fit
            state["projection"] = projection.state()
        return state

    def after_epoch(self, trainer: Trainer) -> None:
        save_run_checkpoint(
            self.path,
            self.record,
            trainer.state.epoch + 1,  # the epoch just finished, counted from 1
            trainer.state.step,
            self.state(trainer),
            best=trainer.state.extra.get("best"),
        )

    def at_checkpoint_step(self, trainer: Trainer) -> None:
        """Mid-epoch (``--checkpoint-every``): epochs finished, steps into the next one, and torch's
        generator, so that a resume takes the next batch with the same random draws."""
        save_run_checkpoint(
            self.path,
            self.record,
            trainer.state.epoch,
            trainer.state.step,
            self.state(trainer),
            best=trainer.state.extra.get("best"),
            epoch_step=trainer.state.epoch_step,
            rng=torch.get_rng_state(),
        )
