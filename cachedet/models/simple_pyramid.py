"""ViTDet's simple feature pyramid (Li, Mao, Girshick & He, *Exploring Plain Vision Transformer
Backbones for Object Detection*, ECCV 2022, Sec. 3 and Fig. 2c), written for cachedet's specs.

A plain ViT emits every tap at one stride s (its patch size). Pyramid level l (stride 2**l) is
made from a tap by resampling it by 2**l / s:

  up 2**k     k 2x2 stride-2 transposed convs, each halving the channels, LayerNorm + GELU
              between them (ViTDet: x4 is C -> C/2 -> C/4, x2 is C -> C/2)
  x1          identity
  down 2**k   k 2x2 stride-2 max-pools, odd sizes rounded up (ViTDet: /2)

then a 1x1 conv + LayerNorm and a 3x3 conv + LayerNorm to ``channels`` (ViTDet's "LN" variant;
LayerNorm over channels is timm's ``LayerNorm2d``). Extra coarser levels as the head needs:
"maxpool" (Faster R-CNN / Cascade: P6 = stride-2 subsampling of P5, torchvision's
``LastLevelMaxPool``) or "p6p7" (RetinaNet: stride-2 3x3 convs on P5, torchvision's
``LastLevelP6P7``), or none (NAS-FPN, stacked on top, makes its own P6/P7).

Several taps: deeper taps feed coarser levels. Of T taps (in block order) and m levels, level j
takes tap round(j (T - 1) / (m - 1)), the depth-to-resolution assignment of DPT (Ranftl et al.,
ICCV 2021); one tap feeds every level (ViTDet). A stride that is not a power of two (patch 14:
DINOv2, EVA-02) is first resampled bilinearly to the nearest power of two, so that every output
level has stride 2**l as the anchors and ``MultiScaleRoIAlign`` (which rounds scales to powers
of two) assume.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec

RCNN_LEVELS = (2, 3, 4, 5)  # + P6 by max-pooling: ViTDet's Mask R-CNN / Cascade pyramid
RETINANET_LEVELS = (3, 4, 5)  # + P6, P7 by strided convs
NASFPN_LEVELS = (3, 4, 5)  # NAS-FPN's inputs


def single_stride(specs: list[FeatureSpec]) -> bool:
    return len({s.stride for s in specs}) == 1


def vit_taps(specs: list[FeatureSpec]) -> bool:
    """Levels of a plain ViT: tap-named (``b11``) or several at one stride (which FPN cannot name apart)."""
    return single_stride(specs) and (len(specs) > 1 or specs[0].name.startswith("b"))


def _rescale(channels: int, log2_factor: int) -> tuple[nn.Module, int]:
    """Resample a map by 2**log2_factor: transposed convs up (halving the channels each time),
    max-pools down, identity at 0. Returns the module and its output channels."""
    if log2_factor == 0:
        return nn.Identity(), channels
    if log2_factor < 0:
        return nn.Sequential(
            *[nn.MaxPool2d(2, 2, ceil_mode=True) for _ in range(-log2_factor)]
        ), channels
    layers: list[nn.Module] = []
    for k in range(log2_factor):
        if k:
            layers += [LayerNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, max(channels // 2, 1), 2, stride=2))
        channels = max(channels // 2, 1)
    return nn.Sequential(*layers), channels


def tap_for_level(j: int, levels: int, taps: int) -> int:
    """Index of the tap that feeds level j of ``levels`` (finest first) when there are ``taps`` taps."""
    return 0 if levels == 1 else int(round(j * (taps - 1) / (levels - 1)))


class SimplePyramidNeck(nn.Module):
    """Single-stride taps -> pyramid levels ``p{l}`` for l in ``levels``, plus the ``extra`` levels.

    forward({b11: (B, C, S/s, S/s), ...}) -> OrderedDict{p2: (B, channels, S/4, S/4), ...,
    p6: (B, channels, S/64, S/64)} (sizes rounded up where S/2**l is not whole; S a multiple of s).
    Raises CachedetError when the taps do not share one stride.
    """

    def __init__(
        self,
        in_specs: list[FeatureSpec],
        channels: int = 256,
        levels: tuple[int, ...] = RCNN_LEVELS,
        extra: str | None = "maxpool",
    ):
        super().__init__()
        if not single_stride(in_specs):
            raise CachedetError(
                f"detector.neck simple: needs taps at one stride (a plain ViT), got strides "
                f"{[s.stride for s in in_specs]}; use detector.neck fpn"
            )
        if extra not in ("maxpool", "p6p7", None):
            raise ValueError(extra)
        self.in_specs = list(in_specs)
        stride = in_specs[0].stride
        self.base_level = int(round(math.log2(stride)))
        self.resample_from = stride if stride != 2**self.base_level else None  # e.g. 14 -> 16
        self.sources = [
            in_specs[tap_for_level(j, len(levels), len(in_specs))].name for j in range(len(levels))
        ]
        self.scales = nn.ModuleList()
        self.outputs = nn.ModuleList()
        for source, level in zip(self.sources, levels):
            scale, c_in = _rescale(
                next(s.channels for s in in_specs if s.name == source), self.base_level - level
            )
            self.scales.append(scale)
            self.outputs.append(
                nn.Sequential(
                    nn.Conv2d(c_in, channels, 1, bias=False),
                    LayerNorm2d(channels),
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    LayerNorm2d(channels),
                )
            )
        self.extra = extra
        self.p6p7 = LastLevelP6P7(channels, channels) if extra == "p6p7" else None
        n_extra = {"maxpool": 1, "p6p7": 2, None: 0}[extra]
        out_levels = list(levels) + [levels[-1] + k + 1 for k in range(n_extra)]
        self.out_specs = [FeatureSpec(f"p{lvl}", channels, 2**lvl) for lvl in out_levels]

    def forward(self, features: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        taps = {s.name: features[s.name] for s in self.in_specs}
        if self.resample_from:
            size = [
                round(n * self.resample_from / 2**self.base_level)
                for n in next(iter(taps.values())).shape[-2:]
            ]
            taps = {
                k: F.interpolate(v, size=size, mode="bilinear", align_corners=False)
                for k, v in taps.items()
            }
        outs = [
            out(scale(taps[src]))
            for src, scale, out in zip(self.sources, self.scales, self.outputs)
        ]
        if self.extra == "maxpool":
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        elif self.extra == "p6p7":
            outs, _ = self.p6p7(outs, outs, [s.name for s in self.out_specs[: len(outs)]])
        return OrderedDict((spec.name, t) for spec, t in zip(self.out_specs, outs))


class StackedNeck(nn.Module):
    """``first`` then ``second`` (e.g. the simple pyramid under NAS-FPN); out_specs are ``second``'s."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second
        self.in_specs, self.out_specs = first.in_specs, second.out_specs

    def forward(self, features: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        return self.second(self.first(features))
