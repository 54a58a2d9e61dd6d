"""Our cached step's detector (neck + heads) against torchvision's Faster R-CNN parts, on the CPU.

    python benchmarks/heads_vs_torchvision.py [--size 512] [--batch 2] [--steps 6] [--threads 2]

Both sides get identical inputs: the same float32 ResNet-50 c2-c5 features (B, C, S/4..S/32),
random, with requires_grad as a cached step has them (none: the features are leaves), the same
targets, and the same configuration (torchvision's fasterrcnn_resnet50_fpn: FPN 256 with a
max-pooled P6, 3 anchors per location, 2000 proposals before and after NMS in training, 512 RoIs
per image, a 2-FC box head of 1024). ``same_config`` checks the parameter counts part by part.
What still differs by construction is printed: our anchors are 4 x stride, torchvision's 8 x.
A third variant, ``ours_defaults``, is the detector ``train-heads`` builds with no detector flags
(issue 21: a default run must be no slower per step than torchvision's Faster R-CNN).

Each variant times forward + backward (no optimiser), median of ``--steps`` after 2 warm-ups,
interleaved so load drifts hit both sides; per part as well (neck, rpn, roi_heads). Writes
benchmarks/results/heads_vs_torchvision.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import OrderedDict

import torch

from cachedet.core.structures import FeatureSpec
from cachedet.models.detector import DetectorConfig, build_detector
from cachedet.tools.bench import TORCHVISION_LIKE, machine_info

SPECS = [FeatureSpec(f"c{k}", 256 * 2 ** (k - 2), 2**k) for k in range(2, 6)]
NUM_CLASSES = 91


def default_options() -> dict:
    """The detector options ``train-heads`` uses when given none: the default recipe's box head
    over the R-CNN head's defaults (models/config.py)."""
    from cachedet.core.recipes import detector_options_for, get_recipe

    return detector_options_for(get_recipe(None), "faster-rcnn", {})


def ours(anchor_scale: int = 4, options: dict | None = None):
    """Our detector (FPN neck + R-CNN head) in the torchvision-like configuration (or ``options``)."""
    torch.manual_seed(0)
    opts = TORCHVISION_LIKE if options is None else options
    det = build_detector(
        DetectorConfig(NUM_CLASSES, 512, tuple(SPECS), "fpn", "faster-rcnn", 256, opts)
    )
    if anchor_scale != 4:
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        strides = [s.stride for s in det.neck.out_specs]
        det.head.rpn.anchor_generator = AnchorGenerator(
            tuple((anchor_scale * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides)
        )
    return det


def torchvision_parts():
    """(fpn, rpn, roi_heads) of torchvision's fasterrcnn_resnet50_fpn (num_classes as ours)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    bb = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=0)
    model = FasterRCNN(bb, num_classes=NUM_CLASSES + 1, min_size=512, max_size=512)
    return bb.fpn, model.rpn, model.roi_heads


def count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def same_config() -> dict:
    """Parameter counts {part: (ours, torchvision's)} for the neck, the RPN and the box stage."""
    det = ours()
    fpn, rpn, roi = torchvision_parts()
    return {
        "neck": (count(det.neck), count(fpn)),
        "rpn": (count(det.head.rpn), count(rpn)),
        "roi_heads": (count(det.head.roi_heads), count(roi)),
    }


def inputs(size: int, batch: int):
    g = torch.Generator().manual_seed(0)
    feats = OrderedDict(
        (s.name, torch.randn(batch, s.channels, size // s.stride, size // s.stride, generator=g))
        for s in SPECS
    )
    targets = []
    for _ in range(batch):
        xy = torch.rand(6, 2, generator=g) * size * 0.7
        wh = torch.rand(6, 2, generator=g) * size * 0.3 + 16
        boxes = torch.cat([xy, xy + wh], 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, NUM_CLASSES, (6,), generator=g)})
    return feats, targets


class TorchvisionHeads(torch.nn.Module):
    """torchvision's FPN + rpn + roi_heads called as GeneralizedRCNN calls them (labels 1..C)."""

    def __init__(self):
        super().__init__()
        self.neck, self.rpn, self.roi_heads = torchvision_parts()

    def forward(self, feats, targets, size):
        from torchvision.models.detection.image_list import ImageList

        targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        n = len(targets)
        images = ImageList(torch.empty(n, 0, size, size), [(size, size)] * n)
        pyramid = self.neck(OrderedDict((str(i), v) for i, v in enumerate(feats.values())))
        proposals, losses = self.rpn(images, pyramid, targets)
        _, roi_losses = self.roi_heads(pyramid, proposals, images.image_sizes, targets)
        return {**losses, **roi_losses}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_fn(model, feats, targets, size):
    def run():
        model.zero_grad(set_to_none=True)
        losses = (
            model(feats, targets, size)
            if isinstance(model, TorchvisionHeads)
            else model(feats, targets)
        )
        sum(losses.values()).backward()

    return run


def part_fns(det, tv, feats, targets, size):
    """{part: (our fn, torchvision's fn)}: neck alone, and rpn / roi_heads on a fixed pyramid."""
    from torchvision.models.detection.image_list import ImageList

    n = len(targets)
    images = ImageList(torch.empty(n, 0, size, size), [(size, size)] * n)
    t1 = [{**t, "labels": t["labels"] + 1} for t in targets]
    with torch.no_grad():
        pyr_ours = det.neck(feats)
        pyr_tv = tv.neck(OrderedDict((str(i), v) for i, v in enumerate(feats.values())))
        props_ours, _ = det.head.rpn(images, pyr_ours, t1)
        props_tv, _ = tv.rpn(images, pyr_tv, t1)
    pyr_ours = OrderedDict((k, v.requires_grad_()) for k, v in pyr_ours.items())
    pyr_tv = OrderedDict((k, v.requires_grad_()) for k, v in pyr_tv.items())

    def backward(losses):
        sum(v.sum() if v.dim() else v for v in losses).backward()

    return {
        "neck": (
            lambda: backward(det.neck(feats).values()),
            lambda: backward(
                tv.neck(OrderedDict((str(i), v) for i, v in enumerate(feats.values()))).values()
            ),
        ),
        "rpn": (
            lambda: backward(det.head.rpn(images, pyr_ours, t1)[1].values()),
            lambda: backward(tv.rpn(images, pyr_tv, t1)[1].values()),
        ),
        "roi_heads": (
            lambda: backward(
                det.head.roi_heads(
                    pyr_ours, [p.detach() for p in props_ours], images.image_sizes, t1
                )[1].values()
            ),
            lambda: backward(
                tv.roi_heads(pyr_tv, [p.detach() for p in props_tv], images.image_sizes, t1)[
                    1
                ].values()
            ),
        ),
    }


def interleaved(fns: dict, warmup: int, steps: int) -> dict:
    """{name: median seconds}, the variants run in turn each step."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            torch.manual_seed(1)  # the same RoI sampling draws for every variant
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def parse(argv, doc: str, size: int, steps: int, threads: int) -> argparse.Namespace:
    """--size/--batch/--steps/--threads/--out of a step-timing benchmark (threads applied)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--size", type=int, default=size)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def main(argv=None) -> dict:
    args = parse(argv, __doc__, size=512, steps=6, threads=2)
    feats, targets = inputs(args.size, args.batch)
    det, det8, tv = ours().train(), ours(anchor_scale=8).train(), TorchvisionHeads().train()
    defaults = ours(options=default_options()).train()
    whole = interleaved(
        {
            "ours": step_fn(det, feats, targets, args.size),
            "ours_defaults": step_fn(defaults, feats, targets, args.size),
            "ours_tv_anchors": step_fn(det8, feats, targets, args.size),
            "torchvision": step_fn(tv, feats, targets, args.size),
        },
        2,
        args.steps,
    )
    parts = {}
    for part, (a, b) in part_fns(det8, tv, feats, targets, args.size).items():
        got = interleaved({"ours": a, "torchvision": b}, 2, args.steps)
        parts[part] = {**got, "ratio": got["ours"] / got["torchvision"]}
    result = {
        "machine": {
            **machine_info(),
            "platform": platform.platform(),
            "threads": args.threads,
            "loadavg": open("/proc/loadavg").read().split()[:3],
        },
        "settings": {
            "size": args.size,
            "batch": args.batch,
            "steps": args.steps,
            **TORCHVISION_LIKE,
            "defaults": default_options(),
        },
        "same_config": {k: list(v) for k, v in same_config().items()},
        "step_s": whole,
        "ours_vs_torchvision": whole["ours"] / whole["torchvision"],
        "parts_s": parts,
    }
    return write_results(args.out, "heads_vs_torchvision", result, markdown(result))


def write_results(out: str, name: str, result: dict, text: str) -> dict:
    """OUT/NAME.json and OUT/NAME.md (also printed); returns ``result``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    print(text)
    return result


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Our neck + heads vs torchvision's, on identical features",
        "",
        f"ResNet-50 c2-c5 features at {s['size']}², batch {s['batch']}, forward + backward, median of "
        f"{s['steps']} steps; {r['machine']['cores']} CPUs, {r['machine']['threads']} threads, "
        f"load {' '.join(r['machine']['loadavg'])}, torch {r['machine']['torch']}.",
        "",
        "`ours` is built like torchvision's detector; `ours_defaults` is what `train-heads` builds "
        f"with no detector flags ({', '.join(f'{k} {v}' for k, v in s.get('defaults', {}).items())}"
        ", the R-CNN head's defaults otherwise).",
        "",
        "| variant | step s | vs torchvision |",
        "|---|---|---|",
    ]
    tv = r["step_s"]["torchvision"]
    lines += [f"| {k} | {v:.3f} | {v / tv:.3f} |" for k, v in r["step_s"].items()]
    lines += [
        "",
        "| part (ours with 8 x stride anchors) | ours s | torchvision s | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['ours']:.3f} | {v['torchvision']:.3f} | {v['ratio']:.3f} |"
        for k, v in r["parts_s"].items()
    ]
    lines += [
        "",
        "Parameters (ours / torchvision): "
        + ", ".join(f"{k} {a:,} / {b:,}" for k, (a, b) in r["same_config"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
