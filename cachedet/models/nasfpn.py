"""NAS-FPN (Ghiasi, Lin & Le, CVPR 2019): the published architecture of merging cells over P3-P7.

Each repeat applies the 7 merging cells that the architecture search found (``NASFPN_CELLS``,
the same list as TensorFlow Model Garden's ``nasfpn.py``). A cell resamples its two inputs to its
output level (max-pool down, nearest up), merges them by a sum or a global-attention cell
(``a + b * sigmoid(global_max_pool(a))``, with ``a`` the coarser input), adds any same-level
node that no cell consumed yet when it is an output cell, then applies ReLU -> 3x3 conv -> norm.
P3-P5 enter through 1x1 conv + norm from c3-c5; P6 and P7 are made from the coarsest backbone
level (1x1 conv + norm, then stride-2 max-pools). The norm is GroupNorm (see ``_conv_bn``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cachedet.core.structures import FeatureSpec

# (output level, merge, (input node, input node), is an output cell); nodes 0-4 are P3-P7 and
# every cell appends its output as the next node.
NASFPN_CELLS = (
    (4, "attention", (1, 3), False),
    (4, "sum", (1, 5), False),
    (3, "sum", (0, 6), True),
    (4, "sum", (6, 7), True),
    (5, "attention", (7, 8), True),
    (7, "attention", (6, 9), True),
    (6, "attention", (9, 10), True),
)
MIN_LEVEL, MAX_LEVEL = 3, 7


def _resample(
    x: torch.Tensor, from_level: int, to_level: int, size: tuple[int, int]
) -> torch.Tensor:
    if from_level < to_level:
        for _ in range(to_level - from_level):
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="nearest")
    if from_level > to_level:
        return F.interpolate(x, size=size, mode="nearest")
    return x


def _conv_bn(cin: int, cout: int, k: int) -> nn.Sequential:
    """conv -> GroupNorm. The paper's library uses (synchronised) BatchNorm over large batches;
    GroupNorm has the same parameters and works with the small per-device batches of head training."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(min(32, cout), cout)
    )


class MergingCell(nn.Module):
    def __init__(
        self, level: int, merge: str, inputs: tuple[int, int], is_output: bool, channels: int
    ):
        super().__init__()
        self.level, self.merge, self.inputs, self.is_output = level, merge, inputs, is_output
        self.conv = _conv_bn(channels, channels, 3)

    def forward(
        self,
        nodes: list[torch.Tensor],
        levels: list[int],
        consumed: list[int],
        sizes: dict[int, tuple],
    ) -> torch.Tensor:
        size = sizes[self.level]
        (i, j) = self.inputs
        a = _resample(nodes[i], levels[i], self.level, size)
        b = _resample(nodes[j], levels[j], self.level, size)
        consumed[i] += 1
        consumed[j] += 1
        if self.merge == "sum":
            x = a + b
        else:  # global attention: the coarser input gates the finer one
            coarse, fine = (a, b) if levels[i] >= levels[j] else (b, a)
            x = coarse + fine * torch.sigmoid(torch.amax(coarse, dim=(2, 3), keepdim=True))
        if self.is_output:
            for k, (node, lvl) in enumerate(zip(nodes, levels)):
                if consumed[k] == 0 and lvl == self.level:
                    consumed[k] += 1
                    x = x + node
        return self.conv(F.relu(x))


class NASFPNNeck(nn.Module):
    """forward({c3, c4, c5}) -> OrderedDict{p3..p7: (B, channels, S/2^l, S/2^l)}; ``repeats`` cell stacks."""

    def __init__(self, in_specs: list[FeatureSpec], channels: int = 256, repeats: int = 5):
        super().__init__()
        strides = [s.stride for s in in_specs]
        if strides != [8, 16, 32]:
            raise ValueError(f"NAS-FPN needs backbone levels at strides 8, 16, 32; got {strides}")
        self.in_specs = list(in_specs)
        self.laterals = nn.ModuleList(_conv_bn(s.channels, channels, 1) for s in in_specs)
        self.p6 = _conv_bn(in_specs[-1].channels, channels, 1)
        self.repeats = nn.ModuleList(
            nn.ModuleList(MergingCell(*cell, channels) for cell in NASFPN_CELLS)
            for _ in range(repeats)
        )
        self.out_specs = [
            FeatureSpec(f"p{lvl}", channels, 2**lvl) for lvl in range(MIN_LEVEL, MAX_LEVEL + 1)
        ]

    def forward(self, features: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        c = [features[s.name] for s in self.in_specs]
        feats = [lat(x) for lat, x in zip(self.laterals, c)]
        p6 = F.max_pool2d(self.p6(c[-1]), kernel_size=3, stride=2, padding=1)
        feats += [p6, F.max_pool2d(p6, kernel_size=3, stride=2, padding=1)]
        sizes = {lvl: tuple(f.shape[-2:]) for lvl, f in zip(range(MIN_LEVEL, MAX_LEVEL + 1), feats)}
        for cells in self.repeats:
            nodes, levels = list(feats), list(range(MIN_LEVEL, MAX_LEVEL + 1))
            consumed = [0] * len(nodes)
            outputs = {}
            for cell in cells:
                nodes.append(cell(nodes, levels, consumed, sizes))
                levels.append(cell.level)
                consumed.append(0)
                if cell.is_output:
                    outputs[cell.level] = nodes[-1]
            feats = [outputs[lvl] for lvl in range(MIN_LEVEL, MAX_LEVEL + 1)]
        return OrderedDict((spec.name, f) for spec, f in zip(self.out_specs, feats))
