"""``cachedet bench``: every training regime on the same views, in one run (see cachedet.bench)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from cachedet_cli.common import TAPS_HELP, backbone_indices, console as make_console, user_errors


@user_errors
def bench_command(
    backbone: str = typer.Option("resnet50", "--backbone"),
    out_indices: Optional[str] = typer.Option(None, "--out-indices", help="Backbone levels (default for resnet50: 1,2,3,4 as torchvision's R50-FPN; else stride 8/16/32)."),
    taps: Optional[str] = typer.Option(None, "--taps", help=TAPS_HELP),
    neck: str = typer.Option("auto", "--neck", help="fpn, nasfpn or simple; auto: simple for a plain ViT's taps, fpn otherwise."),
    head: str = typer.Option("faster-rcnn", "--head"),
    size: int = typer.Option(512, "--size"),
    batch: int = typer.Option(2, "--batch"),
    steps: int = typer.Option(5, "--steps", help="Timed steps per regime (after --warmup)."),
    warmup: int = typer.Option(2, "--warmup"),
    device: str = typer.Option("cpu", "--device"),
    regimes: Optional[str] = typer.Option(None, "--regimes", help="Comma-separated subset of the regimes."),
    out: Optional[str] = typer.Option(None, "--out", help="Write the records as JSON here."),
):
    """Measure finetune / online_frozen / cached / heads_in_memory (and torchvision's R50-FPN) on the same views."""
    from cachedet.bench import ADAPTER_REGIMES, OUR_REGIMES, TORCHVISION_LIKE, TORCHVISION_REGIMES, BenchConfig, run_benchmark
    from cachedet.errors import CachedetError

    chosen = tuple(r for r in regimes.split(",") if r) if regimes else None
    for r in chosen or ():
        if r not in OUR_REGIMES + TORCHVISION_REGIMES + ADAPTER_REGIMES:
            raise CachedetError(f"--regimes {r}: expected some of {', '.join(OUR_REGIMES + TORCHVISION_REGIMES + ADAPTER_REGIMES)}")
    indices = backbone_indices(backbone, out_indices or None, taps)
    if indices is None and taps is None and out_indices is None and backbone == "resnet50":
        indices = (1, 2, 3, 4)
    console = make_console()
    result = run_benchmark(BenchConfig(backbone=backbone, out_indices=indices, neck=neck, head=head, size=size, batch=batch,
                                       steps=steps, warmup=warmup, device=device,
                                       options=dict(TORCHVISION_LIKE) if head != "retinanet" else {}),
                           regimes=chosen, log=console.print)
    t = Table(title=f"{backbone} {result['config']['neck']}+{head} {size}x{size} batch {batch} on {device}")
    for c in ("regime", "step (s)", "GFLOPs", "peak memory (GB)"):
        t.add_column(c, justify="right" if c != "regime" else "left")
    for r in result["records"]:
        t.add_row(r["regime"], f"{r['step_s_median']:.3f}", f"{r['flops_per_step'] / 1e9:.1f}", f"{r['peak_mem_bytes'] / 1e9:.2f}")
    console.print(t)
    st = result["stages"]
    console.print(f"extraction {st['extract_views_per_s']:.2f} views/s, backbone forward {st['backbone_forward_views_per_s']:.2f} views/s; "
                  f"cache {st['cache_bytes_per_view'] / 1e6:.2f} MB/view; break-even epochs: {st.get('break_even_epochs')}")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
