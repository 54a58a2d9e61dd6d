"""``cachedet eval`` and ``cachedet predict``: stage 3."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from cachedet.core.atomic import write_json_atomic
from cachedet.core.paths import resolve_path
from cachedet_cli.common import check_inputs, parse_int_list, user_errors
from cachedet_cli.common import console as make_console
from cachedet_cli.vocabulary import DEVICE_HELP, QUIET_HELP, examples

EVAL_EXAMPLES = examples(
    "cachedet eval --run runs/nasfpn-cascade --annotations coco/annotations/instances_val2017.json "
    "--images coco/val2017 --train-annotations coco/annotations/instances_train2017.json",
    "cachedet eval --run runs/demo --annotations val.json --cache val.zarr --out runs/demo/val-metrics.json",
)
PREDICT_EXAMPLES = examples(
    "cachedet predict photos/ --run runs/nasfpn-cascade --out detections.json --draw drawn/",
    "cachedet predict a.jpg b.png --run runs/demo --out dets.json --score-threshold 0.5 --device cpu",
)

CHECKPOINT_HELP = "The run's last checkpoint, or the best by validation (train-heads --val-*)."
MAX_DETECTIONS_HELP = "At most this many detections per image (after NMS)."


def fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def per_class_table(rows: list[dict], masks: bool, title: str = "per-class AP"):
    """A rich table of per-class AP rows ({category_id, name, AP[, mask_AP, train_annotations]})."""
    from rich.table import Table

    ap_columns = ("AP", "mask_AP") if masks else ("AP",)
    ap_titles = ("box AP", "mask AP") if masks else ("AP",)
    t = Table(title=title)
    for c in ("category", "train annotations", *ap_titles):
        t.add_column(c, justify="right" if c != "category" else "left")
    for row in rows:
        t.add_row(
            f"{row['name']} ({row['category_id']})",
            str(row.get("train_annotations", "-")),
            *(fmt(row.get(k)) for k in ap_columns),
        )
    return t


def print_metrics(metrics: dict, console) -> None:
    """The AP summaries (box, and mask for mask runs), the stratified tables and per-class AP, as rich tables."""
    from rich.table import Table

    masks = "segm" in metrics
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    t = Table(
        title=f"{'box and mask' if masks else 'box'} AP on {metrics['num_images']} images ({metrics['source']})"
    )
    t.add_column("")
    for k in keys:
        t.add_column(k, justify="right")
    t.add_row("box", *(fmt(metrics["bbox"][k]) for k in keys))
    if masks:
        t.add_row("mask", *(fmt(metrics["segm"][k]) for k in keys))
    console.print(t)
    if "segm_skipped" in metrics:
        console.print(f"mask AP not scored: {metrics['segm_skipped']}", style="yellow")
    if "lvis_bbox" in metrics:
        lvis_keys = ("AP", "APr", "APc", "APf", "APs", "APm", "APl")
        t = Table(title="LVIS AP (LVISEval)")
        t.add_column("")
        for k in lvis_keys:
            t.add_column(k, justify="right")
        t.add_row("box", *(fmt(metrics["lvis_bbox"].get(k)) for k in lvis_keys))
        if "lvis_segm" in metrics:
            t.add_row("mask", *(fmt(metrics["lvis_segm"].get(k)) for k in lvis_keys))
        console.print(t)
    ap_columns = ("AP", "mask_AP") if masks else ("AP",)
    ap_titles = ("box AP", "mask AP") if masks else ("AP",)
    if "by_train_count" in metrics:
        t = Table(title="AP by number of training annotations per class")
        for c in ("training annotations", "classes", *ap_titles):
            t.add_column(c, justify="right")
        for row in metrics["by_train_count"]:
            t.add_row(row["bin"], str(row["classes"]), *(fmt(row.get(k)) for k in ap_columns))
        console.print(t)
    t = Table(title="AP by object size")
    t.add_column("")
    for c in ("small", "medium", "large"):
        t.add_column(c, justify="right")
    t.add_row("box", *(fmt(metrics["by_size"][k]) for k in ("APs", "APm", "APl")))
    if masks:
        t.add_row("mask", *(fmt(metrics["mask_by_size"][k]) for k in ("APs", "APm", "APl")))
    console.print(t)
    console.print(per_class_table(metrics["per_class"], masks))


@user_errors
def eval_command(
    run: str = typer.Option(..., "--run", metavar="RUN", help="Run directory from train-heads."),
    annotations: Path = typer.Option(
        ..., "--annotations", metavar="JSON", help="Validation COCO/LVIS annotation file."
    ),
    images: Optional[Path] = typer.Option(
        None, "--images", metavar="DIR", help="Validation image folder."
    ),
    train_annotations: Optional[Path] = typer.Option(
        None,
        "--train-annotations",
        metavar="JSON",
        help="Training annotation file, for AP by training count.",
    ),
    cache: Optional[str] = typer.Option(
        None,
        "--cache",
        metavar="STORE",
        help="Score from a --no-augment --views 1 store of the validation set.",
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        metavar="JSON",
        help="metrics.json to write, detections beside it (default: RUN/metrics.json).",
    ),
    count_bins: str = typer.Option(
        "10,100,1000",
        "--count-bins",
        metavar="A,B,C",
        help="Upper edges of the training-count bins.",
    ),
    checkpoint: str = typer.Option(
        "last", "--checkpoint", metavar="best|last", help=CHECKPOINT_HELP
    ),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help=DEVICE_HELP),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per forward pass."),
    score_threshold: Optional[float] = typer.Option(
        None,
        "--score-threshold",
        help="Score floor of the detector (default: COCO 0.05 as trained, LVIS 0: no floor).",
    ),
    max_detections: Optional[int] = typer.Option(
        None, "--max-detections", help=MAX_DETECTIONS_HELP + " Default: COCO 100, LVIS 300."
    ),
    backend: str = typer.Option(
        "pycocotools",
        "--backend",
        metavar="pycocotools|faster-coco-eval",
        help="COCO scorer: pycocotools (the reference) or faster-coco-eval (pip install "
        "faster-coco-eval; same numbers, tested). LVIS files always use the lvis package.",
    ),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
):
    """Score a trained run on a validation set (pycocotools / LVIS), stratified like the paper."""
    check_inputs(
        (run, "--run", "folder"),
        (annotations, "--annotations", "file"),
        (images, "--images", "folder"),
        (train_annotations, "--train-annotations", "file"),
        (cache, "--cache", "store"),
    )
    from cachedet.api import evaluate
    from cachedet.evaluation.config import EvalConfig

    cfg = EvalConfig(
        run=run,
        annotations=str(annotations),
        images=str(images) if images else None,
        cache=cache,
        train_annotations=str(train_annotations) if train_annotations else None,
        out=str(out) if out else os.path.join(run, "metrics.json"),
        checkpoint=checkpoint,
        count_bins=parse_int_list(count_bins, "--count-bins"),
        device=device,
        batch_size=batch_size,
        score_threshold=score_threshold,
        max_detections=max_detections,
        backend=backend,
    )
    metrics, _ = evaluate(cfg, progress=not quiet)
    print_metrics(metrics, make_console())


@user_errors
def predict_command(
    inputs: List[Path] = typer.Argument(..., help="Images or folders of images."),
    run: str = typer.Option(..., "--run", metavar="RUN", help="Run directory from train-heads."),
    out: Path = typer.Option(..., "--out", metavar="JSON", help="detections.json to write."),
    draw: Optional[Path] = typer.Option(
        None, "--draw", metavar="DIR", help="Folder for PNGs with the boxes (and masks) drawn."
    ),
    score_threshold: float = typer.Option(
        0.3, "--score-threshold", help="Keep detections scoring at least this (0 keeps all)."
    ),
    max_detections: int = typer.Option(100, "--max-detections", help=MAX_DETECTIONS_HELP),
    checkpoint: str = typer.Option(
        "last", "--checkpoint", metavar="best|last", help=CHECKPOINT_HELP
    ),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help=DEVICE_HELP),
):
    """Detect objects in images; COCO-style detections in original-image pixels (with RLE masks for mask runs).

    In a folder, hidden and companion files (.*, ._*, .DS_Store, Thumbs.db), non-image names,
    sub-folders and images that cannot be read are skipped and reported; an image named explicitly
    that cannot be read is an error."""
    check_inputs((run, "--run", "folder"))
    from cachedet.api import load
    from cachedet.evaluation.draw import draw_detections

    out, draw = resolve_path(out), resolve_path(draw)
    model = load(run, checkpoint, device, score_threshold, max_detections)
    found = model.predict_files(inputs)
    write_json_atomic(out, found.detections, indent=1)
    console = make_console()
    if found.skipped:
        console.print(
            "skipped "
            + ", ".join(
                f"{len(v)} {k} ({', '.join(os.path.basename(x) for x in v[:3])}"
                f"{', ...' if len(v) > 3 else ''})"
                for k, v in found.skipped.items()
            ),
            style="yellow",
        )
    console.print(
        f"{len(found.detections)} detections in {len(found.predicted)} images "
        f"(score >= {score_threshold}, at most {max_detections} per image) -> {out}"
    )
    if draw:
        keep = found.predicted
        index = {old: new for new, old in enumerate(keep)}
        written = draw_detections(
            [found.paths[i] for i in keep],
            [{**d, "image_id": index[d["image_id"]]} for d in found.detections],
            draw,
            category_ids=[c["id"] for c in model.categories],
            names=[found.names[i] for i in keep],
        )
        console.print(f"drew {len(written)} images into {draw}")
