"""Parameters and FLOPs of one training step in each regime (the paper's Table 3 and Figure 1).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` while a real training step runs
on the CPU (random weights are fine for counting): a batch of ``batch`` images at ``size``,
each with a few ground-truth boxes.
  finetune       backbone forward + backward, detector forward + backward
  online_frozen  backbone forward (no grad), detector forward + backward
  cached         detector forward + backward on features read from the cache
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from cachedet.backbones import BackboneConfig, build_backbone
from cachedet.engine.step import TrainModel, train_step
from cachedet.models.detector import DetectorConfig, build_detector
from cachedet.models.necks import resolve_neck

PAPER_TABLE3 = {  # ResNet-101 frozen: trained parameters (M), Vasconcelos et al. Table 3
    ("fpn", "faster-rcnn"): 21.9, ("nasfpn", "faster-rcnn"): 40.9, ("nasfpn", "cascade"): 71.3,
}
PAPER_FLOP_RATIO = {  # frozen / fine-tuned FLOPs per step, read off the paper's Figure 1 (ResNet-101)
    ("fpn", "faster-rcnn"): 1577 / 2420, ("nasfpn", "faster-rcnn"): 1270 / 2126, ("nasfpn", "cascade"): 2413 / 3960,
}


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
    if cfg.head == "retinanet":
        return 0
    return count(build_detector(replace(cfg, masks=True))) - count(build_detector(replace(cfg, masks=False)))


def _step_flops(fn) -> int:
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_info(backbone: str, neck: str, head: str, size: int = 1024, num_classes: int = 91, neck_channels: int = 256,
               options: dict | None = None, batch: int = 1, weights: str = "random",
               adapt_stages: tuple[int, ...] | None = None, masks: bool = False,
               out_indices: tuple[int, ...] | None = None) -> dict:
    """Parameters and per-regime step FLOPs; with ``adapt_stages`` also the adapters' parameters and
    the FLOPs of an online step that trains them (regime ``adapters_online``); with ``masks`` the
    detector has Mask R-CNN's mask head. ``mask_head_params`` is that head's size either way.
    ``out_indices``: the backbone's levels (a ViT's taps); ``neck`` "auto" is resolved as train-heads does."""
    bb = build_backbone(BackboneConfig(backbone, out_indices, weights), warn=False).check_canvas(size)
    neck = resolve_neck(neck, bb.specs)
    det_cfg = DetectorConfig(num_classes=num_classes, canvas=size, in_specs=tuple(bb.specs), neck=neck, head=head,
                             neck_channels=neck_channels, options=dict(options or {}), masks=masks)
    det = build_detector(det_cfg).train()
    images = torch.randn(batch, 3, size, size)
    targets = _targets(batch, size, masks)
    with torch.no_grad():
        cached = {k: v.detach() for k, v in bb(images).items()}

    def finetune():
        bb.set_trainable(True)
        train_step(TrainModel(det, bb), images, targets, check_finite=False)
        bb.set_trainable(False)

    def online_frozen():
        train_step(TrainModel(det, bb), images, targets, check_finite=False)

    def cached_step():
        train_step(TrainModel(det), cached, targets, check_finite=False)

    flops = {"finetune": _step_flops(finetune), "online_frozen": _step_flops(online_frozen), "cached": _step_flops(cached_step)}
    backbone_params, detector_params = count(bb), count(det)
    trainable = {"finetune": backbone_params + detector_params, "online_frozen": detector_params, "cached": detector_params}
    adapter_params = 0
    if adapt_stages:
        bb.add_adapters(tuple(adapt_stages))
        adapter_params = bb.adapter_parameter_count()
        flops["adapters_online"] = _step_flops(lambda: train_step(TrainModel(det, bb), images, targets, check_finite=False))
        trainable["adapters_online"] = detector_params + adapter_params
    key = (neck, head)
    return {
        "backbone": backbone, "levels": [s.to_dict() for s in bb.specs], "neck": neck, "head": head, "size": size, "num_classes": num_classes, "batch": batch,
        "params": {"backbone": backbone_params, "detector": detector_params, "total": backbone_params + detector_params,
                   "adapters": adapter_params, "adapt_stages": list(adapt_stages or ()), "trainable": trainable},
        "neck_params": count(det.neck), "head_params": count(det.head), "masks": masks,
        "mask_head_params": mask_head_params(det_cfg),
        "flops": flops,
        "flop_ratio": {"online_frozen": flops["online_frozen"] / flops["finetune"], "cached": flops["cached"] / flops["finetune"]},
        "paper": {"trained_params_m": PAPER_TABLE3.get(key), "frozen_flop_ratio": PAPER_FLOP_RATIO.get(key)},
    }
