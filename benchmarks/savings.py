"""Compute savings of the cache, measured: every regime in one run, then a sweep over backbones.

    python benchmarks/savings.py [--quick] [--device cpu|cuda] [--out benchmarks/results]

Writes savings.json (records, stages, machine), savings.md and savings.png. Headline:
Faster R-CNN R50-FPN at 512x512, batch 2, the same detector as torchvision's
fasterrcnn_resnet50_fpn (FPN on c2-c5, 2-FC box head), against torchvision itself; and RetinaNet
R50-FPN (c3-c5 + P6/P7) against retinanet_resnet50_fpn. Sweep:
Faster R-CNN on backbones of growing size, to show how the savings follow the backbone's share
of a step's compute: FPN on c3-c5 for the CNNs, ViTDet's simple pyramid (P2-P6) on the last
block for the plain ViTs (random init: timing does not depend on the weights).

    python benchmarks/savings.py --only vit_small_patch16_224,vit_base_patch16_224

re-measures only the named sweep backbones and keeps everything else of the existing savings.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cachedet.tools.bench import (  # noqa: E402
    ADAPTER_REGIMES,
    OUR_REGIMES,
    TORCHVISION_REGIMES,
    BenchConfig,
    decode_speeds,
    machine_info,
    run_benchmark,
)

SWEEP = (
    "resnet18",
    "resnet50",
    "resnet101",
    "efficientnet_b0",
    "efficientnet_b3",
    "convnext_tiny",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
)
SWEEP_REGIMES = ("finetune", "online_frozen", "cached", "heads_in_memory")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sweep-size", type=int, default=320)
    ap.add_argument("--sweep-steps", type=int, default=3)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument(
        "--keep-sweep",
        action="store_true",
        help="re-measure the headline configurations only; keep the sweep of the existing savings.json",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated sweep backbones to re-measure; keep the rest of savings.json",
    )
    ap.add_argument(
        "--note",
        default=None,
        help="a remark on the machine stored with the new records (e.g. a shared CPU)",
    )
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    args = ap.parse_args()
    if args.only:
        return remeasure_sweep(args)

    headline = run_benchmark(
        BenchConfig(
            size=args.size,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
        ),
        regimes=OUR_REGIMES + TORCHVISION_REGIMES + ADAPTER_REGIMES,
    )
    retinanet = run_benchmark(
        BenchConfig(
            head="retinanet",
            out_indices=(2, 3, 4),
            options={},
            size=args.size,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            device=args.device,
        )
    )
    headline["codecs"] = decode_speeds(
        os.path.join(headline["config"]["workdir"], "bench.zarr"), headline["config"]["workdir"]
    )
    machine = machine_info()
    os.makedirs(args.out, exist_ok=True)
    sweep = []
    if args.keep_sweep:  # the sweep's ratios are internal to its own run, so they stay valid
        with open(os.path.join(args.out, "savings.json")) as f:
            old = json.load(f)
        for s in old["sweep"]:
            s["records"] = [
                r
                for r in old["records"]
                if r["backbone"] == s["config"]["backbone"] and r["size"] == s["config"]["size"]
            ]
            sweep.append(s)

    def save():
        records = (
            headline["records"] + retinanet["records"] + [r for s in sweep for r in s["records"]]
        )
        for r in records:
            r["machine"] = machine
        result = {
            "machine": machine,
            "records": records,
            "headline": {
                "config": headline["config"],
                "stages": headline["stages"],
                "codecs": headline["codecs"],
            },
            "retinanet": {"config": retinanet["config"], "stages": retinanet["stages"]},
            "sweep": [{"config": s["config"], "stages": s["stages"]} for s in sweep],
        }
        with open(os.path.join(args.out, "savings.json"), "w") as f:
            json.dump(result, f, indent=2)
        return result

    result = save()  # the headline is kept even if the sweep is interrupted
    if not (args.no_sweep or args.keep_sweep):
        for name in SWEEP:
            sweep.append(sweep_entry(name, args))
            result = save()
    from benchmarks_report import write_report

    write_report(result, args.out)


def sweep_entry(name: str, args) -> dict:
    return run_benchmark(
        BenchConfig(
            backbone=name,
            out_indices=None,
            size=args.sweep_size,
            batch=args.batch,
            steps=args.sweep_steps,
            warmup=1,
            device=args.device,
        ),
        regimes=SWEEP_REGIMES,
    )


def remeasure_sweep(args):
    """Measure the --only backbones and put them into the existing savings.json, in SWEEP order."""
    from benchmarks_report import write_report

    path = os.path.join(args.out, "savings.json")
    with open(path) as f:
        result = json.load(f)
    names = [n for n in args.only.split(",") if n]
    machine = {**machine_info(), **({"note": args.note} if args.note else {})}
    fresh = {}
    for name in names:
        fresh[name] = sweep_entry(name, args)
        for r in fresh[name]["records"]:
            r["machine"] = machine
    kept = [s for s in result["sweep"] if s["config"]["backbone"] not in fresh]
    sweep = kept + [
        {"config": s["config"], "stages": s["stages"], "machine": machine} for s in fresh.values()
    ]
    result["sweep"] = sorted(
        sweep,
        key=lambda s: (
            SWEEP.index(s["config"]["backbone"]) if s["config"]["backbone"] in SWEEP else len(SWEEP)
        ),
    )
    result["records"] = [r for r in result["records"] if r["backbone"] not in fresh] + [
        r for s in fresh.values() for r in s["records"]
    ]
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    write_report(result, args.out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
