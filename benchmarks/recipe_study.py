"""Which defaults win at the user's schedule? On the demo's generated dataset (reduced: small canvas,
few images), box AP of FPN + Faster R-CNN heads trained from the cache for:

  * jitter range (0.1-2.0, 0.5-1.5, 0.8-1.25) x cached views (1, 4) x schedule (short, 4x longer);
  * box head: 2-FC against 4conv1fc, at equal steps and at equal wall time;
  * warm-up: the old fixed 100 steps against the rule min(1000 steps, 5% of the run);
  * backbone: EfficientNet-Lite0 / Lite1 / Lite2 (offline ImageNet weights), AP, extraction and step time.

Every cell runs with 2 training seeds (initial weights and batch order; the cache is shared) so that
the spread is visible. Results are written after every run, so a stopped study keeps what it measured;
reruns resume.

    nice -n 10 python benchmarks/recipe_study.py [--work recipe_work] [--out benchmarks/results]
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_variants import dataset_paths, make_cache, median_step_seconds, train_and_score  # noqa: E402

from cachedet.atomic import write_json_atomic  # noqa: E402
from cachedet.bench import machine_info  # noqa: E402
from cachedet.data.synthetic import SyntheticSpec  # noqa: E402
from cachedet.demo import QUICK  # noqa: E402

RANGES = ((0.1, 2.0), (0.5, 1.5), (0.8, 1.25))
VIEWS = (1, 4)
SEEDS = (0, 1)
SHORT_EPOCHS, LONG_FACTOR = 2, 4
BASE = {"range": (0.8, 1.25), "views": 4}  # cache of the head / warm-up / backbone comparisons
TWO_FC = {"box_convs": 0, "box_fcs": 2}
FOUR_CONV = {"box_convs": 4, "box_fcs": 1}
SETTINGS = replace(
    QUICK,
    data=SyntheticSpec(num_train=64, num_val=32, min_side=112, max_side=176, max_objects=4),
    size=128,
    epochs=SHORT_EPOCHS,
    batch_size=4,
    lr=0.02,
    neck_channels=64,
    head_options={
        "box_representation": 128,
        "rois_per_image": 32,
        "proposals_per_image": 100,
        **TWO_FC,
    },
)


def steps_of(epochs: int) -> int:
    return epochs * -(-SETTINGS.data.num_train // SETTINGS.batch_size)


def warmup_rule(total_steps: int) -> int:
    from cachedet.recipes import warmup_steps_for

    return warmup_steps_for(total_steps)


def run_cell(
    work: str,
    paths: dict,
    records: list,
    save,
    *,
    part: str,
    rng=BASE["range"],
    views=BASE["views"],
    epochs=SHORT_EPOCHS,
    seed=0,
    head=TWO_FC,
    warmup=None,
    backbone="efficientnet_lite0",
) -> dict:
    """Train and score one cell (cache and run reused when another cell shares them); append its record."""
    store, extract_s, info = make_cache(
        work, paths, SETTINGS, views=views, scale_range=tuple(rng), backbone=backbone, masks=False
    )
    total = steps_of(epochs)
    warmup_steps = warmup_rule(total) if warmup is None else warmup
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


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="recipe_work")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    args = ap.parse_args()
    paths = dataset_paths(args.work, SETTINGS)
    settings = {
        "train_images": SETTINGS.data.num_train,
        "val_images": SETTINGS.data.num_val,
        "size": SETTINGS.size,
        "batch_size": SETTINGS.batch_size,
        "lr": SETTINGS.lr,
        "neck_channels": SETTINGS.neck_channels,
        "head_options": SETTINGS.head_options,
        "short_epochs": SHORT_EPOCHS,
        "long_epochs": SHORT_EPOCHS * LONG_FACTOR,
        "short_steps": steps_of(SHORT_EPOCHS),
        "long_steps": steps_of(SHORT_EPOCHS * LONG_FACTOR),
        "seeds": list(SEEDS),
    }
    records: list[dict] = []

    def save():
        from recipe_report import report

        write_json_atomic(
            os.path.join(args.out, "recipe_study.json"),
            {"machine": machine_info(), "settings": settings, "records": records},
            indent=2,
        )
        with open(os.path.join(args.out, "recipe_study.md"), "w") as f:
            f.write(report(records, settings, machine_info()))

    cell = lambda **kw: run_cell(args.work, paths, records, save, **kw)  # noqa: E731
    # most telling first, one seed at a time: the default's neighbours (4 views, short schedule), the
    # box heads and the warm-up, 1 view; then the backbones and the long schedule
    for seed in SEEDS:
        for rng in RANGES:
            cell(part="grid", rng=rng, views=BASE["views"], seed=seed)
        two = records[-1]  # the 2-FC head at BASE (RANGES ends with BASE's range)
        four = cell(part="head-equal-steps", head=FOUR_CONV, seed=seed)
        equal_time = max(
            SHORT_EPOCHS, round(SHORT_EPOCHS * four["step_s_median"] / two["step_s_median"])
        )
        cell(part="head-equal-time", epochs=equal_time, seed=seed)
        cell(part="warmup-fixed-100", warmup=100, seed=seed)
        for rng in RANGES:
            cell(part="grid", rng=rng, views=1, seed=seed)
    for backbone in ("efficientnet_lite1", "efficientnet_lite2"):
        for seed in SEEDS:
            cell(part="backbone", backbone=backbone, seed=seed)
    for k in reversed(VIEWS):  # the long schedule last, 4 views (the default) first
        for seed in SEEDS:
            for rng in RANGES:
                cell(part="grid", rng=rng, views=k, epochs=SHORT_EPOCHS * LONG_FACTOR, seed=seed)


if __name__ == "__main__":
    main()
