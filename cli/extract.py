"""``cachedet extract``: stage 1, frozen backbone features of augmented views into a zarr store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cachedet_cli.common import (
    RECIPE_HELP,
    backbone_indices,
    backbone_option,
    check_inputs,
    human_bytes,
    human_seconds,
    out_indices_option,
    pretrained_option,
    random_init_option,
    taps_option,
    user_errors,
    weight_source,
    weights_option,
)
from cachedet_cli.common import console as make_console
from cachedet_cli.vocabulary import (
    DEFAULT_CANVAS,
    DEVICE_HELP,
    LOADER_WORKERS_HELP,
    QUIET_HELP,
    SEED_HELP,
    SIZE_HELP,
    Codec,
    Dtype,
    Recipe,
    examples,
)

DATA, BACKBONE, VIEWS, STORAGE, RUN = "Data", "Backbone", "Views and augmentation", "Storage", "Run"
EXAMPLES = examples(
    "cachedet extract --annotations coco/annotations/instances_train2017.json --images coco/train2017 "
    "--out coco-r50.zarr --backbone resnet50 --pretrained --views 4 --dry-run",
    "cachedet extract --annotations val.json --images val/ --out val.zarr --no-augment --views 1",
)


def repair_line(result) -> str:
    """What ``--repair`` (and ``cache repair``) recomputed: damaged shards and rewritten arrays."""
    line = f"repaired {len(result.repaired)} damaged shard(s)"
    if result.repaired:
        line += ": " + ", ".join(
            f"{d['shard']} ({d['level']}: {d['error']})" for d in result.repaired
        )
    if result.mended:
        line += "; rewrote " + ", ".join(f"{m['array']} ({m['error']})" for m in result.mended)
    return line


@user_errors
def extract_command(
    annotations: Path = typer.Option(
        ...,
        "--annotations",
        metavar="JSON",
        help="COCO/LVIS annotation file.",
        rich_help_panel=DATA,
    ),
    images: Path = typer.Option(
        ...,
        "--images",
        metavar="DIR",
        rich_help_panel=DATA,
        help="Folder the annotation file's file_name entries are relative to.",
    ),
    out: str = typer.Option(
        ...,
        "--out",
        metavar="STORE",
        help="Store to write (a path or an fsspec URL).",
        rich_help_panel=DATA,
    ),
    skip_bad: bool = typer.Option(
        False,
        "--skip-bad",
        rich_help_panel=DATA,
        help="Record unreadable images in the store instead of stopping.",
    ),
    no_masks: bool = typer.Option(
        False,
        "--no-masks",
        rich_help_panel=DATA,
        help="Store no instance masks even when the annotations carry segmentation.",
    ),
    backbone: str = backbone_option(BACKBONE),
    weights: Optional[Path] = weights_option(BACKBONE),
    pretrained: bool = pretrained_option(BACKBONE),
    random_init: bool = random_init_option(BACKBONE),
    out_indices: Optional[str] = out_indices_option(BACKBONE),
    taps: Optional[str] = taps_option(BACKBONE),
    cache_stage: Optional[int] = typer.Option(
        None,
        "--cache-stage",
        metavar="K",
        rich_help_panel=BACKBONE,
        help=(
            "Hybrid cache for adapters: store the backbone up to this stage (its output and the pyramid levels "
            "before it; a ViT: block K's tokens and the taps before it)."
        ),
    ),
    size: int = typer.Option(DEFAULT_CANVAS, "--size", help=SIZE_HELP, rich_help_panel=VIEWS),
    views: int = typer.Option(
        4, "--views", help="Augmented views per image.", rich_help_panel=VIEWS
    ),
    scale_range: Optional[tuple[float, float]] = typer.Option(
        None,
        "--scale-range",
        metavar="MIN MAX",
        rich_help_panel=VIEWS,
        help=(
            "Large-Scale-Jittering: the longer side becomes f x size, f uniform in [MIN, MAX] "
            "(default: the recipe's)."
        ),
    ),
    recipe: Optional[Recipe] = typer.Option(
        None, "--recipe", help=RECIPE_HELP, rich_help_panel=VIEWS
    ),
    no_augment: bool = typer.Option(
        False,
        "--no-augment",
        rich_help_panel=VIEWS,
        help="One plain resize-and-pad view per image (evaluation caches).",
    ),
    seed: int = typer.Option(0, "--seed", help=SEED_HELP, rich_help_panel=VIEWS),
    copy_paste: float = typer.Option(
        0.0,
        "--copy-paste",
        metavar="P",
        rich_help_panel=VIEWS,
        help=(
            "Probability per view of pasting objects (masks, else boxes) from another jittered image."
        ),
    ),
    paste_min_visible: float = typer.Option(
        0.3,
        "--paste-min-visible",
        metavar="SHARE",
        rich_help_panel=VIEWS,
        help="An object the paste covers keeps its (shrunk) box if this share of it stays visible.",
    ),
    dtype: Dtype = typer.Option(
        "float16",
        "--dtype",
        rich_help_panel=STORAGE,
        help=(
            "Stored feature type; uint8 is affine per view and channel: lossy, half of float16's bytes."
        ),
    ),
    project: str = typer.Option(
        "none",
        "--project",
        metavar="auto|K|none",
        rich_help_panel=STORAGE,
        help=(
            "Store each level projected onto its leading principal directions (PCA fitted on 256 "
            "of the store's views): auto keeps min(C, 256) per level, K keeps min(C, K), a "
            "fraction such as 1/4 that share, c4=128,c5=256 per level. Trains, evaluates and "
            "exports like any store; not with --cache-stage."
        ),
    ),
    projection: Optional[str] = typer.Option(
        None,
        "--projection",
        metavar="STORE",
        rich_help_panel=STORAGE,
        help=(
            "Apply this projected store's map instead of fitting one: a validation store "
            "(--no-augment --views 1) for heads trained on that store."
        ),
    ),
    codec: Codec = typer.Option(
        "zstd", "--codec", help="Blosc compressor (bit-shuffle) or none.", rich_help_panel=STORAGE
    ),
    shard_views: int = typer.Option(
        64, "--shard-views", help="Views per shard (the unit of work).", rich_help_panel=STORAGE
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Rebuild an existing store.", rich_help_panel=STORAGE
    ),
    update: bool = typer.Option(
        False,
        "--update",
        rich_help_panel=STORAGE,
        help=(
            "Rebuild a store made from an earlier version of the annotations, keeping the shards whose "
            "images did not change (boxes, categories and masks are rewritten)."
        ),
    ),
    repair: bool = typer.Option(
        False,
        "--repair",
        rich_help_panel=STORAGE,
        help="Verify complete shards' checksums first and recompute damaged ones.",
    ),
    dask_workers: int = typer.Option(
        0,
        "--dask-workers",
        rich_help_panel=RUN,
        help="Dask worker processes on this machine (0: in-process).",
    ),
    scheduler: Optional[str] = typer.Option(
        None,
        "--scheduler",
        metavar="ADDR",
        rich_help_panel=RUN,
        help="Address of a running dask.distributed scheduler.",
    ),
    worker_timeout: float = typer.Option(
        300.0,
        "--worker-timeout",
        metavar="SECONDS",
        rich_help_panel=RUN,
        help="With dask: stop (keeping finished shards) when the cluster has had no worker this long.",
    ),
    device: str = typer.Option(
        "auto", "--device", metavar="DEVICE", help=DEVICE_HELP, rich_help_panel=RUN
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Views per backbone forward pass.", rich_help_panel=RUN
    ),
    loader_workers: int | None = typer.Option(
        None,
        "--loader-workers",
        help=LOADER_WORKERS_HELP
        + " Default: min(8, cores - 1) on CUDA, 0 on a CPU up to 2 cores; 0 under dask.",
        rich_help_panel=RUN,
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        rich_help_panel=RUN,
        help="Print views, size and time estimates; write nothing.",
    ),
    num_images: Optional[int] = typer.Option(
        None,
        "--num-images",
        rich_help_panel=RUN,
        help="With --dry-run: plan for this many images instead of the file's.",
    ),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP, rich_help_panel=RUN),
):
    """Run the frozen backbone over augmented views and store multi-scale features (stage 1)."""
    check_inputs(
        (annotations, "--annotations", "file"),
        (images, "--images", "folder"),
        (weights, "--weights", "file"),
        (projection, "--projection", "store"),
    )
    from rich.table import Table

    from cachedet.backbones.backbone import BackboneConfig
    from cachedet.core.recipes import get_recipe
    from cachedet.data.views import AugmentConfig
    from cachedet.extraction.run import ExtractConfig, extract
    from cachedet.extraction.run import dry_run as plan_dry_run

    weights_from = weight_source(weights, pretrained, random_init)
    chosen = get_recipe(recipe)
    cfg = ExtractConfig(
        annotations=str(annotations),
        images=str(images),
        out=out,
        backbone=BackboneConfig(
            backbone, backbone_indices(backbone, out_indices, taps), weights_from
        ),
        augment=AugmentConfig(
            size=size,
            scale_range=tuple(scale_range) if scale_range else None,  # None: the recipe's
            augment=not no_augment,
            seed=seed,
            copy_paste=copy_paste,
            paste_min_visible=paste_min_visible,
        ),
        views=views,
        dtype=dtype,
        codec=codec,
        shard_views=shard_views,
        workers=dask_workers,
        scheduler=scheduler,
        worker_timeout=worker_timeout,
        device=device,
        batch_size=batch_size,
        loader_workers=loader_workers,
        overwrite=overwrite,
        update=update,
        skip_bad=skip_bad,
        repair=repair,
        cache_stage=cache_stage,
        masks=not no_masks,
        recipe=chosen.name,
        project=project,
        projection=projection,
    )
    console = make_console()
    if dry_run:
        r = plan_dry_run(cfg, num_images=num_images)
        table = Table(title=f"extract --dry-run: {backbone} at {size}x{size}, nothing written")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        table.add_row("images", f"{r.num_images:,}")
        if r.scan is not None:
            table.add_row("image scan (headers)", r.scan.summary())
        table.add_row("views", f"{r.num_views:,} ({r.views_per_image} per image)")
        for name, shape in r.feature_shapes.items():
            table.add_row(f"level {name}", "x".join(str(v) for v in shape))
        table.add_row(
            f"bytes per view ({dtype}, before compression)", human_bytes(r.bytes_per_view)
        )
        table.add_row("cache size (before compression)", human_bytes(r.total_bytes))
        for c in r.choices:
            if not c["chosen"]:
                table.add_row(
                    f"  with --project {c['project']} --dtype {c['dtype']}",
                    f"{human_bytes(c['bytes_per_view'])}/view, {human_bytes(c['total_bytes'])}",
                )
        chosen_coco = next(c for c in r.choices if c["chosen"])["coco_bytes"]
        table.add_row(
            f"COCO train (118,287 images x {r.views_per_image} views)", human_bytes(chosen_coco)
        )
        table.add_row(f"backbone throughput ({r.device})", f"{r.views_per_second:.2f} views/s")
        table.add_row("estimated extraction time (one device)", human_seconds(r.estimated_seconds))
        console.print(table)
        print_scan_problems(r.scan, console, "extract leaves out (--skip-bad)")
        return
    result = extract(cfg, progress=not quiet)
    print_scan_problems(
        result.scan, console, "left out (--skip-bad), their views recorded in the store"
    )
    dropped = {k: v for k, v in result.dropped.items() if v}
    console.print(
        f"{result.store}: {result.num_views} views in {result.shards_total} shards; "
        f"ran {result.shards_run}, {result.shards_skipped_complete} already complete"
        + (f" ({result.shards_reused} reused by --update)" if result.shards_reused else "")
        + f"; {result.seconds:.1f} s"
    )
    console.print(
        "instance masks: "
        + (
            f"stored ({result.masks['objects']} objects"
            + (
                f", {result.masks['objects_from_boxes']} without segmentation stored as their box)"
                if result.masks["objects_from_boxes"]
                else ")"
            )
            if result.masks
            else "none (the annotations have no segmentation)"
            if not no_masks
            else "off (--no-masks)"
        )
    )
    if cfg.repair:
        console.print(repair_line(result))
    images = {k: v for k, v in result.dropped_images.items() if v}
    console.print(
        "dropped annotations: "
        + (", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else "none")
        + "; dropped images: "
        + (", ".join(f"{k} {v}" for k, v in images.items()) if images else "none")
    )
    if result.skipped_images:
        console.print(
            f"skipped {len(result.skipped_images)} unreadable image views (recorded in the store):",
            style="yellow",
        )
        for s in result.skipped_images[:10]:
            console.print(f"  {s['error']}")


def print_scan_problems(scan, console, fate: str) -> None:
    """The bad images the header scan found (the first 10), and what becomes of them."""
    if scan is None or not scan.bad:
        return
    console.print(f"image scan: {scan.summary()}; {fate}:", style="yellow")
    for b in scan.bad[:10]:
        console.print(f"  {b['error']}")
    if len(scan.bad) > 10:
        console.print(f"  ... and {len(scan.bad) - 10} more")
