"""The Python parts of benchmarks/gpu_suite.sh: extraction against its three limits, and savings.

    python benchmarks/gpu_suite.py limits --out DIR [--overhead DIR/gpu_extract_overhead.json]
    python benchmarks/gpu_suite.py savings --out DIR --backbone resnet50 --size 640 --batch 8

Settings come from the environment: GPU_SUITE_DEVICE (default cuda) and GPU_SUITE_TINY=1 (tiny
models and canvases, for a CPU dry run). Each part writes DIR/gpu_<part>.{json,md}.

``limits``: extraction views/s of ResNet-50 c2-c5 at 640² (``cachedet.extract`` on synthetic
images), beside (1) the backbone-only forward views/s, (2) the CPU-side rate: the 1-worker
views/s of ``benchmarks/extract_overhead.py`` (its JSON ``configs[*].views_per_s_1``, the entry
whose name mentions 640 and c2, else the first) times the machine's cores, and (3) the disk's
write MB/s (a 512 MB file written and fsynced in DIR) divided by the store's bytes per view.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cachedet.tools.bench import (  # noqa: E402
    TORCHVISION_LIKE,
    BenchConfig,
    machine_info,
    run_benchmark,
)

DEVICE = os.environ.get("GPU_SUITE_DEVICE", "cuda")
TINY = os.environ.get("GPU_SUITE_TINY") == "1"


def disk_write_mb_s(folder: str, mb: int) -> float:
    """Sequential write of ``mb`` MB in 8 MB blocks, fsynced, in ``folder``."""
    block = os.urandom(8 << 20)
    path = os.path.join(folder, "gpu_suite_write.bin")
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, mb // 8)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    os.remove(path)
    return max(1, mb // 8) * 8 / dt


def cpu_side_views_per_s(overhead_json: str | None) -> dict | None:
    """The CPU-side extraction rate from extract_overhead.py's JSON, scaled to this machine's cores."""
    if not overhead_json or not os.path.exists(overhead_json):
        return None
    with open(overhead_json) as f:
        configs = json.load(f)["configs"]
    pick = next((c for c in configs if "640" in c["name"] and "c2" in c["name"]), configs[0])
    cores = os.cpu_count() or 1
    return {"config": pick["name"], "cores": cores, "views_per_s": pick["views_per_s_1"] * cores}


def bench_config(backbone: str, size: int, batch: int, out_indices, workdir: str) -> BenchConfig:
    steps, warmup = (1, 1) if TINY else (10, 3)
    light = {"proposals_per_image": 100, "rois_per_image": 64, "box_representation": 64}
    return BenchConfig(
        options={**TORCHVISION_LIKE, **(light if TINY else {})},
        backbone=backbone,
        out_indices=out_indices,
        size=size,
        batch=batch,
        device=DEVICE,
        warmup=warmup,
        steps=steps,
        workdir=workdir,
    )


def limits(args) -> dict:
    backbone, size, batch = ("test_resnet", 128, 2) if TINY else ("resnet50", 640, 8)
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        cfg = bench_config(backbone, size, batch, (1, 2, 3, 4), work)
        got = run_benchmark(cfg, regimes=("heads_in_memory",), fresh_process=False)
        stages = got["stages"]
        write = disk_write_mb_s(work, 64 if TINY else 512)
    bytes_per_view = stages["cache_bytes_per_view"]
    cpu = cpu_side_views_per_s(args.overhead)
    bounds = {
        "backbone_forward_views_per_s": stages["backbone_forward_views_per_s"],
        "cpu_side_views_per_s": cpu["views_per_s"] if cpu else None,
        "disk_views_per_s": write * 1e6 / bytes_per_view,
    }
    smallest = min(v for v in bounds.values() if v is not None)
    return {
        "machine": machine_info(),
        "backbone": backbone,
        "size": size,
        "batch": batch,
        "extract_views_per_s": stages["extract_views_per_s"],
        "limits": bounds,
        "cpu_side": cpu,
        "disk_write_mb_s": write,
        "bytes_per_view": bytes_per_view,
        "extract_vs_smallest_limit": stages["extract_views_per_s"] / smallest,
    }


def savings(args) -> dict:
    tiny = {"resnet50": ("test_resnet", 128, 2), "large": ("test_efficientnet", 128, 2)}
    backbone, size, batch = tiny[args.kind] if TINY else (args.backbone, args.size, args.batch)
    out_indices = (1, 2, 3, 4) if backbone in ("resnet50", "test_resnet") else None
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        got = run_benchmark(
            bench_config(backbone, size, batch, out_indices, work), fresh_process=False
        )
    by = {r["regime"]: r["step_s_median"] for r in got["records"]}
    ratios = {
        "cached_vs_heads_in_memory": by["cached"] / by["heads_in_memory"],
        "online_frozen_vs_cached": by["online_frozen"] / by["cached"],
    }
    if "torchvision_frozen" in by:
        ratios["torchvision_frozen_vs_cached"] = by["torchvision_frozen"] / by["cached"]
    return {"machine": machine_info(), **got, "step_s": by, "ratios": ratios}


def markdown(part: str, r: dict) -> str:
    lines = [f"# gpu_suite {part}", "", f"device {DEVICE}{' (tiny dry run)' if TINY else ''}", ""]
    if part == "limits":
        lines += [
            f"extraction: {r['extract_views_per_s']:.1f} views/s ({r['backbone']} {r['size']}²)"
        ]
        lines += [
            f"- {k}: {v:.1f}" if v is not None else f"- {k}: not measured"
            for k, v in r["limits"].items()
        ]
        lines += [f"- extraction / smallest limit: {r['extract_vs_smallest_limit']:.2f}"]
    else:
        lines += ["| regime | s/step |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in r["step_s"].items()]
        lines += [""] + [f"- {k}: {v:.2f}" for k, v in r["ratios"].items()]
        lines += [f"- break-even epochs: {r['stages'].get('break_even_epochs')}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("limits", "savings"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--overhead", default=None, help="extract_overhead.py's JSON (limits)")
    ap.add_argument("--kind", choices=("resnet50", "large"), default="resnet50")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = limits(args) if args.part == "limits" else savings(args)
    name = f"gpu_{args.part}" + ("" if args.part == "limits" else f"_{args.kind}")
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = markdown(args.part, result)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
