"""The meta-architecture: ``Detector(neck, head)`` only wires the parts it is given.

It never sees the backbone or the cache: ``forward(features, targets)`` returns the losses and
``predict(features)`` the detections, both in the view's canvas pixels. ``build_detector``
turns a ``DetectorConfig`` (the flat form that runs store) into typed neck and head configs and
builds the parts through the ``NECKS`` / ``HEADS`` maps of ``cachedet.models.build``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec, check_category_count
from cachedet.models.build import HEADS as HEAD_PARTS
from cachedet.models.build import (
    NECKS,
    OPTIONS,
    check_head,
    check_options,
    head_config,
    head_supports_masks,
    neck_config,
)
from cachedet.models.config import MASKS_NEED_ROIS
from cachedet.models.necks import resolve_neck

HEADS = tuple(HEAD_PARTS)
__all__ = [
    "HEADS",
    "MASKS_NEED_ROIS",
    "OPTIONS",
    "DetectorConfig",
    "Detector",
    "build_detector",
    "check_head",
    "head_supports_masks",
]


@dataclass(frozen=True)
class DetectorConfig:
    num_classes: int
    canvas: int
    in_specs: tuple[FeatureSpec, ...]
    neck: str = "fpn"
    head: str = "faster-rcnn"
    neck_channels: int = 256
    # Flat options, typed by cachedet.models.config (defaults there): box_representation,
    # rois_per_image, proposals_per_image, box_convs, box_fcs, cascade_ious, nasfpn_repeats,
    # mask_convs, mask_channels. Options of another head or neck are ignored.
    options: dict = field(default_factory=dict)
    masks: bool = False  # Mask R-CNN mask branch (faster-rcnn and cascade heads)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["in_specs"] = [s.to_dict() for s in self.in_specs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorConfig":
        d = dict(d)
        d["in_specs"] = tuple(FeatureSpec.from_dict(s) for s in d["in_specs"])
        return cls(**d)


class Detector(nn.Module):
    """features {c3: (B, C, H/8, W/8), ...} -> losses (``forward``) or detections (``predict``).

    ``neck``: features -> OrderedDict{p3: (B, channels, H/8, W/8), ...}, with ``out_specs``.
    ``head``: ``head(pyramid, image_sizes, targets=None) -> (outputs, losses)`` with
    ``loss_names`` (the terms that sum to the training loss) and ``logged_names`` (terms that are
    only logged, such as the cascade's per-stage ``stage{t}/loss_cls``). ``canvas``: the square
    view size assumed when ``image_sizes`` is not given.
    """

    def __init__(self, neck: nn.Module, head: nn.Module, canvas: int | None = None):
        super().__init__()
        self.neck, self.head, self.canvas = neck, head, canvas
        self.last_logged: dict[str, torch.Tensor] = {}

    def _sizes(self, features, image_sizes):
        if image_sizes:
            return image_sizes
        if self.canvas is None:
            raise ValueError("Detector built without a canvas: pass image_sizes")
        n = next(iter(features.values())).shape[0]
        return [(self.canvas, self.canvas)] * n

    def forward(
        self,
        features: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        image_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses keyed by ``loss_names``, whose sum is the training loss. Alias: ``loss``.

        targets: per view dict(boxes float (N, 4) xyxy canvas pixels, labels int64 (N,) in
        0..C-1, and with masks, masks uint8 (N, H, W)). The head's logged-only terms of this call
        (``logged_names``) are kept, detached, in ``last_logged``, for the trainer to record.
        """
        _, losses = self.head(self.neck(features), self._sizes(features, image_sizes), targets)
        self.last_logged = {k: v.detach() for k, v in losses.items() if k not in self.loss_names}
        return {k: losses[k] for k in self.loss_names}

    @property
    def loss_names(self) -> tuple[str, ...]:
        return self.head.loss_names

    @property
    def logged_names(self) -> tuple[str, ...]:
        return self.head.logged_names

    loss = forward

    @torch.no_grad()
    def predict(
        self, features: dict[str, torch.Tensor], image_sizes: list[tuple[int, int]] | None = None
    ):
        """Detections per view: dict(boxes (N, 4) xyxy canvas pixels, scores (N,), labels (N,) 0..C-1,
        and with masks: masks float (N, 1, 28, 28) probabilities inside each box)."""
        was_training = self.training
        self.eval()
        try:
            detections, _ = self.head(self.neck(features), self._sizes(features, image_sizes))
            return detections
        finally:
            self.train(was_training)


def build_detector(cfg: DetectorConfig) -> Detector:
    """The detector of ``cfg``: typed configs from its options, the neck with the extra levels the
    head declares, then the head on the neck's output specs. Raises CachedetError for unknown
    names or options, masks on RetinaNet, bad option values and unsuitable backbone levels."""
    if cfg.num_classes < 1:
        raise CachedetError(f"num_classes must be positive, got {cfg.num_classes}")
    check_category_count(cfg.num_classes, "DetectorConfig.num_classes")
    check_options(cfg.options)
    head_cfg = head_config(cfg.head, cfg.options, cfg.masks)
    neck_name = resolve_neck(cfg.neck, list(cfg.in_specs))
    neck_cfg = neck_config(neck_name, cfg.options, cfg.neck_channels)
    neck = NECKS[neck_name].build(neck_cfg, list(cfg.in_specs), head_cfg.extra_levels)
    head = HEAD_PARTS[cfg.head].build(head_cfg, neck.out_specs, cfg.num_classes)
    return Detector(neck, head, cfg.canvas)
