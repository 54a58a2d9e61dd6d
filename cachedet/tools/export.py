"""Export a trained run's whole inference model (backbone, adapters, neck, head, NMS) out of Python.

``export_run(run, "onnx")`` writes an ONNX file through torch's TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``, opset 17): torchvision's NMS and RoIAlign export there, while
the dynamo exporter and ``torch.export`` stop at the data-dependent shapes of torchvision's detection
post-processing in torch 2.14 (``GuardOnDataDependentSymNode`` in ``batched_nms`` and
``MultiScaleRoIAlign``). ``"pt2"`` tries ``torch.export`` and says so in one line when it cannot.

The graph takes one canvas: float32 (1, 3, S, S), already normalised and resized; resizing and padding
stay outside (they depend on each image's size). ``export_metadata`` (in the ONNX ``metadata_props``
under ``cachedet`` and in a ``.json`` file beside the export) spells the steps out; ``REFERENCE``, a copy of
``cachedet.data.preprocess`` written beside the export, does them with numpy and Pillow alone (no torch),
equal to ``prepare_image`` (the torch steps ``predict`` runs) within float32 rounding. Outputs: boxes float32 (N, 4) xyxy canvas pixels, scores
float32 (N,), labels int64 (N,) contiguous 0..C-1 (``category_ids[label]`` is the dataset id).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from cachedet.core.errors import CachedetError

FORMATS = ("onnx", "pt2")
OPSET = 17
REFERENCE = "cachedet_preprocess.py"  # the numpy + Pillow steps, written beside every export
PREPROCESS = {
    "read": "EXIF orientation applied, then any mode to 8-bit RGB (rules in the reference file)",
    "normalize": "float32 (pixel * float32(1 / 255) - mean) / std, per RGB channel, BEFORE resizing",
    "resize": "scale = S / max(H, W); the normalised float32 image resized to "
    "(max(1, round(H * scale)), max(1, round(W * scale))) (Python round: halves to even), bilinear "
    "with antialiasing: torch's interpolate(antialias=True) weights, float32, widths then heights",
    "pad": "bottom and right with 0 (after normalisation) to S x S; the image sits at the top-left",
    "reference": f"{REFERENCE} beside this file: preprocess(load_image(path), metadata) (numpy, Pillow)",
}
POSTPROCESS = (
    "boxes / (round(W * scale) / W, round(H * scale) / H) per x and y gives original-image "
    "pixels; clip to the image, drop boxes left with no area, then apply your own score threshold"
)


class InferenceModel(nn.Module):
    """canvas float32 (1, 3, S, S), normalised -> (boxes (N, 4) xyxy canvas px, scores (N,),
    labels (N,) 0..C-1)."""

    def __init__(self, backbone: nn.Module, detector: nn.Module):
        super().__init__()
        self.backbone, self.detector = backbone, detector

    def forward(self, image: torch.Tensor):
        det = self.detector.predict(self.backbone(image))[0]
        return det["boxes"], det["scores"], det["labels"]


def export_metadata(predictor, checkpoint: str, fmt: str, score_threshold: float) -> dict:
    """What a runtime needs beside the graph: input, preprocessing, outputs, categories."""
    cfg, s = predictor.detector_config, predictor.canvas
    names = [predictor.categories.name_of(i) for i in predictor.categories.ids]
    return {
        "format": "cachedet.export",
        "version": 1,
        "exported_as": fmt,
        "checkpoint": checkpoint,
        "backbone": predictor.backbone.identity["name"],
        "adapters": list(predictor.adapters),
        "neck": cfg.neck,
        "head": cfg.head,
        "canvas": s,
        "input": {
            "name": "image",
            "shape": [1, 3, s, s],
            "dtype": "float32",
            "layout": "NCHW, RGB",
        },
        "preprocess": {
            **PREPROCESS,
            "mean": list(predictor.backbone.mean),
            "std": list(predictor.backbone.std),
        },
        "outputs": {
            "boxes": "float32 (N, 4) xyxy canvas pixels",
            "scores": "float32 (N,), descending per class",
            "labels": "int64 (N,) contiguous 0..C-1; category_ids[label] is the dataset id",
        },
        "postprocess": POSTPROCESS,
        "score_threshold": score_threshold,
        "max_detections": 100,
        "category_ids": list(predictor.categories.ids),
        "category_names": names,
        "torch": torch.__version__,
        "opset": OPSET if fmt == "onnx" else None,
    }


def _refuse(predictor, fmt: str, where: str) -> None:
    if fmt not in FORMATS:
        raise CachedetError(f"format {fmt}: expected one of {', '.join(FORMATS)}")
    if predictor.backbone.patch:
        name = predictor.backbone.identity["name"]
        raise CachedetError(
            f"{where}: plain ViT backbones ({name}) cannot export yet: "
            "timm resizes their position embeddings with antialiased bicubic interpolation, "
            f"which ONNX opset {OPSET} lacks"
        )
    if predictor.masks:
        raise CachedetError(
            f"{where}: runs with a mask branch (detector.masks) cannot export yet "
            "(the mask paste is per image outside the graph); "
            "export a run trained without masks"
        )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _export_onnx(model: nn.Module, example: torch.Tensor, out: str, meta: dict) -> None:
    import warnings

    import onnx

    # TracerWarnings about Python values in torchvision's code: the canvas is fixed here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            out,
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=["boxes", "scores", "labels"],
            dynamic_axes={k: {0: "detections"} for k in ("boxes", "scores", "labels")},
        )
    proto = onnx.load(out)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "cachedet", json.dumps(meta)
    onnx.save(proto, out)


def _export_pt2(model: nn.Module, example: torch.Tensor, out: str, meta: dict, where: str) -> None:
    try:
        program = torch.export.export(model, (example,), strict=False)
    except Exception as e:  # torch.export raises several types for data-dependent code
        raise CachedetError(
            f"{where}: format pt2 cannot export the {meta['head']} head yet: torch.export "
            "stops at the data-dependent shapes of torchvision's detection post-processing "
            f"({type(e).__name__}); "
            "use format onnx"
        ) from None
    torch.export.save(program, out, extra_files={"cachedet.json": json.dumps(meta)})


def export_run(
    run: str,
    format: str = "onnx",
    out: str | None = None,
    checkpoint: str = "last",
    score_threshold: float = 0.05,
) -> str:
    """Export run's inference model as ONNX (``format="onnx"``) or a ``torch.export`` program (``"pt2"``).

    out: the file to write (default RUN/export/model.onnx or model.pt2); its metadata also goes to
    ``out`` with ``.json`` in place of the suffix, and the numpy/Pillow preprocessing to ``REFERENCE``
    in the same folder. checkpoint: "last", "best" or a file (as ``load``).
    score_threshold: the graph drops detections below it (before NMS, as ``load``'s).
    Returns the written path. Raises CachedetError (one line) for an unknown format, a missing run or
    checkpoint, a run that cannot export yet (mask branch; pt2 with torchvision's post-processing), or
    an exporter failure.
    """
    from cachedet.core.atomic import write_bytes_atomic, write_json_atomic
    from cachedet.core.paths import resolve_path
    from cachedet.data import preprocess
    from cachedet.evaluation.predictor import Predictor, set_score_threshold
    from cachedet.runs.record import checkpoint_path

    path = checkpoint_path(run, checkpoint)
    predictor = Predictor(path, device="cpu")
    _refuse(predictor, format, path)
    set_score_threshold(predictor.detector, score_threshold)
    run_dir = os.path.dirname(os.path.dirname(path))
    out = resolve_path(out) if out else os.path.join(run_dir, "export", f"model.{format}")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    model = InferenceModel(predictor.backbone, predictor.detector).eval()
    example = torch.zeros(1, 3, predictor.canvas, predictor.canvas)
    meta = export_metadata(predictor, path, format, score_threshold)
    if format == "pt2":
        _export_pt2(model, example, out, meta, path)
    else:
        try:
            _export_onnx(model, example, out, meta)
        except CachedetError:
            raise
        except Exception as e:  # the exporter raises many types
            message = f"{path}: ONNX export failed ({type(e).__name__}: {_first_line(e)})"
            raise CachedetError(message) from None
    write_json_atomic(os.path.splitext(out)[0] + ".json", meta, indent=2)
    with open(preprocess.__file__, "rb") as f:
        write_bytes_atomic(os.path.join(os.path.dirname(out), REFERENCE), f.read())
    return out


def read_metadata(path: str) -> dict:
    """The ``cachedet`` metadata of an exported file, from the JSON beside it."""
    side = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(side):
        raise CachedetError(f"{side}: no export metadata beside {path}")
    with open(side) as f:
        return json.load(f)


def prepare_image(pixels: torch.Tensor, meta: dict):
    """uint8 (3, H, W) RGB -> (float32 (1, 3, S, S) graph input, its ``ViewParams``), as ``PREPROCESS``:
    the Python reference of the steps a runtime does before the graph."""
    from cachedet.data.views import AugmentConfig, normalize, plan_view, transform_image

    h, w = int(pixels.shape[1]), int(pixels.shape[2])
    p = plan_view(AugmentConfig(size=int(meta["canvas"]), augment=False), 0, 0, h, w)
    view = transform_image(
        p, normalize(pixels, meta["preprocess"]["mean"], meta["preprocess"]["std"])
    )
    return view[None].numpy().astype(np.float32), p


def image_boxes(boxes: np.ndarray, params) -> tuple[np.ndarray, np.ndarray]:
    """Canvas boxes (N, 4) xyxy -> (float32 (N, 4) original-image boxes, bool (N,) boxes with area),
    as ``POSTPROCESS``; ``params`` from ``prepare_image``."""
    from cachedet.data.views import view_to_image_boxes

    b = view_to_image_boxes(params, boxes)
    return b, (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
