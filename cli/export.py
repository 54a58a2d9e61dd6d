"""``cachedet export``: a trained run's whole inference model as ONNX or a torch.export program."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from cachedet_cli.common import console as make_console
from cachedet_cli.common import user_errors
from cachedet_cli.vocabulary import examples

EXAMPLES = examples(
    "cachedet export --run runs/r50 --format onnx --out r50.onnx",
    "cachedet export --run runs/r50 --checkpoint best --score-threshold 0.3",
)


@user_errors
def export_command(
    run: str = typer.Option(..., "--run", metavar="RUN", help="Run directory from train-heads."),
    format: Literal["onnx", "pt2"] = typer.Option(
        "onnx", "--format", help="onnx (torch.onnx, opset 17) or pt2 (torch.export)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", metavar="FILE", help="File to write; default RUN/export/model.FORMAT."
    ),
    checkpoint: str = typer.Option(
        "last", "--checkpoint", metavar="last|best|FILE", help="last, best or a checkpoint file."
    ),
    score_threshold: float = typer.Option(
        0.05, "--score-threshold", help="Graph drops detections below it."
    ),
):
    """Export backbone, adapters, neck, head and NMS as one graph; preprocessing is in the .json beside it."""
    from cachedet.tools.export import export_run

    path = export_run(run, format, str(out) if out else None, checkpoint, score_threshold)
    make_console().print(f"exported {run} -> {path} (metadata: {Path(path).with_suffix('.json')})")
