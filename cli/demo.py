"""``cachedet demo``: the main job on an embedded, generated dataset (offline)."""

from __future__ import annotations

import os
from typing import Literal

import typer

from cachedet.core.atomic import write_json_atomic
from cachedet_cli.common import console as make_console
from cachedet_cli.common import human_bytes, human_seconds, user_errors
from cachedet_cli.eval_predict import print_metrics
from cachedet_cli.vocabulary import QUIET_HELP, Head, examples

EXAMPLES = examples(
    "cachedet demo --quick",
    "cachedet demo --out demo_nasfpn --neck nasfpn --head cascade --no-masks",
)


@user_errors
def demo_command(
    quick: bool = typer.Option(
        False, "--quick", help="A smaller setting (CI): fewer, smaller images, 2 epochs."
    ),
    out: str = typer.Option(
        "demo_out", "--out", metavar="DIR", help="Folder for the dataset, cache, run and metrics."
    ),
    neck: Literal["fpn", "nasfpn"] = typer.Option(
        "fpn", "--neck", help="Neck of the trained detector."
    ),
    head: Head = typer.Option("faster-rcnn", "--head", help="Detection head."),
    no_masks: bool = typer.Option(
        False, "--no-masks", help="Boxes only: no mask head, no mask AP."
    ),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
):
    """Generate a dataset, extract features and masks, train heads, evaluate box and mask AP: the whole pipeline offline."""
    from rich.table import Table

    from cachedet.tools.demo import run_demo

    console = make_console()
    result = run_demo(
        out,
        quick=quick,
        progress=not quiet,
        log=console.print,
        neck=neck,
        head=head,
        masks=not no_masks,
    )
    print_metrics(result["metrics"], console)
    info = result["cache"]
    t = Table(title="cachedet demo" + (" --quick" if quick else ""))
    t.add_column("stage")
    t.add_column("wall time", justify="right")
    for stage, seconds in result["times"].items():
        t.add_row(stage, human_seconds(seconds))
    t.add_row("total", human_seconds(sum(result["times"].values())))
    console.print(t)
    console.print(
        f"cache {result['store']}: {info['views']} views, {human_bytes(info['bytes_on_disk'])} on disk, "
        f"{human_bytes(info['bytes_per_view'])} per view, compression {info['compression_ratio']:.2f}x"
    )
    m = result["metrics"]
    mask = f", mask AP {m['segm']['AP']:.1f} (AP50 {m['segm']['AP50']:.1f})" if "segm" in m else ""
    console.print(
        f"box AP {m['bbox']['AP']:.1f} (AP50 {m['bbox']['AP50']:.1f}){mask}; "
        f"run in {result['run']}, metrics in {os.path.join(out, 'metrics.json')}"
    )
    console.print("the same run, step by step (after the dataset is generated):")
    for command in result["commands"]:
        console.print("  " + command)
    written = written_files(result["run"])
    if written:
        console.print(written)
    if result["note"]:
        console.print(result["note"], style="yellow")
    write_json_atomic(
        os.path.join(out, "demo_summary.json"),
        {k: v for k, v in result.items() if k != "metrics"}
        | {"bbox": m["bbox"], "segm": m.get("segm")},
        indent=2,
    )


def written_files(run: str) -> str:
    """ "curves: PATH; best checkpoint: PATH" for those of the two the run wrote (curves.png needs
    matplotlib, best.pt validation): nothing is named that is not there."""
    named = (
        ("curves", os.path.join(run, "curves.png")),
        ("best checkpoint", os.path.join(run, "checkpoints", "best.pt")),
    )
    return "; ".join(f"{what}: {path}" for what, path in named if os.path.exists(path))
