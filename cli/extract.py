"""``cachedet extract``: stage 1, frozen backbone features of augmented views into a zarr store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cachedet.backbones import DEFAULT_BACKBONE, BackboneConfig
from cachedet.data.views import AugmentConfig
from cachedet.errors import CachedetError
from cachedet_cli.common import RECIPE_HELP, TAPS_HELP, backbone_indices, console as make_console, human_bytes, human_seconds, user_errors


@user_errors
def extract_command(
    annotations: Path = typer.Option(..., "--annotations", help="COCO/LVIS annotation JSON."),
    images: Path = typer.Option(..., "--images", help="Folder the JSON's file_name entries are relative to."),
    out: str = typer.Option(..., "--out", help="Store to write (a path or an fsspec URL)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", help="timm model name."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local checkpoint for the backbone."),
    pretrained: bool = typer.Option(False, "--pretrained", help="timm's own pretrained weights (needs network)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights (timing, tests)."),
    out_indices: Optional[str] = typer.Option(None, "--out-indices", help="timm feature indices, e.g. 2,3,4 (default: stride 8/16/32)."),
    taps: Optional[str] = typer.Option(None, "--taps", help=TAPS_HELP),
    size: int = typer.Option(640, "--size", help="Side of the square canvas."),
    views: int = typer.Option(4, "--views", help="Augmented views per image."),
    scale_range: Optional[tuple[float, float]] = typer.Option(None, "--scale-range", help="LSJ scale range MIN MAX (default: the recipe's)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help=RECIPE_HELP),
    no_augment: bool = typer.Option(False, "--no-augment", help="One plain resize-and-pad view per image (evaluation caches)."),
    seed: int = typer.Option(0, "--seed"),
    copy_paste: float = typer.Option(0.0, "--copy-paste", help="Probability per view of pasting objects (masks, else boxes) from another jittered image."),
    paste_min_visible: float = typer.Option(0.3, "--paste-min-visible", help="An object the paste covers keeps its (shrunk) box if this share of it stays visible."),
    dtype: str = typer.Option("float16", "--dtype", help="float16, bfloat16, float32, or uint8 (8 bits, affine per view and channel: lossy, half of float16's bytes)."),
    codec: str = typer.Option("zstd", "--codec", help="zstd, lz4 or none (Blosc, bit-shuffle)."),
    shard_views: int = typer.Option(64, "--shard-views", help="Views per shard (the unit of work)."),
    workers: int = typer.Option(0, "--workers", help="Dask worker processes on this machine (0: in-process)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running dask.distributed scheduler."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(8, "--batch-size", help="Views per backbone forward pass."),
    loader_workers: int = typer.Option(0, "--loader-workers", help="DataLoader processes decoding images per task."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild an existing store."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print views, size and time estimates; write nothing."),
    num_images: Optional[int] = typer.Option(None, "--num-images", help="With --dry-run: plan for this many images instead of the file's."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record unreadable images in the store instead of stopping."),
    cache_stage: Optional[int] = typer.Option(None, "--cache-stage", help="Hybrid cache for adapters: store the backbone up to this stage (its output and the pyramid levels before it; a ViT: block K's tokens and the taps before it)."),
    repair: bool = typer.Option(False, "--repair", help="Verify complete shards' checksums first and recompute damaged ones."),
    no_masks: bool = typer.Option(False, "--no-masks", help="Store no instance masks even when the annotations carry segmentation (boxes only)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Run the frozen backbone over augmented views and store multi-scale features (stage 1)."""
    from cachedet.extract import ExtractConfig, dry_run as plan_dry_run, extract
    from cachedet.recipes import get_recipe, schedule_advice

    if sum([weights is not None, pretrained, random_init]) > 1:
        raise CachedetError("--weights, --pretrained and --random-init exclude each other")
    weight_source = str(weights) if weights else "timm" if pretrained else "random" if random_init else "default"
    chosen = get_recipe(recipe)
    scale_range = tuple(scale_range or chosen.scale_range)
    cfg = ExtractConfig(
        annotations=str(annotations), images=str(images), out=out,
        backbone=BackboneConfig(backbone, backbone_indices(backbone, out_indices, taps), weight_source),
        augment=AugmentConfig(size=size, scale_range=tuple(scale_range), augment=not no_augment, seed=seed,
                               copy_paste=copy_paste, paste_min_visible=paste_min_visible),
        views=views, dtype=dtype, codec=codec, shard_views=shard_views, workers=workers, scheduler=scheduler,
        device=device, batch_size=batch_size, loader_workers=loader_workers, overwrite=overwrite, skip_bad=skip_bad,
        repair=repair, cache_stage=cache_stage, masks=not no_masks, recipe=chosen.name,
    )
    console = make_console()
    advice = None if no_augment else schedule_advice(scale_range, views=views)
    if advice:
        console.print(advice, style="yellow")
    if dry_run:
        r = plan_dry_run(cfg, num_images=num_images)
        table = Table(title=f"extract --dry-run: {backbone} at {size}x{size}, nothing written")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_row("images", f"{r.num_images:,}")
        table.add_row("views", f"{r.num_views:,} ({r.views_per_image} per image)")
        for name, shape in r.feature_shapes.items():
            table.add_row(f"level {name}", "x".join(str(v) for v in shape))
        table.add_row(f"bytes per view ({dtype}, before compression)", human_bytes(r.bytes_per_view))
        table.add_row("cache size (before compression)", human_bytes(r.total_bytes))
        table.add_row(f"backbone throughput ({r.device})", f"{r.views_per_second:.2f} views/s")
        table.add_row("estimated extraction time (one device)", human_seconds(r.estimated_seconds))
        console.print(table)
        return
    result = extract(cfg, progress=not quiet)
    dropped = {k: v for k, v in result.dropped.items() if v}
    console.print(
        f"{result.store}: {result.num_views} views in {result.shards_total} shards; "
        f"ran {result.shards_run}, {result.shards_skipped_complete} already complete; "
        f"{result.seconds:.1f} s"
    )
    console.print("instance masks: " + (f"stored ({result.masks['objects']} objects" + (
        f", {result.masks['objects_from_boxes']} without segmentation stored as their box)" if result.masks["objects_from_boxes"]
        else ")") if result.masks else "none (the annotations have no segmentation)" if not no_masks else "off (--no-masks)"))
    if cfg.repair:
        console.print(f"repaired {len(result.repaired)} damaged shard(s)" + (
            ": " + ", ".join(f"{d['shard']} ({d['level']}: {d['error']})" for d in result.repaired) if result.repaired else ""))
    console.print("dropped annotations: " + (", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else "none"))
    if result.skipped_images:
        console.print(f"skipped {len(result.skipped_images)} unreadable image views (recorded in the store):", style="yellow")
        for s in result.skipped_images[:10]:
            console.print(f"  {s['error']}")
