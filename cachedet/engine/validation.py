"""Validation during training: the same evaluator as ``cachedet eval``, and checkpoints/best.pt.

``ValidationSet`` loads the validation annotations, their scoring ground truth and (for
``val.cache``) the store once, before the first step, so a wrong file fails the run before any
training. ``EvalHook`` then runs every ``val.every`` epochs (and after the last one) on the main
process (DDP ranks wait at the trainer's barrier): it predicts with the detector in memory
(``Predictor.from_model``), scores with ``DetectionEvaluator``, writes a metrics.jsonl line
``{"step", "epoch", "val": {"bbox": {AP, AP50, ...}, "segm": {...}, "num_detections", "seconds"}}``,
prints one console line, and writes checkpoints/best.pt (atomically, the format of last.pt) when
``val.best_metric`` improves. The best so far travels in every checkpoint's ``best`` entry, so a
resumed run keeps comparing against it.
"""

from __future__ import annotations

import time

import torch

from cachedet.engine.config import ValConfig
from cachedet.engine.trainer import Hook, Trainer
from cachedet.runs.record import RunRecord, save_run_checkpoint

SUMMARY_PARTS = ("bbox", "segm", "lvis_bbox", "lvis_segm")


class ValidationSet:
    """The validation images (or store) and their ground truth, read once (``EvalSet``, as eval does).

    categories: the run's [{id, name}] in label order (the validation file must have the same ids
    and names); masks: the detector predicts masks (scored as segm when the file has segmentations).
    Raises CachedetError naming val.annotations / val.images / val.cache when they cannot be used.
    """

    def __init__(self, cfg: ValConfig, categories: list[dict], masks: bool, batch_size: int = 8):
        from cachedet.evaluation.evalset import EvalSet

        self.cfg, self.batch_size = cfg, batch_size
        self.set = EvalSet(cfg.annotations, cfg.images, cfg.cache, prefix="val.")
        self.evaluator = self.set.evaluator({c["id"]: c["name"] for c in categories}, masks)
        self.num_images = self.set.num_images

    def check(self, predictor) -> None:
        """Refuse a store that does not fit the detector, before training."""
        self.set.check(predictor)

    def evaluate(self, predictor) -> dict:
        """Predict and score the whole set; the DetectionEvaluator's metrics."""
        return self.set.score(predictor, self.evaluator, self.batch_size)


def metric_of(val: dict, name: str) -> float | None:
    """The value ``name`` ("bbox.AP") picks from a validation line's ``val`` (None: not scored)."""
    part, _, stat = name.partition(".")
    return (val.get(part) or {}).get(stat)


def val_line(val: dict) -> str:
    """One console line: box (and mask) AP, AP50, AP75."""
    parts = []
    for name, label in (("bbox", "box"), ("segm", "mask")):
        if name in val:
            parts.append(
                label
                + " "
                + " ".join(
                    f"{k} {'-' if val[name][k] is None else format(val[name][k], '.1f')}"
                    for k in ("AP", "AP50", "AP75")
                )
            )
    return " | ".join(parts)


class EvalHook(Hook):
    """Validates every ``period`` epochs and after the last; keeps ``best_path`` (see module docstring).

    predictor: a ``Predictor.from_model`` on the trained detector; metrics: the run's ``MetricsHook``
    (lines and console); checkpoint: the run's ``CheckpointHook`` (what a checkpoint holds).
    Other hooks hear of each result through ``after_eval(trainer, line)``.
    """

    def __init__(
        self,
        validation: ValidationSet,
        predictor,
        period: int,
        best_metric: str,
        best_path: str,
        record: RunRecord,
        metrics,
        checkpoint,
    ):
        self.validation, self.predictor, self.period = validation, predictor, period
        self.best_metric, self.best_path, self.record = best_metric, best_path, record
        self.metrics, self.checkpoint = metrics, checkpoint

    def before_train(self, trainer: Trainer) -> None:
        best = trainer.state.extra.get("best")
        if (
            best is not None and best.get("metric") != self.best_metric
        ):  # a new metric starts a new best
            trainer.state.extra["best"] = None

    def after_epoch(self, trainer: Trainer) -> None:
        epoch = trainer.state.epoch + 1
        if epoch % self.period and epoch != trainer.loop.epochs:
            return
        line = {
            "step": trainer.state.step,
            "epoch": epoch,
            "val": self.evaluate(trainer),
        }
        self.metrics.write(line)
        value, best = metric_of(line["val"], self.best_metric), trainer.state.extra.get("best")
        improved = value is not None and (best is None or value > best["value"])
        if improved:
            best = {
                "metric": self.best_metric,
                "value": value,
                "step": trainer.state.step,
                "epoch": epoch,
            }
            trainer.state.extra["best"] = best
            save_run_checkpoint(
                self.best_path,
                self.record,
                epoch,
                trainer.state.step,
                self.checkpoint.state(trainer),
                best=best,
            )
        note = (
            f"new best {self.best_metric}"
            if improved
            else f"best {self.best_metric} {best['value']:.1f} at step {best['step']}"
            if best
            else ""
        )
        self.metrics.log(
            f"val epoch {epoch} step {trainer.state.step}: {val_line(line['val'])}"
            + (f"  ({note})" if note else "")
        )
        for hook in trainer.hooks:
            hook.after_eval(trainer, line)

    def evaluate(self, trainer: Trainer) -> dict:
        t0 = time.perf_counter()
        modules = [m for m in (self.predictor.detector, self.predictor.backbone) if m is not None]
        modes = [m.training for m in modules]
        with torch.random.fork_rng(devices=[]):  # validation draws nothing from the training stream
            for m in modules:
                m.eval()
            try:
                scores = self.validation.evaluate(self.predictor)
            finally:
                for m, mode in zip(modules, modes):
                    m.train(mode)
        val = {k: scores[k] for k in SUMMARY_PARTS if k in scores}
        self.per_class = scores["per_class"]  # the last pass's, for the table when training ends
        return {
            **val,
            "num_detections": scores["num_detections"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
