"""The meta-architecture: neck + head, built from the backbone's declared feature specs.

It never sees the backbone or the cache: ``forward(features, targets)`` returns the losses and
``predict(features)`` the detections, both in the view's canvas pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cachedet.errors import CachedetError
from cachedet.models.cascade import DEFAULT_IOUS, DEFAULT_WEIGHTS, CascadeRoIHeads
from cachedet.models.heads import LOSS_NAMES, MASK_LOSS, FasterRCNNHead, RetinaNetDetHead
from cachedet.models.masks import MaskBranch
from cachedet.models.necks import build_neck
from cachedet.structures import FeatureSpec

HEADS = ("faster-rcnn", "cascade", "retinanet")
MASKS_NEED_ROIS = "--masks: the retinanet head has no RoIs for a mask branch; use --head faster-rcnn or cascade"
OPTIONS = ("box_representation", "rois_per_image", "proposals_per_image", "box_convs", "box_fcs",
           "cascade_ious", "nasfpn_repeats", "mask_convs", "mask_channels")


@dataclass(frozen=True)
class DetectorConfig:
    num_classes: int
    canvas: int
    in_specs: tuple[FeatureSpec, ...]
    neck: str = "fpn"
    head: str = "faster-rcnn"
    neck_channels: int = 256
    # box_representation (FC width, 1024), rois_per_image (sampled in training, 512),
    # proposals_per_image (RPN output, 1000), box_convs / box_fcs (box head; faster-rcnn 4 / 1,
    # cascade 0 / 2 as in the paper's cascade configs), cascade_ious (0.5, 0.6, 0.7),
    # nasfpn_repeats (5), mask_convs / mask_channels (mask head: 4 convs of 256, as Mask R-CNN)
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
    """features {c3: (B, C, H/8, W/8), ...} -> losses (training) or detections (``predict``)."""

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.head not in HEADS:
            raise CachedetError(f"--head {cfg.head}: expected one of {', '.join(HEADS)}")
        unknown = set(cfg.options) - set(OPTIONS)
        if unknown:
            raise CachedetError(f"unknown detector option(s) {sorted(unknown)}; known: {', '.join(OPTIONS)}")
        opt = cfg.options
        extra = "p6p7" if cfg.head == "retinanet" else "maxpool"
        self.neck = build_neck(cfg.neck, list(cfg.in_specs), cfg.neck_channels, extra, int(opt.get("nasfpn_repeats", 5)))
        specs = self.neck.out_specs
        if cfg.head == "retinanet":
            if cfg.masks:
                raise CachedetError(MASKS_NEED_ROIS)
            self.head = RetinaNetDetHead(specs, cfg.num_classes)
            return
        roi_heads = None
        cascade = cfg.head == "cascade"
        convs = int(opt.get("box_convs", 0 if cascade else 4))
        fcs = int(opt.get("box_fcs", 2 if cascade else 1))
        fc_dim = int(opt.get("box_representation", 1024))
        rois = int(opt.get("rois_per_image", 512))
        if cascade:
            ious = tuple(float(v) for v in opt.get("cascade_ious", DEFAULT_IOUS))
            if not ious or any(not 0 < v < 1 for v in ious):
                raise CachedetError(f"--cascade-ious {list(ious)}: expected thresholds between 0 and 1")
            weights = tuple(DEFAULT_WEIGHTS[min(i, len(DEFAULT_WEIGHTS) - 1)] for i in range(len(ious)))
            roi_heads = CascadeRoIHeads([s.name for s in specs[:-1]], cfg.neck_channels, cfg.num_classes, ious, weights,
                                        convs=convs, fcs=fcs, fc_dim=fc_dim, rois_per_image=rois)
        self.head = FasterRCNNHead(
            specs, cfg.num_classes, roi_heads=roi_heads, representation=fc_dim, rois_per_image=rois,
            proposals_per_image=int(opt.get("proposals_per_image", 1000)), box_convs=convs, box_fcs=fcs,
        )
        if cfg.masks:  # built last, so the box parts start from the same weights with or without masks
            self.head.add_mask_branch(MaskBranch([s.name for s in specs[:-1]], cfg.neck_channels, cfg.num_classes,
                                                 convs=int(opt.get("mask_convs", 4)),
                                                 channels=int(opt.get("mask_channels", 256))))

    def _sizes(self, features, image_sizes):
        n = next(iter(features.values())).shape[0]
        return image_sizes or [(self.cfg.canvas, self.cfg.canvas)] * n

    def forward(self, features: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]],
                image_sizes: list[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Losses, keyed by ``loss_names``. Alias: ``loss``."""
        losses = self.head.loss(self.neck(features), targets, self._sizes(features, image_sizes))
        return {k: losses[k] for k in self.loss_names}

    @property
    def loss_names(self) -> tuple[str, ...]:
        return LOSS_NAMES + ((MASK_LOSS,) if self.cfg.masks else ())

    loss = forward

    @torch.no_grad()
    def predict(self, features: dict[str, torch.Tensor], image_sizes: list[tuple[int, int]] | None = None):
        """Detections per view: dict(boxes (N, 4) xyxy canvas pixels, scores (N,), labels (N,) 0..C-1,
        and with masks: masks float (N, 1, 28, 28) probabilities inside each box)."""
        was_training = self.training
        self.eval()
        try:
            return self.head.predict(self.neck(features), self._sizes(features, image_sizes))
        finally:
            self.train(was_training)


def build_detector(cfg: DetectorConfig) -> Detector:
    if cfg.num_classes < 1:
        raise CachedetError(f"num_classes must be positive, got {cfg.num_classes}")
    return Detector(cfg)
