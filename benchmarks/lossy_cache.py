"""AP cost of lossy cache dtypes on the demo dataset: float16 (reference), bfloat16, uint8.

    python benchmarks/lossy_cache.py [--work DIR] [--out benchmarks/results]

Each dtype gets its own cache (same views) and its own training run with the demo's settings;
eval runs the backbone on the validation images, so only training saw the lossy features.
Writes lossy_cache.json and lossy_cache.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_variants import dataset_paths, make_cache, train_and_score  # noqa: E402

from cachedet.atomic import write_json_atomic  # noqa: E402
from cachedet.bench import machine_info  # noqa: E402

DTYPES = ("float16", "bfloat16", "uint8")


def table(records: list[dict]) -> str:
    ref = next(r for r in records if r["dtype"] == "float16")
    lines = ["| cache dtype | KB per view (zstd) | vs float16 | box AP | ΔAP | AP50 |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['dtype']} | {r['bytes_per_view'] / 1e3:.1f} | {r['bytes_per_view'] / ref['bytes_per_view']:.2f}× | "
                     f"{r['AP']:.1f} | {r['AP'] - ref['AP']:+.1f} | {r['AP50']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="lossy_work")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    paths = dataset_paths(args.work)
    records = []
    for dtype in DTYPES:
        store, seconds, info = make_cache(args.work, paths, dtype=dtype)
        scores = train_and_score(args.work, f"dtype-{dtype}", paths, cache=store)
        records.append({"dtype": dtype, "codec": info["codec"], "bytes_per_view": info["bytes_per_view"],
                        "extract_seconds": seconds, **scores})
        print(records[-1], flush=True)
    write_json_atomic(os.path.join(args.out, "lossy_cache.json"), {"machine": machine_info(), "records": records})
    with open(os.path.join(args.out, "lossy_cache.md"), "w") as f:
        f.write("# AP cost of lossy cache dtypes (demo dataset, EfficientNet-Lite0, FPN + Faster R-CNN)\n\n"
                + table(records) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
