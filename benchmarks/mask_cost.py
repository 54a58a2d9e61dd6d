"""What instance masks cost: extraction with and without masks, their bytes, and a cached training
step with and without the mask head (Faster R-CNN and Cascade), in one run on one machine.

    python benchmarks/mask_cost.py [--device cpu|cuda] [--backbone efficientnet_lite0] [--size 320]
        [--batch 2] [--steps 12] [--tag cpu]

Writes benchmarks/results/mask_cost_<tag>.{json,md}. Step times are medians over the run's steps
(``metrics.jsonl``: the model's forward + backward + optimiser step, data already in hand). The
feed is timed on its own: the in-memory feed's batches (decoding the stored features and, with
masks, each object's RLE to a canvas mask), per batch, after the store is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from cachedet.backbones.backbone import BackboneConfig
from cachedet.cache.store import FeatureStore
from cachedet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from cachedet.data.views import AugmentConfig
from cachedet.engine.train import TrainConfig, train
from cachedet.extraction.run import ExtractConfig, extract

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def feed_per_batch(store: str, masks: bool, batch: int, batches: int, keep_float16: bool) -> float:
    """Seconds per batch of the in-memory feed (store already in RAM), with or without masks;
    ``keep_float16`` as training hands it out under CUDA autocast."""
    from itertools import islice

    from cachedet.cache.dataset import InMemoryViews, collate_views

    views = InMemoryViews(store, masks=masks, keep_float16=keep_float16)
    samples, t = iter(views), time.perf_counter()
    done = 0
    for _ in range(batches):
        chunk = list(islice(samples, batch))
        if not chunk:  # a new pass over the views
            samples = iter(views)
            chunk = list(islice(samples, batch))
        collate_views(chunk)
        done += 1
    return (time.perf_counter() - t) / done


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--heads", default="faster-rcnn,cascade")
    ap.add_argument("--work", default="/tmp/cachedet_mask_cost")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()

    data = os.path.join(args.work, "data")
    if not os.path.exists(os.path.join(data, "train.json")):
        make_synthetic_dataset(data, SyntheticSpec(num_train=args.images, num_val=4))
    backbone = BackboneConfig(args.backbone, None, args.weights)
    extraction = {}
    for masks in (False, True):
        cfg = ExtractConfig(
            annotations=os.path.join(data, "train.json"),
            images=data,
            out=os.path.join(args.work, f"masks-{masks}.zarr"),
            backbone=backbone,
            augment=AugmentConfig(size=args.size, scale_range=(0.5, 1.5), seed=0),
            views=1,
            shard_views=16,
            batch_size=8,
            device=args.device,
            masks=masks,
            overwrite=True,
        )
        extract(cfg, progress=False)  # warm-up: the first run pays for imports and kernel selection
        result = extract(cfg, progress=False)
        info = FeatureStore(cfg.out).info()
        extraction[f"masks={masks}"] = {
            "views_per_second": result.views_per_second,
            "views": result.num_views,
            "feature_bytes_per_view": info["bytes_features"] / info["views"],
            "mask_bytes_per_view": info["bytes_masks"] / info["views"],
            "objects_per_view": info["boxes"] / info["views"],
        }
    store = os.path.join(args.work, "masks-True.zarr")
    half = args.device.startswith("cuda")  # training keeps float16 features under CUDA autocast
    feed_seconds = {
        masks: feed_per_batch(store, masks, args.batch, args.steps, half) for masks in (False, True)
    }
    feed_float32 = feed_per_batch(store, False, args.batch, args.steps, False)
    training = {}
    for head in args.heads.split(","):
        for masks in (False, True):
            run = os.path.join(args.work, "runs", f"{head}-masks-{masks}")
            if os.path.exists(run):
                import shutil

                shutil.rmtree(run)
            result = train(
                TrainConfig.of(
                    out=run,
                    cache=store,
                    head=head,
                    masks=masks,
                    epochs=1,
                    batch_size=args.batch,
                    max_steps_per_epoch=args.steps,
                    warmup_steps=2,
                    in_memory=True,
                    device=args.device,
                    views_per_epoch=1,
                ),
                progress=False,
            )
            with open(os.path.join(run, "metrics.jsonl")) as f:
                steps = [json.loads(line) for line in f if line.strip()]
            training[f"{head} masks={masks}"] = {
                "head": head,
                "masks": masks,
                "steps": result.steps,
                "median_step_s": statistics.median(s["step_s"] for s in steps[2:] or steps),
                "feed_per_step_s": feed_seconds[masks],
            }
    for head in args.heads.split(","):
        a, b = training[f"{head} masks=False"], training[f"{head} masks=True"]
        b["step_ratio_vs_boxes"] = b["median_step_s"] / a["median_step_s"]
    ext = (
        extraction["masks=True"]["views_per_second"] / extraction["masks=False"]["views_per_second"]
    )
    record = {
        "machine": machine(args.device),
        "settings": vars(args),
        "extraction": extraction,
        "extraction_ratio_masks_vs_boxes": ext,
        "training": training,
        "feed": {
            "as_trained": "float16" if half else "float32",
            "float32_boxes_per_step_s": feed_float32,
        },
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"mask_cost_{args.tag}.json"), "w") as f:
        json.dump(record, f, indent=2)
    m = record["machine"]
    lines = [
        f"Instance masks: cost on {m.get('gpu', m['cpu'])} ({m['cores']} cores, torch {m['torch']}); backbone "
        f"`{args.backbone}`, canvas {args.size}, {extraction['masks=True']['views']} views, batch {args.batch}, "
        f"{args.steps} cached steps, torchvision-default heads (mask head 4 x 256).",
        "",
        "| extraction | views/s | feature bytes/view | mask bytes/view | objects/view |",
        "|---|---|---|---|---|",
    ]
    for k, e in extraction.items():
        lines.append(
            f"| {k} | {e['views_per_second']:.2f} | {e['feature_bytes_per_view'] / 1024:.1f} KB | "
            f"{e['mask_bytes_per_view'] / 1024:.2f} KB | {e['objects_per_view']:.1f} |"
        )
    lines += [
        "",
        f"Extraction with masks runs at {ext:.2f}x the views/s of boxes only.",
        "",
        "| head | masks | median step (s) | feed per step (s) | step vs boxes only |",
        "|---|---|---|---|---|",
    ]
    for t in training.values():
        ratio = f"{t['step_ratio_vs_boxes']:.2f}x" if "step_ratio_vs_boxes" in t else "1.00x"
        lines.append(
            f"| {t['head']} | {'yes' if t['masks'] else 'no'} | {t['median_step_s']:.3f} | "
            f"{t['feed_per_step_s']:.4f} | {ratio} |"
        )
    lines += [
        "",
        f"The feed hands out {'float16 (CUDA autocast)' if half else 'float32'} features; "
        f"decoded to float32 it takes {feed_float32:.4f} s per batch (boxes only).",
    ]
    with open(os.path.join(args.out, f"mask_cost_{args.tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
