"""``cachedet bench``: every training regime on the same views, in one run (see cachedet.tools.bench)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from cachedet_cli.common import TAPS_HELP, backbone_indices, user_errors
from cachedet_cli.common import console as make_console
from cachedet_cli.vocabulary import (
    BENCH_REGIMES,
    DEFAULT_CANVAS,
    DEVICE_HELP,
    SIZE_HELP,
    Head,
    Neck,
    examples,
)

EXAMPLES = examples(
    "cachedet bench --backbone resnet50 --size 512 --batch-size 2 --out bench.json",
    "cachedet bench --backbone resnet101 --neck nasfpn --regimes cached,online_frozen --device cuda",
)


@user_errors
def bench_command(
    backbone: str = typer.Option(
        "resnet50", "--backbone", metavar="TIMM_NAME", help="timm model name (random init)."
    ),
    out_indices: Optional[str] = typer.Option(
        None,
        "--out-indices",
        metavar="I,J,K",
        help=(
            "Backbone levels (default for resnet50: 1,2,3,4 as torchvision's R50-FPN; else stride 8/16/32)."
        ),
    ),
    taps: Optional[str] = typer.Option(None, "--taps", metavar="I,J,K", help=TAPS_HELP),
    neck: Neck = typer.Option(
        "auto", "--neck", help="auto: simple for a plain ViT's taps, fpn otherwise."
    ),
    head: Head = typer.Option(
        "faster-rcnn", "--head", help="Detection head (retinanet: torchvision's RetinaNet too)."
    ),
    size: int = typer.Option(DEFAULT_CANVAS, "--size", help=SIZE_HELP),
    batch_size: int = typer.Option(2, "--batch-size", help="Images per training step."),
    steps: int = typer.Option(5, "--steps", help="Timed steps per regime (after --warmup)."),
    warmup: int = typer.Option(
        2, "--warmup", help="Untimed steps per regime before the timed ones."
    ),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help=DEVICE_HELP),
    regimes: Optional[str] = typer.Option(
        None,
        "--regimes",
        metavar="A,B",
        help=(
            f"Comma-separated subset of: {', '.join(BENCH_REGIMES)} (default: all but the adapter regimes)."
        ),
    ),
    out: Optional[str] = typer.Option(
        None, "--out", metavar="JSON", help="Write the records as JSON here."
    ),
):
    """Measure finetune / online_frozen / cached / heads_in_memory (and torchvision's R50-FPN) on the same views."""
    from rich.table import Table

    from cachedet.tools.bench import BenchConfig, run_benchmark

    chosen = tuple(r for r in regimes.split(",") if r) if regimes else None
    given = out_indices is not None or taps is not None
    cfg = BenchConfig(
        backbone=backbone,
        out_indices=backbone_indices(backbone, out_indices or None, taps) if given else "auto",
        neck=neck,
        head=head,
        size=size,
        batch=batch_size,
        steps=steps,
        warmup=warmup,
        device=device,
    ).resolved()
    device = cfg.device
    console = make_console()
    result = run_benchmark(cfg, regimes=chosen, log=console.print)
    t = Table(
        title=f"{backbone} {result['config']['neck']}+{head} {size}x{size} batch {batch_size} on {device}"
    )
    for c in ("regime", "step (s)", "min-max (s)", "GFLOPs", "peak memory (GB)"):
        t.add_column(c, justify="right" if c != "regime" else "left")
    for r in result["records"]:
        t.add_row(
            r["regime"],
            f"{r['step_s_median']:.3f}",
            f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f}",
            f"{r['flops_per_step'] / 1e9:.1f}",
            f"{r['peak_mem_bytes'] / 1e9:.2f}",
        )
    t.caption = f"step: median of {steps} timed steps after {warmup} warm-up; min-max: their spread"
    console.print(t)
    st = result["stages"]
    console.print(
        f"extraction {st['extract_views_per_s']:.2f} views/s, backbone forward "
        f"{st['backbone_forward_views_per_s']:.2f} views/s; cache {st['cache_bytes_per_view'] / 1e6:.2f} MB/view"
    )
    console.print(f"break-even: {st['break_even_reason']}")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
