"""AP cost of lossy cache dtypes on the demo dataset: float16 (reference), bfloat16, uint8.

    python benchmarks/lossy_cache.py [--work DIR] [--out benchmarks/results]

Each dtype gets its own cache (same views) and its own training run with the demo's settings;
eval runs the backbone on the validation images, so only training saw the lossy features. A second
float16 run with another seed shows the run-to-run spread. Then the float16-trained heads are
scored from a validation cache of each dtype: the same weights, so the AP differences there come
from the stored features alone. Writes lossy_cache.json and lossy_cache.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_variants import BACKBONE, make_cache, study_setup, train_and_score  # noqa: E402

from cachedet.api import evaluate  # noqa: E402
from cachedet.core.atomic import write_json_atomic  # noqa: E402
from cachedet.data.views import AugmentConfig  # noqa: E402
from cachedet.extraction.run import ExtractConfig, extract  # noqa: E402
from cachedet.tools.bench import machine_info  # noqa: E402
from cachedet.tools.demo import FULL  # noqa: E402

DTYPES = ("float16", "bfloat16", "uint8")


def table(records: list[dict]) -> str:
    ref = next(r for r in records if r["dtype"] == "float16")
    lines = [
        "| cache dtype (training) | seed | KB per view (zstd) | vs float16 | box AP | ΔAP | AP50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['dtype']} | {r['seed']} | {r['bytes_per_view'] / 1e3:.1f} | {r['bytes_per_view'] / ref['bytes_per_view']:.2f}× | "
            f"{r['AP']:.1f} | {r['AP'] - ref['AP']:+.1f} | {r['AP50']:.1f} |"
        )
    return "\n".join(lines)


def inference_table(rows: list[dict]) -> str:
    ref = next(r for r in rows if r["dtype"] == "float32")
    lines = ["| validation cache dtype | box AP | ΔAP vs float32 | AP50 |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['AP']:.2f} | {r['AP'] - ref['AP']:+.2f} | {r['AP50']:.2f} |"
        )
    return "\n".join(lines)


def score_from_val_caches(work: str, paths: dict, run: str) -> list[dict]:
    rows = []
    for dtype in ("float32",) + DTYPES:
        store = os.path.join(work, "caches", f"val-{dtype}.zarr")
        extract(
            ExtractConfig(
                annotations=paths["val"],
                images=paths["images"],
                out=store,
                backbone=BACKBONE,
                augment=AugmentConfig(size=FULL.size, augment=False),
                views=1,
                dtype=dtype,
                shard_views=32,
            ),
            progress=False,
        )
        metrics, _ = evaluate(run, paths["val"], cache=store, progress=False)
        rows.append({"dtype": dtype, "AP": metrics["bbox"]["AP"], "AP50": metrics["bbox"]["AP50"]})
        print(rows[-1], flush=True)
    return rows


def main():
    args, _, paths = study_setup(
        "lossy_work",
        __doc__,
        reduced=False,
        add_args=lambda ap: ap.add_argument(
            "--no-seed-run", action="store_true", help="skip the second float16 seed (the spread)"
        ),
    )
    records = []
    for dtype, seed in [(d, 0) for d in DTYPES] + ([] if args.no_seed_run else [("float16", 1)]):
        store, seconds, info = make_cache(args.work, paths, dtype=dtype)
        scores = train_and_score(
            args.work,
            f"dtype-{dtype}" + (f"-seed{seed}" if seed else ""),
            paths,
            cache=store,
            seed=seed,
        )
        records.append(
            {
                "dtype": dtype,
                "seed": seed,
                "codec": info["codec"],
                "bytes_per_view": info["bytes_per_view"],
                "extract_seconds": seconds,
                **scores,
            }
        )
        print(records[-1], flush=True)
    inference = score_from_val_caches(
        args.work, paths, os.path.join(args.work, "runs", "dtype-float16")
    )
    write_json_atomic(
        os.path.join(args.out, "lossy_cache.json"),
        {"machine": machine_info(), "records": records, "inference_from_val_caches": inference},
        indent=2,
    )
    text = (
        "# AP cost of lossy cache dtypes (demo dataset, EfficientNet-Lite0, FPN + Faster R-CNN)\n\n"
        "Training from a cache of each dtype (eval from images):\n\n" + table(records) + "\n\n"
        "The float16-trained heads, scored from a validation cache of each dtype (same weights):\n\n"
        + inference_table(inference)
        + "\n"
    )
    with open(os.path.join(args.out, "lossy_cache.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
