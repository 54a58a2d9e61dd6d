"""``cachedet cache info|verify|repair STORE``: describe a feature store, re-check its shards, or
recompute what is damaged."""

from __future__ import annotations

import json

import typer

from cachedet_cli.common import check_inputs, human_bytes, user_errors
from cachedet_cli.common import console as make_console
from cachedet_cli.vocabulary import DEVICE_HELP, QUIET_HELP, examples

INFO_EXAMPLES = examples(
    "cachedet cache info coco-r50.zarr",
    "cachedet cache info s3://bucket/coco-r101-1024.zarr --json",
)
VERIFY_EXAMPLES = examples(
    "cachedet cache verify coco-r50.zarr",
    "cachedet cache verify s3://bucket/coco-r101-1024.zarr --json --quiet",
)

REPAIR_EXAMPLES = examples(
    "cachedet cache repair coco-r50.zarr",
    "cachedet cache repair coco-r50.zarr --annotations moved/train.json --images moved/train2017",
)

cache_app = typer.Typer(help="Inspect feature stores.", no_args_is_help=True)


@user_errors
def cache_info_command(
    store: str = typer.Argument(..., metavar="STORE", help="Feature store (path or fsspec URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
):
    """Describe a feature store: levels, shapes, size on disk, compression, completion."""
    check_inputs((store, "STORE", "store"))
    from rich.table import Table

    from cachedet.cache.store import StoreReader

    info = StoreReader(store).info()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console = make_console()
    console.print(
        f"{info['store']}  backbone {info['backbone']} ({info['weights']}), canvas {info['size']}"
    )
    console.print(
        f"{info['images']} images x {info['views_per_image']} views = {info['views']} views, {info['boxes']} boxes; "
        f"shards complete: {info['shards_complete']}/{info['shards_total']}"
    )
    table = Table()
    for col in ("level", "stride", "shape (views, C, H, W)", "dtype", "raw", "on disk"):
        table.add_column(col, justify="right" if col not in ("level", "dtype") else "left")
    for lv in info["levels"]:
        table.add_row(
            lv["name"],
            str(lv["stride"]),
            "x".join(map(str, lv["shape"])),
            lv["dtype"],
            human_bytes(lv["bytes_raw"]),
            human_bytes(lv["bytes_stored"]),
        )
    console.print(table)
    ratio = f"{info['compression_ratio']:.3f}x" if info["compression_ratio"] else "-"
    console.print(
        f"codec {info['codec']}; on disk {human_bytes(info['bytes_on_disk'])} in all; "
        f"compression ratio {ratio}; {human_bytes(info['bytes_per_view'])} per view"
    )
    m = info["masks"]
    console.print(
        f"instance masks: {m['objects']} objects, COCO RLE, {human_bytes(info['bytes_masks'])} on disk"
        + (
            f" ({m['objects_from_boxes']} without segmentation stored as their box)"
            if m["objects_from_boxes"]
            else ""
        )
        if m
        else "instance masks: none"
    )
    if info["projection"] is not None:
        levels = info["projection"]["levels"]
        console.print(
            "projected (PCA on "
            f"{info['projection']['sample_views']} views): "
            + ", ".join(
                f"{n} {v['k']} of {v['channels']} channels ({100 * v['energy']:.1f}% of the energy)"
                for n, v in levels.items()
            )
        )
    if info["hybrid_cache_stage"] is not None:
        console.print(
            f"hybrid cache: stops after backbone stage {info['hybrid_cache_stage']}; "
            "train it with train-heads --adapters"
        )
    if info["skipped_images"]:
        console.print(f"skipped images: {len(info['skipped_images'])}", style="yellow")


@user_errors
def cache_verify_command(
    store: str = typer.Argument(..., metavar="STORE", help="Feature store (path or fsspec URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
):
    """Re-read every complete shard and check it against the checksums recorded when it was written.

    Exit status 0 when every shard is complete and intact, 1 otherwise. Damaged shards are
    recomputed by rerunning the store's extract command with --repair.
    """
    check_inputs((store, "STORE", "store"))
    from cachedet.cache.store import StoreReader
    from cachedet.core.progress import ViewProgress

    reader = StoreReader(store)
    with ViewProgress("verify", reader.num_shards, unit="shards", enabled=not quiet) as bar:
        report = reader.verify(on_shard=bar.advance)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        console = make_console()
        console.print(
            f"{store}: {len(report['complete'])}/{report['shards_total']} shards complete and intact, "
            f"{len(report['incomplete'])} incomplete, {len(report['damaged'])} damaged"
        )
        if report["incomplete"]:
            console.print(
                "incomplete: " + _ranges(report["incomplete"]) + " (rerun extract to finish them)"
            )
        for d in report["damaged"]:
            console.print(
                f"damaged shard {d['shard']}, level {d['level']}: {d['error']}", style="red"
            )
        if report["damaged"]:
            console.print(
                f"`cachedet cache repair {store}` (or the extract command with --repair) "
                "recomputes the damaged shards"
            )
    if report["incomplete"] or report["damaged"]:
        raise typer.Exit(1)


@user_errors
def cache_repair_command(
    store: str = typer.Argument(..., metavar="STORE", help="Feature store (path or fsspec URL)."),
    annotations: str | None = typer.Option(
        None,
        "--annotations",
        metavar="FILE",
        help="The store's annotation file, when it is no longer where its header says.",
    ),
    images: str | None = typer.Option(
        None,
        "--images",
        metavar="DIR",
        help="The store's image folder, when it is no longer where its header says.",
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Record unreadable images in the store instead of stopping."
    ),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help=DEVICE_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Views per backbone forward pass."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
):
    """Verify a store and recompute, from the configuration its header records, every damaged or
    unfinished shard and every damaged box or metadata array (a store whose header is lost must
    be rebuilt with extract --overwrite)."""
    from cachedet.extraction.repair import repair
    from cachedet_cli.extract import repair_line

    result = repair(
        store,
        annotations,
        images,
        progress=not quiet,
        skip_bad=skip_bad,
        device=device,
        batch_size=batch_size,
    )
    make_console().print(
        f"{result.store}: {repair_line(result)}; ran {result.shards_run} shard(s), "
        f"{result.shards_skipped_complete} of {result.shards_total} intact"
    )


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}-{v}" if v != start else str(v))
            start = None
    return ", ".join(out)


cache_app.command("info", epilog=INFO_EXAMPLES)(cache_info_command)
cache_app.command("verify", epilog=VERIFY_EXAMPLES)(cache_verify_command)
cache_app.command("repair", epilog=REPAIR_EXAMPLES)(cache_repair_command)
