"""Reproduce the paper's Table 3 (trainable parameters) and Figure 1 (FLOPs per step) ratios.

Runs ``cachedet.tools.model_info.model_info`` for timm ``resnetrs101`` (the paper's ResNet-101,
random init) at 1024x1024 with 91 classes for FPN, NAS-FPN and NAS-FPN + Cascade, each with
Mask R-CNN's mask head as the paper's models have (parameters and FLOPs include it; the table
also gives the box-only parameter count), and writes benchmarks/results/model_info.json and
model_info.md.

    python benchmarks/model_info_table.py [--backbone resnetrs101] [--size 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from cachedet.tools.model_info import model_info

CONFIGS = (("fpn", "faster-rcnn"), ("nasfpn", "faster-rcnn"), ("nasfpn", "cascade"))
HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnetrs101")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    records = []
    for neck, head in CONFIGS:
        t = time.perf_counter()
        info = model_info(args.backbone, neck, head, args.size, 91, masks=True)
        info["seconds"] = round(time.perf_counter() - t, 1)
        records.append(info)
        print(
            f"{neck} + {head}: trainable {info['params']['detector'] / 1e6:.1f} M, "
            f"frozen/finetune FLOPs {info['flop_ratio']['online_frozen']:.2f}, cached {info['flop_ratio']['cached']:.2f}"
        )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_info.json"), "w") as f:
        json.dump({"machine": machine, "records": records}, f, indent=2)
    lines = [
        f"Trainable parameters and FLOPs of one training step (batch 1, {args.size}x{args.size}, 91 classes, "
        f"backbone `{args.backbone}`, detectors with Mask R-CNN's mask head as in the paper, counted with "
        f"torch.utils.flop_counter; torch {torch.__version__}).",
        "",
        "| detector | backbone (M) | trainable, boxes only (M) | trainable with mask head (M) | paper Table 3 (M) | difference | GFLOPs fine-tuned | frozen online | cached | frozen / fine-tuned | paper Fig. 1 | cached / fine-tuned |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        ("fpn", "faster-rcnn"): "FPN",
        ("nasfpn", "faster-rcnn"): "NAS-FPN",
        ("nasfpn", "cascade"): "NAS-FPN + Cascade",
    }
    for r in records:
        p, fl, paper = r["params"], r["flops"], r["paper"]
        trained = p["detector"] / 1e6
        lines.append(
            f"| {names[(r['neck'], r['head'])]} | {p['backbone'] / 1e6:.1f} | {trained - r['mask_head_params'] / 1e6:.1f} | "
            f"{trained:.1f} | {paper['trained_params_m']} | "
            f"{100 * (trained / paper['trained_params_m'] - 1):+.1f}% | {fl['finetune'] / 1e9:.0f} | {fl['online_frozen'] / 1e9:.0f} | "
            f"{fl['cached'] / 1e9:.0f} | {r['flop_ratio']['online_frozen']:.2f} | {paper['frozen_flop_ratio']:.2f} | "
            f"{r['flop_ratio']['cached']:.2f} |"
        )
    with open(os.path.join(args.out, "model_info.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
