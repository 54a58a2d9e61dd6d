"""Compute savings of the cache, measured: every regime in one run, then a sweep over backbones.

    python benchmarks/savings.py [--quick] [--device cpu|cuda] [--out benchmarks/results]

Writes savings.json (records, stages, machine), savings.md and savings.png. Headline:
Faster R-CNN R50-FPN at 512x512, batch 2, the same detector as torchvision's
fasterrcnn_resnet50_fpn (FPN on c2-c5, 2-FC box head), against torchvision itself; and RetinaNet
R50-FPN (c3-c5 + P6/P7) against retinanet_resnet50_fpn. Sweep:
FPN + Faster R-CNN (c3-c5) on backbones of growing size, to show how the savings follow the
backbone's share of a step's compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cachedet.bench import (  # noqa: E402
    ADAPTER_REGIMES, OUR_REGIMES, TORCHVISION_REGIMES, BenchConfig, decode_speeds, machine_info, run_benchmark,
)

SWEEP = ("resnet18", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b3", "convnext_tiny")
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
    ap.add_argument("--keep-sweep", action="store_true",
                    help="re-measure the headline configurations only; keep the sweep of the existing savings.json")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    headline = run_benchmark(BenchConfig(size=args.size, batch=args.batch, steps=args.steps, warmup=args.warmup,
                                         device=args.device), regimes=OUR_REGIMES + TORCHVISION_REGIMES + ADAPTER_REGIMES)
    retinanet = run_benchmark(BenchConfig(head="retinanet", out_indices=(2, 3, 4), options={}, size=args.size,
                                          batch=args.batch, steps=args.steps, warmup=args.warmup, device=args.device))
    headline["codecs"] = decode_speeds(os.path.join(headline["config"]["workdir"], "bench.zarr"), headline["config"]["workdir"])
    machine = machine_info()
    os.makedirs(args.out, exist_ok=True)
    sweep = []
    if args.keep_sweep:  # the sweep's ratios are internal to its own run, so they stay valid
        with open(os.path.join(args.out, "savings.json")) as f:
            old = json.load(f)
        for s in old["sweep"]:
            s["records"] = [r for r in old["records"] if r["backbone"] == s["config"]["backbone"] and r["size"] == s["config"]["size"]]
            sweep.append(s)

    def save():
        records = headline["records"] + retinanet["records"] + [r for s in sweep for r in s["records"]]
        for r in records:
            r["machine"] = machine
        result = {"machine": machine, "records": records,
                  "headline": {"config": headline["config"], "stages": headline["stages"], "codecs": headline["codecs"]},
                  "retinanet": {"config": retinanet["config"], "stages": retinanet["stages"]},
                  "sweep": [{"config": s["config"], "stages": s["stages"]} for s in sweep]}
        with open(os.path.join(args.out, "savings.json"), "w") as f:
            json.dump(result, f, indent=2)
        return result

    result = save()  # the headline is kept even if the sweep is interrupted
    if not (args.no_sweep or args.keep_sweep):
        for name in SWEEP:
            sweep.append(run_benchmark(BenchConfig(backbone=name, out_indices=None, size=args.sweep_size, batch=args.batch,
                                                   steps=args.sweep_steps, warmup=1, device=args.device),
                                       regimes=SWEEP_REGIMES))
            result = save()
    from benchmarks_report import write_report

    write_report(result, args.out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
