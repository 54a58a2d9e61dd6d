"""How many cached views are worth their disk? AP on the demo dataset for K = 1, 2, 4, 8 cached
views, with and without Copy-Paste and feature crops, against online training (a fresh LSJ draw
every epoch) at the same number of steps; with each K's cache size and extraction time.

    python benchmarks/augment_study.py [--work DIR] [--out benchmarks/results] [--epochs 8] [--size 256]

Writes augment_study.json and augment_study.md. One seed per cell: read differences of about a
point as noise.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_variants import make_cache, median_step_seconds, study_setup, train_and_score  # noqa: E402

from cachedet.core.atomic import write_json_atomic  # noqa: E402
from cachedet.tools.bench import machine_info  # noqa: E402

VIEWS = (1, 2, 4, 8)
COPY_PASTE = 0.5


def table(records: list[dict], settings: dict) -> str:
    lines = [
        f"Demo dataset ({settings['train_images']} train / {settings['val_images']} val images), canvas "
        f"{settings['size']}, LSJ {settings['scale_range'][0]}–{settings['scale_range'][1]}, EfficientNet-Lite0 "
        f"(ImageNet), FPN + Faster R-CNN, {settings['epochs']} epochs = {settings['steps']} steps of batch "
        f"{settings['batch_size']} in every row. Copy-Paste probability {COPY_PASTE}; feature crops of 0.6–1.0 of the canvas.",
        "",
        "| source | views K | Copy-Paste | feature crop | box AP | AP50 | cache MB | extract s | median step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cache = f"{r['cache_bytes'] / 1e6:.1f}" if r.get("cache_bytes") else "-"
        extract_s = f"{r['extract_seconds']:.0f}" if r.get("extract_seconds") else "-"
        lines.append(
            f"| {r['source']} | {r['views'] or 'fresh'} | {'yes' if r['copy_paste'] else 'no'} | "
            f"{'yes' if r['feature_crop'] else 'no'} | {r['AP']:.1f} | {r['AP50']:.1f} | {cache} | {extract_s} | "
            f"{r['step_s_median']:.2f} |"
        )
    return "\n".join(lines)


def main():
    args, s, paths = study_setup("augment_work", __doc__)
    settings = {
        "train_images": s.data.num_train,
        "val_images": s.data.num_val,
        "size": s.size,
        "scale_range": list(s.scale_range),
        "epochs": s.epochs,
        "batch_size": s.batch_size,
        "steps": s.epochs * -(-s.data.num_train // s.batch_size),
    }
    records = []

    def save():
        write_json_atomic(
            os.path.join(args.out, "augment_study.json"),
            {"machine": machine_info(), "settings": settings, "records": records},
            indent=2,
        )
        with open(os.path.join(args.out, "augment_study.md"), "w") as f:
            f.write(
                "# Cached views, Copy-Paste and feature crops (measured)\n\n"
                + table(records, settings)
                + "\n"
            )

    # plain K sweep, the online reference, then Copy-Paste and feature crops (most telling first)
    cells = (
        [(k, False, False) for k in VIEWS]
        + ["online"]
        + [(k, True, False) for k in VIEWS]
        + [(k, False, True) for k in VIEWS]
    )
    for cell in cells:
        if cell == "online":
            scores = train_and_score(args.work, "online", paths, s, online=True)
            records.append(
                {
                    "source": "online (fresh LSJ)",
                    "views": None,
                    "copy_paste": False,
                    "feature_crop": False,
                    **scores,
                    "step_s_median": median_step_seconds(args.work, "online"),
                }
            )
        else:
            k, cp, crop = cell
            extract_kw = {"views": k, **({"copy_paste": COPY_PASTE} if cp else {})}
            store, seconds, info = make_cache(args.work, paths, s, **extract_kw)
            name = f"K{k}{'-cp' if cp else ''}{'-crop' if crop else ''}"
            scores = train_and_score(args.work, name, paths, s, cache=store, feature_crop=crop)
            records.append(
                {
                    "source": "cache",
                    "views": k,
                    "copy_paste": cp,
                    "feature_crop": crop,
                    "cache_bytes": info["bytes_features"],
                    "extract_seconds": seconds,
                    **scores,
                    "step_s_median": median_step_seconds(args.work, name),
                }
            )
        print(records[-1], flush=True)
        save()
    print(table(records, settings))


if __name__ == "__main__":
    main()
