"""Parallel residual adapters (Rebuffi, Bilen & Vedaldi, CVPR 2018) inside a frozen timm backbone,
and running a backbone stage by stage (for hybrid caches that stop before the adapted stages).

An adapter is a 1x1 convolution (same input/output channels and stride as the convolution it
sits beside) whose output is added to that convolution's. It starts at zero, so training starts
exactly at the frozen model; BatchNorm stays frozen. Adapted convolutions:

  timm ResNet family (incl. resnetrs*): the 3x3 conv of each Bottleneck (conv2), both 3x3 convs
      of each BasicBlock;
  timm EfficientNet family: the 1x1 projection of each block (conv_pwl of InvertedResidual and
      EdgeResidual, conv_pw of DepthwiseSeparableConv).

Stages follow timm's ``feature_info``: stage k ends at the module that emits feature k (stage 0
is the stem), e.g. ResNet stage 3 = layer3, EfficientNet-Lite0 stage 3 = blocks.3 + blocks.4.
"""

from __future__ import annotations

import torch
from torch import nn

from cachedet.core.errors import CachedetError


class ParallelAdapter(nn.Module):
    """y = conv(x) + adapter(x), adapter a zero-initialised 1x1 convolution with conv's stride."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.adapter = nn.Conv2d(
            conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False
        )
        nn.init.zeros_(self.adapter.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.adapter(x)


def _adapted_convs(block: nn.Module) -> list[str]:
    from timm.models._efficientnet_blocks import (
        DepthwiseSeparableConv,
        EdgeResidual,
        InvertedResidual,
    )
    from timm.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, Bottleneck):
        return ["conv2"]
    if isinstance(block, BasicBlock):
        return ["conv1", "conv2"]
    if isinstance(block, (InvertedResidual, EdgeResidual)):
        return ["conv_pwl"]
    if isinstance(block, DepthwiseSeparableConv):
        return ["conv_pw"]
    return []


def ordered_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The top-level modules of a timm features_only model, in execution order."""
    from timm.models._features import FeatureDictNet
    from timm.models.efficientnet import EfficientNetFeatures

    if isinstance(model, EfficientNetFeatures):
        return [("conv_stem", model.conv_stem), ("bn1", model.bn1)] + [
            (f"blocks.{i}", b) for i, b in enumerate(model.blocks)
        ]
    if isinstance(model, FeatureDictNet):  # FeatureListNet too
        return list(model.items())
    raise CachedetError(
        f"adapters and hybrid caches support timm ResNet and EfficientNet feature models, not {type(model).__name__}"
    )


def stage_layout(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Modules of each stage: stage k runs after stage k-1's last module, up to feature k's module."""
    modules = ordered_modules(model)
    names = [n for n, _ in modules]
    stages, start = [], 0
    for info in model.feature_info.info:
        name = (
            info["module"] if info["module"] in names else info["module"].replace(".", "_")
        )  # FeatureListNet keys
        if name not in names:  # timm prunes modules after the last requested feature
            break
        end = names.index(name) + 1
        stages.append(modules[start:end])
        start = end
    return stages


def add_adapters(model: nn.Module, stages: tuple[int, ...], model_name: str) -> list[nn.Parameter]:
    """Wrap the adaptable convolutions of ``stages`` in ``ParallelAdapter``; return the adapters' parameters."""
    layout = stage_layout(model)
    params = []
    for k in stages:
        if not 0 < k < len(layout):
            raise CachedetError(
                f"source.adapt_stages {k}: {model_name} has stages 1..{len(layout) - 1} after its stem"
            )
        found = 0
        for _, top in layout[k]:
            for block in top.modules():
                for attr in _adapted_convs(block):
                    conv = getattr(block, attr)
                    if isinstance(conv, ParallelAdapter):
                        continue
                    wrapped = ParallelAdapter(conv)
                    setattr(block, attr, wrapped)
                    params += list(wrapped.adapter.parameters())
                    found += 1
        if not found:
            raise CachedetError(
                f"source.adapt_stages {k}: no ResNet or EfficientNet block in stage {k} of {model_name}"
            )
    return params


def run_stages(
    layout, x: torch.Tensor, first: int, last: int, no_grad_before: int | None = None
) -> list[torch.Tensor]:
    """Run stages first..last on ``x`` (the input of stage ``first``); return each stage's output.

    Stages before ``no_grad_before`` run without autograd (nothing upstream of them trains).
    """
    outs = []
    for k in range(first, last + 1):
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and (no_grad_before is None or k >= no_grad_before)
        ):
            for _, module in layout[k]:
                x = module(x)
        outs.append(x)
    return outs
