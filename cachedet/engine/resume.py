"""What may change when a run is resumed, and how the schedule continues.

A run resumed with other settings than it was trained with would either crash in
``load_state_dict`` or silently train something else. ``resume_changes`` compares every setting
given with ``--resume`` with the checkpoint's:

- ``RESUMABLE`` settings may change: the schedule's length (``epochs``), the optimiser's ``lr``,
  ``weight_decay`` and ``clip_grad``, and where and how the run executes (``device``, ``workers``,
  ``loader_start``, ``prefetch_factor``, ``persistent_workers``, ``log_every``, ``amp``) and the
  validation settings (a changed ``best_metric`` starts a new
  best). They are applied from the first resumed step and recorded.
- Locations (``out``, ``cache``, ``annotations``, ``images``) are not compared: the data's identity
  is checked by its fingerprint instead.
- Everything else shapes the model, the data or the schedule's form; a difference is refused in
  one message that lists each setting with the run's value and the given one.

Schedule rule: the remaining steps follow the learning-rate curve that a fresh run of the new
length (and base ``lr``) would have at those steps; steps already taken are not redone.
"""

from __future__ import annotations

import json

import torch

from cachedet.core.errors import CachedetError
from cachedet.engine.config import PATH_OF

RESUMABLE = (
    "epochs",
    "lr",
    "weight_decay",
    "clip_grad",
    "device",
    "workers",
    "loader_start",
    "prefetch_factor",
    "persistent_workers",
    "log_every",
    "checkpoint_every",
    "allow_incomplete",
    "verify_reads",
    "reader",
    "amp",
    "val_annotations",
    "val_images",
    "val_cache",
    "eval_every",
    "best_metric",
)
LOCATIONS = ("out", "cache", "annotations", "images", "resume")


def flag(name: str) -> str:
    """The field path of a flat setting name (``epochs`` -> ``optim.epochs``); the CLI shows its option."""
    return PATH_OF[name]


def _plain(value):
    return json.loads(json.dumps(value))  # tuples and lists, as JSON and checkpoints keep them


def resolved_settings(cfg, canvas: int | None = None) -> dict:
    """``cfg.flat()`` with the values a run uses in place of "default": ``lr`` as
    ``cfg.learning_rate`` and, for a cache run, ``size`` as the store's ``canvas`` (when given).
    config.json and checkpoints record this."""
    flat = {**cfg.flat(), "lr": cfg.learning_rate}
    if canvas is not None and not cfg.source.online:
        flat["size"] = int(canvas)
    return flat


def resume_changes(saved: dict, cfg) -> dict[str, list]:
    """{field: [run's value, given value]} for the ``RESUMABLE`` settings that differ.

    ``saved`` is the checkpoint's config dict (nested, or cachedet 0.1's flat one), ``cfg`` the
    TrainConfig given now; keys of the result are flat setting names. Raises CachedetError listing
    every other setting that differs, by field path.
    """
    saved = resolved_settings(
        type(cfg).from_dict({**saved, "out": cfg.out}, where="TrainConfig.resume")
    )
    fixed, changed = [], {}
    for key, value in resolved_settings(cfg).items():
        if key in LOCATIONS or (key == "size" and not cfg.source.online):
            continue  # a cache run's canvas is its store's, checked by the fingerprint
        old, new = _plain(saved[key]), _plain(value)
        if old == new:
            continue
        if key in RESUMABLE:
            changed[key] = [old, new]
        else:
            fixed.append(f"{flag(key)}: run {old!r}, given {new!r}")
    if fixed:
        raise CachedetError(
            f"TrainConfig.resume: {cfg.out} was trained with other settings than given "
            f"({'; '.join(fixed)}); resume with the run's values (TrainConfig.of_run reads them) "
            f"or start another TrainConfig.out. These may change on resume: "
            f"{', '.join(flag(k) for k in RESUMABLE)}"
        )
    return changed


def continue_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler,
    base_lr: float,
    weight_decay: float,
    factor,
    step: int,
) -> None:
    """After loading the optimiser and scheduler states: make the next step use the curve ``factor``
    (the new run length) scaled by ``base_lr``, as a fresh run would at ``step``."""
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(step)
        group["weight_decay"] = weight_decay
    scheduler.base_lrs = [base_lr] * len(optimizer.param_groups)
