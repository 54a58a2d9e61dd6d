"""Parameters and FLOPs of one training step in each regime (the paper's Table 3 and Figure 1).

Parameters are counted on the built modules; no step runs for them. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` for one step on a batch of ``batch`` images at
``size``, each with a few ground-truth boxes:
  finetune       backbone forward + backward, detector forward + backward
  online_frozen  backbone forward (no grad), detector forward + backward
  cached         detector forward + backward on features read from the cache
  adapters_online  (with adapters) backbone forward + backward into its adapters, detector step

How they are counted without the cost of a real CPU step (``method="fake"``, the default):
  - the backbone runs on fake tensors (``FakeTensorMode``: shapes only, no data, no memory);
  - the detector's step runs for real, except that every FLOP-counted operation (convolutions,
    matrix products and their backward) is evaluated on meta tensors and returns zeros of the
    right shape. A detector cannot run on fake tensors alone: proposal NMS and RoI sampling
    have data-dependent output sizes, so the cheap operations between the counted ones run on
    real (zero) values.
With enough proposals that RoI sampling is full (``rois_per_image`` per image and stage, as at
every realistic canvas) the count equals a real step's (tested). The mask head's share depends on
the number of positive RoIs, which depends on the values in both methods. ``method="real"`` runs
the real CPU steps (minutes at 1024x1024 for a ResNet-101) as the reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from cachedet.backbones.backbone import BackboneConfig, build_backbone
from cachedet.core.errors import CachedetError
from cachedet.core.recipes import RECIPES
from cachedet.engine.step import TrainModel, train_step
from cachedet.models.build import head_supports_masks
from cachedet.models.detector import DetectorConfig, build_detector
from cachedet.models.necks import resolve_neck

PAPER_TABLE3 = {  # ResNet-101 frozen: trained parameters (M), Vasconcelos et al. Table 3
    ("fpn", "faster-rcnn"): 21.9,
    ("nasfpn", "faster-rcnn"): 40.9,
    ("nasfpn", "cascade"): 71.3,
}
PAPER_FLOP_RATIO = {  # frozen / fine-tuned FLOPs per step, read off the paper's Figure 1 (ResNet-101)
    ("fpn", "faster-rcnn"): 1577 / 2420,
    ("nasfpn", "faster-rcnn"): 1270 / 2126,
    ("nasfpn", "cascade"): 2413 / 3960,
}
PAPER_BACKBONES = (
    "resnet101",
    "resnetrs101",
)  # timm names of the paper's ResNet-101 (its channels and strides)
PAPER_CANVAS, PAPER_CLASSES = 1024, 91
ALL_STAGES = "all"  # adapt_stages: every stage after the stem
METHODS = ("fake", "real")


def count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _targets(batch: int, size: int, masks: bool = False) -> list[dict]:
    """A few boxes per image (and, for mask heads, each box filled as its mask)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = 16 + torch.rand(4, 2, generator=g) * size * 0.35
        t = {"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1), "labels": torch.arange(4) % 3}
        if masks:
            t["masks"] = torch.zeros(4, size, size, dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(t["masks"], t["boxes"].long().tolist()):
                m[y1:y2, x1:x2] = 1
        out.append(t)
    return out


def mask_head_params(cfg: DetectorConfig) -> int:
    """Parameters that ``--masks`` adds to a detector (0 for RetinaNet, which cannot have it)."""
    if not head_supports_masks(cfg.head):
        return 0
    with torch.device("meta"):  # shapes only: no initialisation cost
        return count(build_detector(replace(cfg, masks=True))) - count(
            build_detector(replace(cfg, masks=False))
        )


def paper_reference(
    backbone: str,
    neck: str,
    head: str,
    size: int,
    num_classes: int,
    neck_channels: int = 256,
    options: dict | None = None,
    out_indices: tuple[int, ...] | None = None,
) -> dict:
    """The paper's figures for this model, each None where the model is not the paper's.

    ``trained_params_m`` (Table 3) for a ResNet-101 (``resnet101``, ``resnetrs101``, any pretrained
    tag) on its default stride 8/16/32 levels with FPN, NAS-FPN or NAS-FPN + Cascade, 91 classes,
    256 channels and default widths; ``frozen_flop_ratio`` (Figure 1) also needs the 1024x1024 canvas.
    """
    key = (neck, head)
    # the paper recipe's 4conv1fc box head is a faster-rcnn head's own default, so not a change
    default_head = RECIPES["paper"].detector_options if head == "faster-rcnn" else {}
    options = {k: v for k, v in (options or {}).items() if default_head.get(k) != v}
    paper = (
        backbone.split(".")[0] in PAPER_BACKBONES
        and key in PAPER_TABLE3
        and num_classes == PAPER_CLASSES
        and neck_channels == 256
        and not options
        and out_indices is None
    )
    return {
        "trained_params_m": PAPER_TABLE3[key] if paper else None,
        "frozen_flop_ratio": PAPER_FLOP_RATIO[key] if paper and size == PAPER_CANVAS else None,
    }


class _ZeroCompute(TorchDispatchMode):
    """FLOP-counted operations evaluated on meta tensors, returning zeros of their output shape;
    every other operation runs as usual. Enter it before ``FlopCounterMode`` so that the counter
    sees the real shapes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._overloadpacket not in flop_registry:
            return func(*args, **kwargs)
        device = next(
            t.device for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)
        )
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta_args, **meta_kwargs)
        return tree_map_only(
            torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device), out
        )


def _count(fn, *modes) -> int:
    """FLOPs of ``fn()`` under ``modes`` (entered in order, then the counter)."""
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        counter = stack.enter_context(FlopCounterMode(display=False))
        fn()
    return int(counter.get_total_flops())


def _fake_backbone_flops(bb, shape: tuple[int, ...], grad_levels: set[str] | None = None) -> int:
    """Backbone forward on fake images of ``shape``; with ``grad_levels``, also the backward from
    those feature levels into every parameter that requires grad (all for fine-tuning, the adapters')."""

    def step():
        images = torch.zeros(shape)
        with torch.set_grad_enabled(grad_levels is not None):
            feats = bb(images)
        if grad_levels is not None:
            outs = [v for k, v in feats.items() if k in grad_levels]
            params = [p for p in bb.parameters() if p.requires_grad]
            torch.autograd.grad(outs, params, [torch.ones_like(v) for v in outs], allow_unused=True)

    return _count(step, FakeTensorMode(allow_non_fake_inputs=True))


def _detector_flops(
    det, shapes: dict[str, tuple[int, ...]], targets: list[dict], grad_levels: set[str]
) -> tuple[int, set[str]]:
    """A detector step on zero features of ``shapes`` with zero-cost counted operations, the
    ``grad_levels`` features requiring grad; returns its FLOPs and the levels that received a gradient."""
    feats = {k: torch.zeros(s, requires_grad=k in grad_levels) for k, s in shapes.items()}
    flops = _count(lambda: train_step(det, feats, targets, check_finite=False), _ZeroCompute())
    det.zero_grad(set_to_none=True)
    return flops, {k for k, v in feats.items() if v.grad is not None}


def _fake_flops(
    bb, det, shape: tuple[int, ...], targets: list[dict], adapt_stages: tuple[int, ...] | None
) -> dict:
    def fake_features():
        with FakeTensorMode(allow_non_fake_inputs=True):
            return bb(torch.zeros(shape))

    shapes = {k: tuple(v.shape) for k, v in fake_features().items()}
    cached, _ = _detector_flops(det, shapes, targets, set())
    head_in, used = _detector_flops(det, shapes, targets, set(shapes))
    bb.set_trainable(True)
    finetune = _fake_backbone_flops(bb, shape, used)
    bb.set_trainable(False)
    flops = {
        "finetune": finetune + head_in,
        "online_frozen": _fake_backbone_flops(bb, shape) + cached,
        "cached": cached,
    }
    if adapt_stages:
        bb.add_adapters(adapt_stages)  # levels before the first adapted stage get no gradient
        head_in, used = _detector_flops(
            det, shapes, targets, {k for k, v in fake_features().items() if v.requires_grad}
        )
        flops["adapters_online"] = _fake_backbone_flops(bb, shape, used) + head_in
    return flops


def _real_flops(
    bb, det, shape: tuple[int, ...], targets: list[dict], adapt_stages: tuple[int, ...] | None
) -> dict:
    """The reference: real CPU training steps on random images."""
    images = torch.randn(shape)
    with torch.no_grad():
        cached = {k: v.detach() for k, v in bb(images).items()}

    def finetune():
        bb.set_trainable(True)
        train_step(TrainModel(det, bb), images, targets, check_finite=False)
        bb.set_trainable(False)

    flops = {
        "finetune": _count(finetune),
        "online_frozen": _count(
            lambda: train_step(TrainModel(det, bb), images, targets, check_finite=False)
        ),
        "cached": _count(lambda: train_step(det, cached, targets, check_finite=False)),
    }
    if adapt_stages:
        bb.add_adapters(adapt_stages)
        flops["adapters_online"] = _count(
            lambda: train_step(TrainModel(det, bb), images, targets, check_finite=False)
        )
    return flops


def model_info(
    backbone: str,
    neck: str,
    head: str,
    size: int = 1024,
    num_classes: int = 91,
    neck_channels: int = 256,
    options: dict | None = None,
    batch: int = 1,
    weights: str = "random",
    adapt_stages: tuple[int, ...] | str | None = None,
    masks: bool = False,
    out_indices: tuple[int, ...] | None = None,
    method: str = "fake",
) -> dict:
    """Parameters and per-regime step FLOPs (see the module docstring for the regimes and ``method``).

    ``adapt_stages``: also the adapters' parameters and the FLOPs of an online step that trains them
    (regime ``adapters_online``); ``ALL_STAGES`` for every stage after the stem. ``masks``: the
    detector has Mask R-CNN's mask head; ``mask_head_params`` is that head's size either way.
    ``out_indices``: the backbone's levels (a ViT's taps); ``neck`` "auto" is resolved as train-heads
    does. ``paper`` holds the paper's figures only for the paper's model (``paper_reference``).
    Raises CachedetError for an unknown ``method`` or a canvas the backbone cannot take.
    """
    if method not in METHODS:
        raise CachedetError(f"model_info method {method!r}: expected one of {', '.join(METHODS)}")
    bb = build_backbone(BackboneConfig(backbone, out_indices, weights), warn=False).check_canvas(
        size
    )
    neck = resolve_neck(neck, bb.specs)
    det_cfg = DetectorConfig(
        num_classes=num_classes,
        canvas=size,
        in_specs=tuple(bb.specs),
        neck=neck,
        head=head,
        neck_channels=neck_channels,
        options=dict(options or {}),
        masks=masks,
    )
    det = build_detector(det_cfg).train()
    if adapt_stages == ALL_STAGES:
        adapt_stages = tuple(range(bb.first_adaptable_stage, len(bb.stage_names())))
    adapt_stages = tuple(adapt_stages or ())
    backbone_params, detector_params = count(bb), count(det)
    neck_params, head_params = count(det.neck), count(det.head)
    counter = _fake_flops if method == "fake" else _real_flops
    flops = counter(bb, det, (batch, 3, size, size), _targets(batch, size, masks), adapt_stages)
    trainable = {
        "finetune": backbone_params + detector_params,
        "online_frozen": detector_params,
        "cached": detector_params,
    }
    adapter_params = bb.adapter_parameter_count() if adapt_stages else 0
    if adapt_stages:
        trainable["adapters_online"] = detector_params + adapter_params
    return {
        "backbone": backbone,
        "levels": [s.to_dict() for s in bb.specs],
        "neck": neck,
        "head": head,
        "size": size,
        "num_classes": num_classes,
        "batch": batch,
        "method": method,
        "params": {
            "backbone": backbone_params,
            "detector": detector_params,
            "total": backbone_params + detector_params,
            "adapters": adapter_params,
            "adapt_stages": list(adapt_stages),
            "trainable": trainable,
        },
        "neck_params": neck_params,
        "head_params": head_params,
        "masks": masks,
        "mask_head_params": mask_head_params(det_cfg),
        "flops": flops,
        "flop_ratio": {
            "online_frozen": flops["online_frozen"] / flops["finetune"],
            "cached": flops["cached"] / flops["finetune"],
        },
        "paper": paper_reference(
            backbone, neck, head, size, num_classes, neck_channels, options, out_indices
        ),
    }
