"""``EvalConfig``: what ``cachedet eval`` and ``cachedet.evaluate`` score, checked in one place."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from cachedet.core.errors import CachedetError, check_number
from cachedet.core.paths import resolve_path
from cachedet.evaluation.scoring import DEFAULT_COUNT_BINS, coco_api

CHECKPOINTS = ("last", "best")


@dataclass(frozen=True)
class EvalConfig:
    """Score the run ``run`` on a COCO/LVIS validation file.

    - ``annotations``: the validation file; ``images`` its image folder, or ``cache`` a ``--no-augment
      --views 1`` store extracted from it (exactly one of the two).
    - ``train_annotations``: the training file, for AP by training count (bins' upper edges
      ``count_bins``, increasing positive integers).
    - ``out``: metrics JSON to write (detections, AP chart and PR curves beside it); None writes nothing.
    - ``checkpoint``: ``last`` or ``best``; ``device``: ``auto``, ``cpu``, ``cuda[:N]``, ``mps``;
      ``batch_size``: images per forward pass.
    - ``score_threshold`` (in [0, 1]) and ``max_detections`` (per image, >= 1) set the detector's
      post-processing; None takes each protocol's: COCO the trained 0.05 floor and 100, LVIS no
      floor and 300.
    - ``backend``: the COCO scorer, ``pycocotools`` (the reference, default) or ``faster-coco-eval``
      (``pip install faster-coco-eval``; tested to give pycocotools' numbers). LVIS files are
      scored by the lvis package's LVISEval either way.

    ``validate()`` raises CachedetError naming the field (``EvalConfig.batch_size: ...``).
    """

    run: str
    annotations: str
    images: str | None = None
    cache: str | None = None
    train_annotations: str | None = None
    out: str | None = None
    checkpoint: str = "last"
    count_bins: tuple[int, ...] = DEFAULT_COUNT_BINS
    device: str = "auto"
    batch_size: int = 8
    score_threshold: float | None = None
    max_detections: int | None = None
    backend: str = "pycocotools"

    def __post_init__(self):
        for name in ("run", "annotations", "images", "cache", "train_annotations", "out"):
            object.__setattr__(self, name, resolve_path(getattr(self, name)))
        object.__setattr__(self, "count_bins", tuple(self.count_bins))

    @classmethod
    def of(cls, **settings) -> EvalConfig:
        """An EvalConfig from keyword settings, refusing unknown names in one line."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise CachedetError(
                f"EvalConfig has no setting {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**settings)

    def with_settings(self, **settings) -> EvalConfig:
        return replace(self, **settings)

    def validate(self) -> EvalConfig:
        if self.checkpoint not in CHECKPOINTS:
            raise CachedetError(
                f"EvalConfig.checkpoint {self.checkpoint!r}: expected {' or '.join(CHECKPOINTS)}"
            )
        check_number("EvalConfig.batch_size", self.batch_size, integer=True, low=1)
        check_number(
            "EvalConfig.score_threshold", self.score_threshold, low=0, high=1, optional=True
        )
        check_number(
            "EvalConfig.max_detections", self.max_detections, integer=True, low=1, optional=True
        )
        coco_api(self.backend, "EvalConfig.backend")  # unknown or not installed: refused here
        bins = self.count_bins
        if (
            not bins
            or list(bins) != sorted(set(bins))
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bins)
        ):
            raise CachedetError(
                f"EvalConfig.count_bins {','.join(map(str, bins))}: expected increasing positive "
                "integers, e.g. 10,100,1000"
            )
        if self.images is None and self.cache is None:
            raise CachedetError(
                "EvalConfig.images: eval needs the validation images or EvalConfig.cache "
                "(a --no-augment --views 1 store of them)"
            )
        return self
