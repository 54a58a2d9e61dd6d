"""The Python API: ``load`` a trained run and ``predict`` on images; run the three stages from Python.

``cachedet.load(run).predict(images)`` accepts what a user holds: image paths, PIL images, numpy
(H, W, 3) uint8 arrays or (3, H, W) tensors, one or a batch. Paths go through the one image reader
(``cachedet.data.decode.read_image``: EXIF orientation, every Pillow mode to RGB); PIL images follow
the same rules (EXIF orientation applied, then ``to_rgb``). Each image is resized to fit the run's
canvas and padded, exactly as ``cachedet predict`` does, and its detections come back in the
image's own pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cachedet.core.errors import CachedetError, check_number
from cachedet.core.paths import resolve_path


@dataclass
class Detections:
    """Detections of one image, in its original pixels (after EXIF orientation).

    boxes float32 (N, 4) xyxy pixels; scores float32 (N,) in [0, 1], descending; labels int64 (N,)
    dataset category ids (as in the training annotations); names list[str] (N) category names;
    masks bool (N, H, W) for runs trained with ``--masks``, else None.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)


def _pil_pixels(image) -> torch.Tensor:
    from PIL import ImageOps

    from cachedet.data.decode import to_rgb

    array = np.asarray(to_rgb(ImageOps.exif_transpose(image)))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _array_pixels(array: np.ndarray, where: str) -> torch.Tensor:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise CachedetError(
            f"{where}: a numpy image must be (H, W, 3) or (H, W), got shape {tuple(array.shape)}"
        )
    if array.dtype != np.uint8:
        raise CachedetError(f"{where}: a numpy image must be uint8 (0-255), got {array.dtype}")
    if not array.shape[0] or not array.shape[1]:
        raise CachedetError(f"{where}: an empty image (shape {tuple(array.shape)})")
    array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)


def _tensor_pixels(tensor: torch.Tensor, where: str) -> torch.Tensor:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise CachedetError(
            f"{where}: a tensor image must be (3, H, W) or (1, H, W), got shape {tuple(tensor.shape)}"
        )
    tensor = tensor.detach().cpu()
    if not tensor.shape[1] or not tensor.shape[2]:
        raise CachedetError(f"{where}: an empty image (shape {tuple(tensor.shape)})")
    if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
        raise CachedetError(f"{where}: the image holds NaN or infinite values")
    if tensor.dtype.is_floating_point:  # torchvision's convention: floats in [0, 1]
        tensor = (tensor.clamp(0, 1) * 255).round().to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise CachedetError(
            f"{where}: a tensor image must be uint8 (0-255) or float (0-1), got {tensor.dtype}"
        )
    return tensor.expand(3, -1, -1).contiguous()


def to_pixels(image, where: str = "image") -> torch.Tensor:
    """One image as uint8 (3, H, W) RGB: a path (str or Path), PIL image, numpy (H, W, 3) / (H, W) uint8
    array, or tensor (3, H, W) uint8 or float in [0, 1]. Raises CachedetError naming ``where``."""
    from PIL import Image

    from cachedet.data.decode import read_image

    if isinstance(image, (str, Path)):
        return read_image(resolve_path(str(image)))
    if isinstance(image, Image.Image):
        return _pil_pixels(image)
    if isinstance(image, np.ndarray):
        return _array_pixels(image, where)
    if isinstance(image, torch.Tensor):
        return _tensor_pixels(image, where)
    raise CachedetError(
        f"{where}: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}"
    )


def _as_batch(images) -> tuple[list, bool]:
    """(list of single images, whether the input was a batch)."""
    if isinstance(images, (list, tuple)):
        return list(images), True
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images), True
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), True
    return [images], False


def _check_post_processing(score_threshold, max_detections) -> None:
    check_number("score_threshold", score_threshold, low=0, high=1)
    check_number("max_detections", max_detections, integer=True, low=1)


class Model:
    """A trained run, ready to predict: backbone (with adapters if trained), neck and head.

    Built by ``load``; ``categories`` is the run's list of {id, name} dicts, ``canvas`` its square
    input side in pixels, ``masks`` whether detections carry instance masks.
    """

    def __init__(
        self,
        path: str,
        device: str = "auto",
        score_threshold: float = 0.05,
        max_detections: int = 100,
    ):
        from cachedet.evaluation.predictor import Predictor

        _check_post_processing(score_threshold, max_detections)
        self.checkpoint = path
        self.predictor = Predictor(
            path, device=device, score_threshold=score_threshold, max_detections=max_detections
        )
        self.categories = self.predictor.categories.to_json()
        self.canvas = self.predictor.canvas
        self.masks = self.predictor.masks

    def predict(self, images, batch_size: int = 8) -> Detections | list[Detections]:
        """Detect objects in one image or a batch (list/tuple, (B, 3, H, W) tensor, (B, H, W, 3) array).

        Returns one ``Detections`` for a single image, a list of them for a batch, in input order.
        Raises CachedetError naming the image (its path, or ``images[i]``) that cannot be read.
        """
        check_number("batch_size", batch_size, integer=True, low=1)
        items, batched = _as_batch(images)
        p = self.predictor
        results = []
        for start in range(0, len(items), batch_size):
            pixels = [
                (
                    i,
                    to_pixels(
                        image, str(image) if isinstance(image, (str, Path)) else f"images[{i}]"
                    ),
                )
                for i, image in enumerate(items[start : start + batch_size], start)
            ]
            for det in p.image_detections(*p.detect_pixels(pixels)):
                ids = [p.categories.to_id(int(k)) for k in det["labels"]]
                results.append(
                    Detections(
                        boxes=det["boxes"].astype(np.float32),
                        scores=det["scores"],
                        labels=np.asarray(ids, dtype=np.int64),
                        names=[p.categories.name_of(i) for i in ids],
                        masks=det["masks"],
                    )
                )
        return results if batched else results[0]

    __call__ = predict

    def predict_files(self, inputs, batch_size: int = 8) -> FilePredictions:
        """Detect objects in image files and folders, as ``cachedet predict`` does.

        ``inputs``: paths of images or folders (scanned one level deep, sorted). In a folder, hidden
        and companion files (``.*``, ``._*``, ``.DS_Store``, ``Thumbs.db``), non-image names,
        sub-folders and images that cannot be read are skipped and reported in ``skipped``; an image
        named explicitly that cannot be read raises CachedetError naming it, as does an input that
        does not exist or inputs holding no image."""
        from cachedet.evaluation.predictor import scan_inputs

        check_number("batch_size", batch_size, integer=True, low=1)
        paths, names, skipped = scan_inputs(inputs)
        named = {resolve_path(str(q)) for q in inputs}
        unreadable = []

        def skip(path, error):
            if path in named:
                raise error
            unreadable.append(path)

        items = [(i, path, None) for i, path in enumerate(paths)]
        detections = self.predictor.predict_images(items, batch_size=batch_size, skip=skip)
        for d in detections:
            d["file_name"] = str(paths[d["image_id"]])
            d["category_name"] = self.predictor.categories.name_of(d["category_id"])
        if unreadable:
            skipped["unreadable"] = unreadable
        return FilePredictions(detections, paths, names, skipped)


@dataclass
class FilePredictions:
    """What ``Model.predict_files`` found and detected.

    detections: COCO-format dicts (``image_id``: index into ``paths``; ``bbox`` [x, y, w, h] in the
    image's original pixels; ``score``; ``category_id``; ``category_name``; ``file_name``; an RLE
    ``segmentation`` for mask runs). paths: every image found, in order; names: each one's path
    relative to the input it came from (unique, for drawn pictures); skipped: {reason: [paths]}
    (``hidden``, ``folder``, ``not an image``, ``unreadable``)."""

    detections: list[dict]
    paths: list[str]
    names: list[str]
    skipped: dict[str, list[str]]

    @property
    def predicted(self) -> list[int]:
        """Indices into ``paths`` of the images that were read and predicted."""
        bad = set(self.skipped.get("unreadable", ()))
        return [i for i, path in enumerate(self.paths) if path not in bad]


def load(
    run: str,
    checkpoint: str = "last",
    device: str = "auto",
    score_threshold: float = 0.05,
    max_detections: int = 100,
) -> Model:
    """Load a run written by ``train_heads`` / ``cachedet train-heads`` for prediction.

    run: the run directory. checkpoint: "last" (default), "best" (RUN/checkpoints/best.pt; an error
    naming the file when the run has none) or a checkpoint file. device: "auto", "cpu", "cuda", ...
    score_threshold: detections below it are dropped (inside the detector, before NMS; default 0.05 as
    in training; 0 keeps every score). max_detections: at most this many detections per image (after
    NMS; default 100 as in training, 300 is the LVIS protocol's).
    Raises CachedetError when the run or checkpoint is missing or unreadable, or when the backbone
    weights available here differ from the ones the run was trained on.
    """
    from cachedet.runs.record import checkpoint_path

    _check_post_processing(score_threshold, max_detections)  # before any file is read
    return Model(
        checkpoint_path(run, checkpoint),
        device=device,
        score_threshold=score_threshold,
        max_detections=max_detections,
    )


def extract(cfg, progress: bool = True):
    """Stage 1: run the frozen backbone over augmented views and write a feature store, as
    ``cachedet extract`` does, from an ``ExtractConfig``.

    Returns ``ExtractResult`` (store URL, views written, shards, seconds). Raises CachedetError for
    invalid settings or inputs (the message names the config field or file at fault)."""
    from cachedet.extraction.run import extract as run_extract

    return run_extract(cfg, progress)


def train_heads(cfg, progress: bool = True, origin: dict | None = None):
    """Stage 2: train neck and heads as ``cachedet train-heads`` does, from a ``TrainConfig``.

    Returns ``TrainResult`` (run dir, steps, first/last loss, seconds, views/s); the run directory holds
    config.json, metrics.jsonl and checkpoints/last.pt. ``cfg.recipe="auto"`` (the default) takes the
    recipe of the store it trains from. ``origin``: where the settings came from (recorded in
    config.json). Raises CachedetError for invalid settings."""
    from cachedet.engine.train import train

    return train(cfg, progress=progress, origin=origin)


def evaluate(
    cfg=None,
    annotations: str | None = None,
    images: str | None = None,
    progress: bool = True,
    **settings,
) -> tuple[dict, list[dict]]:
    """Stage 3: score a run on a COCO/LVIS validation file as ``cachedet eval`` does, from an
    ``EvalConfig`` (``cachedet.EvalConfig``), or from its fields as arguments:
    ``evaluate(run, annotations, images, cache=..., out=..., max_detections=...)``.

    Post-processing follows each protocol unless set: COCO 100 detections per image with the trained
    0.05 floor, LVIS 300 and no floor. Returns (metrics dict, COCO-format detections: bbox
    [x, y, w, h] in original-image pixels). Raises CachedetError for invalid settings or missing or
    mismatched inputs, naming the EvalConfig field."""
    from cachedet.evaluation.config import EvalConfig
    from cachedet.evaluation.evaluate import evaluate_run

    if not isinstance(cfg, EvalConfig):
        cfg = EvalConfig.of(run=cfg, annotations=annotations, images=images, **settings)
    elif annotations is not None or images is not None or settings:
        raise CachedetError("evaluate: give an EvalConfig or its fields, not both")
    return evaluate_run(cfg, progress)


def export(run: str, format: str = "onnx", **kwargs):
    """Export a run's detector for deployment, as ``cachedet export`` does.

    Keyword arguments as ``cachedet.tools.export.export_run``. Returns the exported file's path.
    Raises CachedetError for a missing run or an unsupported format."""
    from cachedet.tools.export import export_run

    return export_run(run, format, **kwargs)
