"""Necks: backbone levels {c3, c4, c5} (or a ViT's taps {b11, ...}) -> pyramid levels {p3, ..., pK}
(the simple pyramid: {p2, ..., p6}), all ``channels`` wide.

A neck declares its output as ``FeatureSpec``s (name p{log2 stride}, channels, stride), as the
backbone does, so heads are built from declarations and never from tensor shapes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec
from cachedet.models.config import FPNConfig, NASFPNConfig, SimplePyramidConfig


class FPNNeck(nn.Module):
    """torchvision's FeaturePyramidNetwork over the given levels, plus extra coarser levels.

    extra="maxpool": one level made by max-pooling the coarsest output (Faster R-CNN's P6).
    extra="p6p7": two levels made by strided 3x3 convs on the coarsest *backbone* level (RetinaNet).
    forward({c3: (B, C3, H/8, W/8), ...}) -> OrderedDict{p3: (B, channels, H/8, W/8), ...}.
    """

    def __init__(self, in_specs: list[FeatureSpec], channels: int = 256, extra: str = "maxpool"):
        super().__init__()
        self.in_specs = list(in_specs)
        if extra == "maxpool":
            extra_block, n_extra = LastLevelMaxPool(), 1
        elif extra == "p6p7":
            extra_block, n_extra = LastLevelP6P7(in_specs[-1].channels, channels), 2
        else:
            raise ValueError(extra)
        self.fpn = FeaturePyramidNetwork(
            [s.channels for s in in_specs], channels, extra_blocks=extra_block
        )
        strides = [s.stride for s in in_specs] + [
            in_specs[-1].stride * 2 ** (k + 1) for k in range(n_extra)
        ]
        self.out_specs = [
            FeatureSpec(f"p{FeatureSpec.level_name(s)[1:]}", channels, s) for s in strides
        ]

    def forward(self, features: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        x = OrderedDict((s.name, features[s.name]) for s in self.in_specs)
        out = self.fpn(x)
        return OrderedDict((spec.name, t) for spec, t in zip(self.out_specs, out.values()))


def resolve_neck(name: str, in_specs: list[FeatureSpec]) -> str:
    """ "auto": the simple pyramid for a plain ViT's taps (all at one stride), FPN otherwise; other names as given."""
    from cachedet.models.simple_pyramid import vit_taps

    if name == "auto":
        return "simple" if vit_taps(in_specs) else "fpn"
    if name == "fpn" and vit_taps(in_specs):
        raise CachedetError(
            f"detector.neck fpn: the backbone's levels {[s.name for s in in_specs]} share one stride "
            f"({in_specs[0].stride}, a plain ViT); use detector.neck simple (or auto)"
        )
    return name


def build_fpn(cfg: FPNConfig, in_specs: list[FeatureSpec], extra: str) -> nn.Module:
    return FPNNeck(in_specs, cfg.channels, extra)


def build_simple_pyramid(
    cfg: SimplePyramidConfig, in_specs: list[FeatureSpec], extra: str
) -> nn.Module:
    from cachedet.models.simple_pyramid import RCNN_LEVELS, RETINANET_LEVELS, SimplePyramidNeck

    levels = RETINANET_LEVELS if extra == "p6p7" else RCNN_LEVELS
    return SimplePyramidNeck(in_specs, cfg.channels, levels, extra)


def build_nasfpn(cfg: NASFPNConfig, in_specs: list[FeatureSpec], extra: str) -> nn.Module:
    """NAS-FPN always makes P3-P7 (whatever ``extra``); on single-stride taps on top of the simple
    pyramid's P3-P5. Raises CachedetError for backbone levels not at strides 8, 16, 32."""
    from cachedet.models.nasfpn import NASFPNNeck
    from cachedet.models.simple_pyramid import (
        NASFPN_LEVELS,
        SimplePyramidNeck,
        StackedNeck,
        vit_taps,
    )

    if vit_taps(in_specs):
        pyramid = SimplePyramidNeck(in_specs, cfg.channels, NASFPN_LEVELS, extra=None)
        return StackedNeck(pyramid, NASFPNNeck(pyramid.out_specs, cfg.channels, cfg.repeats))
    if [s.stride for s in in_specs] != [8, 16, 32]:
        raise CachedetError(
            f"detector.neck nasfpn: needs backbone levels at strides 8, 16, 32, "
            f"got {[s.stride for s in in_specs]}"
        )
    return NASFPNNeck(in_specs, cfg.channels, cfg.repeats)
