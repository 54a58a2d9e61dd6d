"""Which defaults win at the user's schedule? On the demo's generated dataset (reduced: small canvas,
few images), box AP of FPN + Faster R-CNN heads trained from the cache, with the library's default
learning rate (SGD 0.02 x batch / 16), for:

  * jitter range (0.1-2.0, 0.5-1.5, 0.8-1.25) x cached views (1, 4) x schedule (short, 4x longer),
    2-FC box head;
  * box head: 4conv1fc (the paper's Table 3) against the 2-FC head, at equal steps and at equal
    wall time (the 2-FC head given the steps that fit in 4conv1fc's time), short and long;
  * the paper recipe as a whole (LSJ 0.1-2.0 + 4conv1fc) against the short recipe, same steps;
  * warm-up: the old fixed 100 steps against the rule min(1000 steps, 5% of the run);
  * backbone: EfficientNet-Lite0 / Lite1 / Lite2 (offline ImageNet weights): AP, extraction and
    step time.

Every cell runs with 2 training seeds (initial weights and batch order; the caches are shared) so
that the spread is visible. Each process trains with one thread; run one process per seed to use
two cores. Records go to WORK/records-s<seed>.json after every cell (a stopped study keeps what it
measured; reruns skip finished runs) and every save merges all of them into
benchmarks/results/recipe_study.{json,md}.

    nice -n 10 python benchmarks/recipe_study.py --seeds 0 &
    nice -n 10 python benchmarks/recipe_study.py --seeds 1
    python benchmarks/recipe_study.py --backbone-times   # each backbone's forward pass, on an idle core
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_variants import dataset_paths, make_cache, median_step_seconds, train_and_score  # noqa: E402

from cachedet.core.atomic import write_bytes_atomic, write_json_atomic  # noqa: E402
from cachedet.core.recipes import warmup_steps_for  # noqa: E402
from cachedet.data.synthetic import SyntheticSpec  # noqa: E402
from cachedet.tools.bench import machine_info  # noqa: E402
from cachedet.tools.demo import QUICK  # noqa: E402

RANGES = ((0.1, 2.0), (0.5, 1.5), (0.8, 1.25))
VIEWS = (1, 4)
SEEDS = (0, 1)
SHORT_EPOCHS, LONG_FACTOR = 12, 4
LONG_EPOCHS = SHORT_EPOCHS * LONG_FACTOR
SHORT_RANGE, PAPER_RANGE = (0.8, 1.25), (0.1, 2.0)
BASE_VIEWS = 4  # views of the cache the head / recipe / warm-up / backbone comparisons train on
TWO_FC = {"box_convs": 0, "box_fcs": 2}
FOUR_CONV = {"box_convs": 4, "box_fcs": 1}
SETTINGS = replace(
    QUICK,
    data=SyntheticSpec(num_train=96, num_val=48, min_side=128, max_side=192, max_objects=4),
    size=160,
    epochs=SHORT_EPOCHS,
    batch_size=4,
    lr=None,  # the library's default: 0.02 x batch / 16
    neck_channels=64,
    head_options={
        "box_representation": 128,
        "rois_per_image": 64,
        "proposals_per_image": 100,
        **TWO_FC,
    },
)
THREADS = 1


def steps_of(epochs: int) -> int:
    return epochs * -(-SETTINGS.data.num_train // SETTINGS.batch_size)


@contextlib.contextmanager
def locked(work: str):
    """An exclusive lock on WORK between the study's processes (caches and data are shared)."""
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_cell(
    work: str,
    paths: dict,
    records: list,
    save,
    *,
    part: str,
    seconds: dict | None = None,
    rng=SHORT_RANGE,
    views=BASE_VIEWS,
    epochs=SHORT_EPOCHS,
    seed=0,
    head=TWO_FC,
    warmup=None,
    backbone="efficientnet_lite0",
    schedule=None,
) -> dict:
    """Train and score one cell (cache and run reused when another cell shares them); append its
    record. ``seconds`` instead records interleaved step times (part "step-time")."""
    if seconds is not None:
        records.append({"part": part, "seed": seed, "step_s": seconds, "threads": THREADS})
        save()
        return records[-1]
    with locked(work):  # the other seed's process may be extracting the same cache
        store, extract_s, info = make_cache(
            work,
            paths,
            SETTINGS,
            views=views,
            scale_range=tuple(rng),
            backbone=backbone,
            masks=False,
        )
    total = steps_of(epochs)
    warmup_steps = warmup_steps_for(total) if warmup is None else warmup
    name = (
        f"{backbone}-r{rng[0]}-{rng[1]}-K{views}-E{epochs}-c{head['box_convs']}f{head['box_fcs']}"
        f"-w{warmup_steps}-s{seed}"
    )
    scores = train_and_score(
        work,
        name,
        paths,
        SETTINGS,
        cache=store,
        seed=seed,
        epochs=epochs,
        warmup_steps=warmup_steps,
        detector_options={**SETTINGS.head_options, **head},
    )
    record = {
        "part": part,
        "backbone": backbone,
        "scale_range": list(rng),
        "views": views,
        "epochs": epochs,
        "schedule": schedule or ("short" if epochs == SHORT_EPOCHS else "long"),
        "steps": total,
        "seed": seed,
        "box_head": f"{head['box_convs']}conv{head['box_fcs']}fc",
        "warmup_steps": warmup_steps,
        "extract_seconds": extract_s,
        "bytes_per_view": info["bytes_features"] / info["views"],
        **scores,
        "step_s_median": median_step_seconds(work, name),
    }
    records.append(record)
    print(record, flush=True)
    save()
    return record


def step_seconds(store: str, heads: dict[str, dict], steps: int = 30, warmup: int = 3) -> dict:
    """{name: median seconds} of a training step (forward, backward, SGD) of FPN + Faster R-CNN with
    each box head, on one batch of the store's features; the heads run in turn at every step, so
    load drifts hit both alike (the equal-wall-time cells use the ratio of these medians)."""
    import torch
    from heads_vs_torchvision import interleaved

    from cachedet.cache.store import StoreReader
    from cachedet.models.detector import DetectorConfig, build_detector

    reader = StoreReader(store)
    n = SETTINGS.batch_size
    feats = {k: torch.from_numpy(v) for k, v in reader.read_features(0, n).items()}
    targets = []
    for view in range(n):
        boxes, labels = reader.boxes(view)
        targets.append(
            {"boxes": torch.from_numpy(boxes.copy()), "labels": torch.from_numpy(labels.copy())}
        )
    steps_of_head = {}
    for name, head in heads.items():
        torch.manual_seed(0)
        cfg = DetectorConfig(
            len(reader.header.categories),
            reader.header.canvas,
            tuple(reader.specs),
            "fpn",
            "faster-rcnn",
            SETTINGS.neck_channels,
            {**SETTINGS.head_options, **head},
        )
        det = build_detector(cfg).train()
        opt = torch.optim.SGD(det.parameters(), lr=1e-3, momentum=0.9)

        def step(det=det, opt=opt):
            opt.zero_grad()
            sum(det(feats, targets).values()).backward()
            opt.step()

        steps_of_head[name] = step
    return interleaved(steps_of_head, warmup, steps)


BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def backbone_times(records: list, save, reps: int = 10):
    """Per backbone, the frozen forward pass on one training batch (what ``--online`` adds to every
    cached step), 1 thread: part "backbone-time"."""
    from cachedet.tools.bench import BenchConfig, backbone_forward_views_per_s

    for name in BACKBONES:
        cfg = BenchConfig(
            backbone=name, out_indices=None, size=SETTINGS.size, batch=SETTINGS.batch_size
        )
        views_per_s, flops = backbone_forward_views_per_s(cfg, reps)
        records.append(
            {
                "part": "backbone-time",
                "backbone": name,
                "forward_s_per_batch": SETTINGS.batch_size / views_per_s,
                "gflops_per_view": flops / 1e9,
                "threads": THREADS,
            }
        )
        save()


def study_settings() -> dict:
    return {
        "train_images": SETTINGS.data.num_train,
        "val_images": SETTINGS.data.num_val,
        "size": SETTINGS.size,
        "batch_size": SETTINGS.batch_size,
        "lr": 0.02 * SETTINGS.batch_size / 16,
        "neck_channels": SETTINGS.neck_channels,
        "head_options": SETTINGS.head_options,
        "short_epochs": SHORT_EPOCHS,
        "long_epochs": LONG_EPOCHS,
        "short_steps": steps_of(SHORT_EPOCHS),
        "long_steps": steps_of(LONG_EPOCHS),
        "seeds": list(SEEDS),
        "threads_per_run": THREADS,
    }


def saver(work: str, out: str, records: list, part: str):
    """save(): this process's records to WORK/records-<part>.json, then every process's records
    merged into OUT/recipe_study.{json,md}."""

    def save():
        from recipe_report import report

        write_json_atomic(os.path.join(work, f"records-{part}.json"), records, indent=1)
        merged = []
        for path in sorted(glob.glob(os.path.join(work, "records-*.json"))):
            with open(path) as f:
                merged.extend(json.load(f))
        settings, machine = study_settings(), machine_info()
        doc = {"machine": machine, "settings": settings, "records": merged}
        write_json_atomic(os.path.join(out, "recipe_study.json"), doc, indent=2)
        text = report(merged, settings, machine)
        write_bytes_atomic(os.path.join(out, "recipe_study.md"), text.encode())

    return save


def study_seed(cell, work: str, paths: dict, seed: int):
    """All cells of one seed, the most telling first: the default's neighbours and the heads on
    the short schedule, then 1 view, the backbones, and the long schedule."""
    for rng in RANGES:
        cell(part="grid", rng=rng, seed=seed)
    store, _, _ = make_cache(
        work, paths, SETTINGS, views=BASE_VIEWS, scale_range=SHORT_RANGE, masks=False
    )  # extracted for the grid above
    seconds = step_seconds(store, {"2fc": TWO_FC, "4conv1fc": FOUR_CONV})
    ratio = seconds["4conv1fc"] / seconds["2fc"]
    cell(part="step-time", seconds=seconds, seed=seed)
    for epochs in (SHORT_EPOCHS, LONG_EPOCHS):
        if epochs == LONG_EPOCHS:  # the long grid's 2-FC cell on the base cache
            cell(part="grid", epochs=epochs, seed=seed)
        cell(part="head-equal-steps", head=FOUR_CONV, epochs=epochs, seed=seed)
        sched = "short" if epochs == SHORT_EPOCHS else "long"
        equal_time = max(epochs, round(epochs * ratio))
        cell(part="head-equal-time", epochs=equal_time, schedule=sched, seed=seed)
        cell(part="recipe-paper", rng=PAPER_RANGE, head=FOUR_CONV, epochs=epochs, seed=seed)
        if epochs == SHORT_EPOCHS:
            cell(part="warmup-fixed-100", warmup=100, seed=seed)
            for rng in RANGES:
                cell(part="grid", rng=rng, views=1, seed=seed)
            for backbone in ("efficientnet_lite1", "efficientnet_lite2"):
                cell(part="backbone", backbone=backbone, seed=seed)
    for k in reversed(VIEWS):
        for rng in RANGES:
            if (k, rng) == (BASE_VIEWS, SHORT_RANGE):
                continue  # ran before the long head comparison
            cell(part="grid", rng=rng, views=k, epochs=LONG_EPOCHS, seed=seed)


def main():
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="recipe_work")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument(
        "--backbone-times", action="store_true", help="only time each backbone's forward pass"
    )
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    with locked(args.work):
        paths = dataset_paths(args.work, SETTINGS)
    if args.backbone_times:
        records: list[dict] = []
        backbone_times(records, saver(args.work, args.out, records, "backbones"))
        return
    for seed in args.seeds:
        records = []
        save = saver(args.work, args.out, records, f"s{seed}")
        cell = lambda **kw: run_cell(args.work, paths, records, save, **kw)  # noqa: E731
        study_seed(cell, args.work, paths, seed)


if __name__ == "__main__":
    main()
