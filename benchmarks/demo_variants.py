"""Train and score variants of the demo pipeline on its generated dataset (for the AP studies).

Each variant = one cache (extract settings) + one training run (train settings), then eval on the
validation images through the backbone. Caches are keyed by their extract settings and shared
between variants; runs and caches resume when a study is rerun. Records hold AP, AP50, extraction
and training seconds, and the cache's bytes per view.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from cachedet.api import evaluate
from cachedet.backbones.backbone import BackboneConfig
from cachedet.cache.store import FeatureStore
from cachedet.data.synthetic import make_synthetic_dataset
from cachedet.data.views import AugmentConfig
from cachedet.engine.train import TrainConfig, train
from cachedet.extraction.run import ExtractConfig, extract
from cachedet.tools.demo import FULL, DemoSettings

BACKBONE = BackboneConfig("efficientnet_lite0", None, "default")


def dataset_paths(root: str, s: DemoSettings = FULL) -> dict:
    data_dir = os.path.join(root, "data")
    if not os.path.exists(os.path.join(data_dir, "val.json")):
        make_synthetic_dataset(data_dir, s.data)
    return {
        "train": os.path.join(data_dir, "train.json"),
        "val": os.path.join(data_dir, "val.json"),
        "images": data_dir,
    }


def _key(d: dict) -> str:
    return "_".join(f"{k}-{v}" for k, v in sorted(d.items())) or "default"


def make_cache(
    root: str, paths: dict, s: DemoSettings = FULL, **extract_kw
) -> tuple[str, float, dict]:
    """Extract (or resume) the cache for ``extract_kw`` (ExtractConfig fields, plus AugmentConfig
    fields such as ``copy_paste`` or ``scale_range``); return (store url, extraction seconds, cache-info)."""
    aug_kw = {
        k: extract_kw.pop(k) for k in list(extract_kw) if k in AugmentConfig.__dataclass_fields__
    }
    store = os.path.join(root, "caches", _key({**extract_kw, **aug_kw}) + ".zarr")
    backbone = (
        BackboneConfig(extract_kw.pop("backbone"), None, "default")
        if "backbone" in extract_kw
        else BACKBONE
    )
    timing_file = store + ".seconds"
    cfg = ExtractConfig(
        annotations=paths["train"],
        images=paths["images"],
        out=store,
        backbone=backbone,
        augment=AugmentConfig(
            **{"size": s.size, "scale_range": s.scale_range, "seed": 0, **aug_kw}
        ),
        views=extract_kw.pop("views", s.views),
        shard_views=32,
        batch_size=8,
        **extract_kw,
    )
    if not os.path.exists(timing_file):
        t = time.perf_counter()
        extract(cfg, progress=False)
        with open(timing_file, "w") as f:
            f.write(str(time.perf_counter() - t))
    with open(timing_file) as f:
        seconds = float(f.read())
    return store, seconds, FeatureStore(store).info()


def train_and_score(
    root: str, name: str, paths: dict, s: DemoSettings = FULL, cache: str | None = None, **train_kw
) -> dict:
    """Train a run (from ``cache``, or online when ``train_kw['online']``) and score it on val."""
    run = os.path.join(root, "runs", name)
    metrics_file = os.path.join(run, "metrics_val.json")
    if os.path.exists(metrics_file):
        with open(metrics_file) as f:
            return json.load(f)
    online = train_kw.get("online", False)
    cfg = TrainConfig.of(
        out=run,
        cache=None if online else cache,
        epochs=s.epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        neck_channels=s.neck_channels,
        detector_options=dict(s.head_options),
        in_memory=not online,
        resume=os.path.exists(os.path.join(run, "checkpoints", "last.pt")),
    )
    if online:
        train_kw = {
            "annotations": paths["train"],
            "images": paths["images"],
            "backbone": BACKBONE.name,
            "weights": BACKBONE.weights,
            "size": s.size,
            "scale_range": s.scale_range,
            **train_kw,
        }
    cfg = cfg.with_settings(**train_kw)
    t = time.perf_counter()
    train(cfg, progress=False)
    seconds = time.perf_counter() - t
    metrics, _ = evaluate(
        run,
        paths["val"],
        paths["images"],
        train_annotations=paths["train"],
        count_bins=s.count_bins,
        progress=False,
    )
    out = {"AP": metrics["bbox"]["AP"], "AP50": metrics["bbox"]["AP50"], "train_seconds": seconds}
    with open(metrics_file, "w") as f:
        json.dump(out, f)
    return out


def median_step_seconds(root: str, name: str) -> float:
    """Median training step time of a run, from its metrics.jsonl (robust to pauses and restarts)."""
    with open(os.path.join(root, "runs", name, "metrics.jsonl")) as f:
        return statistics.median(json.loads(line)["step_s"] for line in f if line.strip())


def study_setup(default_work: str, doc: str | None = None, reduced: bool = True, add_args=None):
    """Parse a study's --work/--out (and, for the reduced setting, --epochs/--size; ``add_args(parser)``
    adds the study's own); return (args, demo settings, dataset paths)."""
    import argparse
    from dataclasses import replace

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--work", default=default_work)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    if reduced:
        ap.add_argument("--epochs", type=int, default=8)
        ap.add_argument("--size", type=int, default=256)
    if add_args:
        add_args(ap)
    args = ap.parse_args()
    s = replace(FULL, epochs=args.epochs, size=args.size) if reduced else FULL
    return args, s, dataset_paths(args.work, s)
