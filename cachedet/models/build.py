"""The one map from neck and head names to their typed configs and builders (``NECKS``, ``HEADS``).

``NECKS[name].build(cfg, in_specs, extra) -> neck`` with ``out_specs``; ``HEADS[name].build(cfg,
specs, num_classes) -> head``, ``specs`` being the neck's output ``FeatureSpec``s (all one width)
and ``num_classes`` the foreground classes. The neck is built with the extra levels the head's
config declares (``cfg.extra_levels``), never chosen by the head's name.

Parameters are created in the order that existing runs drew them (neck, then Faster R-CNN's RPN
before its box stage but the cascade's stages before its RPN, then the mask branch last), so a
seed gives the same initial weights as before the parts were composed here, with or without
masks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from torch import nn

from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec
from cachedet.models.cascade import DEFAULT_WEIGHTS, CascadeRoIHeads
from cachedet.models.config import (
    MASKS_NEED_ROIS,
    CascadeConfig,
    FasterRCNNConfig,
    FPNConfig,
    MaskConfig,
    NASFPNConfig,
    RetinaNetConfig,
    SimplePyramidConfig,
)
from cachedet.models.heads import BoxRoIHeads, Proposals, RCNNHead, RetinaNetDetHead
from cachedet.models.masks import MaskBranch
from cachedet.models.necks import build_fpn, build_nasfpn, build_simple_pyramid, resolve_neck


def roi_levels(specs: list[FeatureSpec]) -> list[str]:
    """RoIs are pooled from every level but the coarsest extra one, as in torchvision's FPN models."""
    return [s.name for s in specs[:-1]]


def build_mask_branch(
    cfg: FasterRCNNConfig, specs: list[FeatureSpec], num_classes: int
) -> MaskBranch | None:
    if cfg.mask is None:
        return None
    return MaskBranch(
        roi_levels(specs),
        specs[0].channels,
        num_classes,
        convs=cfg.mask.convs,
        channels=cfg.mask.channels,
    )


def build_faster_rcnn(
    cfg: FasterRCNNConfig, specs: list[FeatureSpec], num_classes: int
) -> nn.Module:
    """RPN + ``BoxRoIHeads`` (class-specific boxes) [+ mask branch]."""
    rpn = Proposals(specs, cfg.proposals_per_image)
    boxes = BoxRoIHeads(
        roi_levels(specs),
        specs[0].channels,
        num_classes,
        cfg.box_convs,
        cfg.box_fcs,
        cfg.box_representation,
        cfg.rois_per_image,
    )
    return RCNNHead(rpn, boxes, build_mask_branch(cfg, specs, num_classes))


def build_cascade(cfg: CascadeConfig, specs: list[FeatureSpec], num_classes: int) -> nn.Module:
    """RPN + ``CascadeRoIHeads`` (one stage per IoU threshold) [+ mask branch]."""
    weights = tuple(DEFAULT_WEIGHTS[min(i, len(DEFAULT_WEIGHTS) - 1)] for i in range(len(cfg.ious)))
    stages = CascadeRoIHeads(
        roi_levels(specs),
        specs[0].channels,
        num_classes,
        cfg.ious,
        weights,
        convs=cfg.box_convs,
        fcs=cfg.box_fcs,
        fc_dim=cfg.box_representation,
        rois_per_image=cfg.rois_per_image,
    )  # before the RPN: see the module docstring
    rpn = Proposals(specs, cfg.proposals_per_image)
    return RCNNHead(rpn, stages, build_mask_branch(cfg, specs, num_classes))


def build_retinanet(cfg: RetinaNetConfig, specs: list[FeatureSpec], num_classes: int) -> nn.Module:
    return RetinaNetDetHead(specs, num_classes)


class Part(NamedTuple):
    config: type
    build: Callable[..., nn.Module]


NECKS = {
    "fpn": Part(FPNConfig, build_fpn),
    "nasfpn": Part(NASFPNConfig, build_nasfpn),
    "simple": Part(SimplePyramidConfig, build_simple_pyramid),
}
HEADS = {
    "faster-rcnn": Part(FasterRCNNConfig, build_faster_rcnn),
    "cascade": Part(CascadeConfig, build_cascade),
    "retinanet": Part(RetinaNetConfig, build_retinanet),
}
CONFIGS = (*(p.config for p in NECKS.values()), *(p.config for p in HEADS.values()), MaskConfig)
OPTIONS = tuple(
    dict.fromkeys(option for c in CONFIGS for option in c.OPTIONS)
)  # DetectorConfig.options keys


def check_head(name: str, masks: bool = False) -> None:
    """The head's own constraints, for the train config and the CLI to check before any work:
    a known head name, and masks only on a head that has RoIs. Raises CachedetError."""
    if name not in HEADS:
        raise CachedetError(f"detector.head {name}: expected one of {', '.join(HEADS)}")
    if masks and not HEADS[name].config.supports_masks:
        raise CachedetError(MASKS_NEED_ROIS)


def head_supports_masks(name: str) -> bool:
    """Whether head ``name`` can carry a mask branch (R-CNN heads: yes; RetinaNet: no)."""
    check_head(name)
    return HEADS[name].config.supports_masks


def check_options(options: dict) -> None:
    """Unknown option names are a CachedetError that lists the known ones."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise CachedetError(
            f"unknown detector option(s) {sorted(unknown)}; known: {', '.join(OPTIONS)}"
        )


def head_config(name: str, options: dict, masks: bool = False):
    """The typed config of head ``name`` from the flat ``options`` (others ignored), with a
    ``MaskConfig`` when ``masks``. Raises CachedetError for an unknown head or masks on RetinaNet."""
    check_head(name, masks)
    extra = {"mask": MaskConfig.from_options(options)} if masks else {}
    return HEADS[name].config.from_options(options, **extra)


def neck_config(name: str, options: dict, channels: int):
    """The typed config of neck ``name`` ("fpn", "nasfpn" or "simple"; "auto" resolved before)."""
    if name not in NECKS:
        raise CachedetError(f"detector.neck {name}: expected one of auto, {', '.join(NECKS)}")
    return NECKS[name].config.from_options(options, channels=channels)


def build_neck(
    name: str, in_specs: list[FeatureSpec], channels: int, extra: str, repeats: int = 5
) -> nn.Module:
    """Neck ``name`` (auto, fpn, nasfpn, simple) with the ``extra`` levels a head needs ("maxpool":
    P6; "p6p7": P6, P7), through ``NECKS``. Unknown names and unsuitable
    levels are CachedetErrors."""
    name = resolve_neck(name, in_specs)
    return NECKS[name].build(
        neck_config(name, {"nasfpn_repeats": repeats}, channels), list(in_specs), extra
    )
