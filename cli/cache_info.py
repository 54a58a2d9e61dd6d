"""``cachedet cache-info STORE``: levels, shapes, size on disk, compression, completion."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from cachedet_cli.common import console as make_console, human_bytes, user_errors


@user_errors
def cache_info_command(
    store: str = typer.Argument(..., help="Feature store (path or fsspec URL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
):
    """Describe a feature store."""
    from cachedet.cache.store import FeatureStore

    info = FeatureStore(store).info()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console = make_console()
    console.print(f"[bold]{info['store']}[/]  backbone {info['backbone']} ({info['weights']}), canvas {info['size']}")
    console.print(
        f"{info['images']} images x {info['views_per_image']} views = {info['views']} views, {info['boxes']} boxes; "
        f"shards complete: {info['shards_complete']}/{info['shards_total']}"
    )
    table = Table()
    for col in ("level", "stride", "shape (views, C, H, W)", "dtype", "raw", "on disk"):
        table.add_column(col, justify="right" if col not in ("level", "dtype") else "left")
    for lv in info["levels"]:
        table.add_row(lv["name"], str(lv["stride"]), "x".join(map(str, lv["shape"])), lv["dtype"],
                      human_bytes(lv["bytes_raw"]), human_bytes(lv["bytes_stored"]))
    console.print(table)
    ratio = f"{info['compression_ratio']:.3f}x" if info["compression_ratio"] else "-"
    console.print(
        f"codec {info['codec']}; on disk {human_bytes(info['bytes_on_disk'])} in all; "
        f"compression ratio {ratio}; {human_bytes(info['bytes_per_view'])} per view"
    )
    if info["skipped_images"]:
        console.print(f"[yellow]skipped images: {len(info['skipped_images'])}")
