"""Extraction throughput with 1, 2 and 4 local dask worker processes (and in-process), measured.

    python benchmarks/extract_scaling.py [--images 48] [--size 320] [--backbone resnet50]

Each setting extracts the same views into a fresh store. views/s counts the shard work's wall
time (after the cluster is up and, in-process, after the backbone is built); the total includes
starting the cluster. Writes extract_scaling.json and extract_scaling.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cachedet.backbones.backbone import BackboneConfig  # noqa: E402
from cachedet.core.atomic import write_json_atomic  # noqa: E402
from cachedet.data.synthetic import SyntheticSpec, make_synthetic_dataset  # noqa: E402
from cachedet.data.views import AugmentConfig  # noqa: E402
from cachedet.extraction.run import ExtractConfig, extract  # noqa: E402
from cachedet.tools.bench import machine_info  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="cachedet-scaling-")
    data = make_synthetic_dataset(
        os.path.join(work, "data"),
        SyntheticSpec(
            num_train=args.images, num_val=1, min_side=int(args.size * 0.75), max_side=args.size
        ),
    )
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        cfg = ExtractConfig(
            annotations=data["train"],
            images=data["images"],
            out=os.path.join(work, f"w{workers}.zarr"),
            backbone=BackboneConfig(args.backbone, None, "random"),
            augment=AugmentConfig(size=args.size, seed=0),
            views=1,
            shard_views=4,
            batch_size=4,
            workers=workers,
            device="cpu",
        )
        r = extract(cfg, progress=False)
        rows.append(
            {
                "workers": workers,
                "mode": "in-process" if workers == 0 else f"LocalCluster({workers})",
                "views": r.views_run,
                "views_per_s": r.views_per_second,
                "shard_seconds": r.shard_seconds,
                "total_seconds": r.seconds,
            }
        )
        print(rows[-1], flush=True)
    base = (
        next(r for r in rows if r["workers"] == 1)
        if any(r["workers"] == 1 for r in rows)
        else rows[0]
    )
    machine = machine_info()
    result = {"machine": machine, "config": vars(args), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "extract_scaling.json"), result, indent=2)
    lines = [
        f"Extraction scaling: {args.backbone} (random init), {args.images} views at {args.size}x{args.size}, "
        f"shards of 4 views, on {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}.",
        "",
        "| workers | views/s (shard work) | vs 1 worker | total s (incl. cluster start) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['views_per_s']:.2f} | {r['views_per_s'] / base['views_per_s']:.2f}x | {r['total_seconds']:.1f} |"
        )
    with open(os.path.join(args.out, "extract_scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
