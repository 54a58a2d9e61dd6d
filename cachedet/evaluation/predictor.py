"""Stage 3 inference: a trained run + its backbone -> detections in original-image coordinates.

Runs with a mask branch add each detection's mask as a COCO RLE ``segmentation``: the 28x28
probabilities pasted into the box in the original image, thresholded at 0.5.

Images are resized to fit the run's canvas and padded (no jitter), exactly like
``extract --no-augment``; detections are mapped back through the view metadata and their
contiguous labels turned back into the dataset's category ids.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cachedet.backbones.backbone import Backbone, build_backbone, config_from_identity
from cachedet.backbones.projection import Projection
from cachedet.cache.header import Fingerprint, check_weights
from cachedet.cache.store import StoreReader
from cachedet.core.errors import CachedetError
from cachedet.core.paths import resolve_path
from cachedet.core.runtime import resolve_device
from cachedet.core.structures import ViewParams
from cachedet.data.coco import CategoryMap
from cachedet.data.images import read_image
from cachedet.data.masks import rle_json
from cachedet.data.views import (
    AugmentConfig,
    normalize,
    plan_view,
    transform_image,
    view_to_image_boxes,
)
from cachedet.models.detector import DetectorConfig, build_detector
from cachedet.models.masks import paste_masks
from cachedet.runs.record import RunRecord, checkpoint_path, load_run_checkpoint

COCO_MAX_DETECTIONS, LVIS_MAX_DETECTIONS = 100, 300  # per image, as each protocol scores


def set_score_threshold(
    detector, threshold: float | None = None, max_detections: int | None = None
) -> None:
    """Set the detector's own post-processing (torchvision's ``box_score_thresh`` and
    ``detections_per_img``; 0.05 and 100 when trained): ``score_thresh`` (applied per class before
    NMS) and ``detections_per_img`` of ``RoIHeads``/cascade heads or of the RetinaNet head. ``None``
    leaves a setting as it is. Raises CachedetError for a threshold outside [0, 1] or a count < 1."""
    head = detector.head
    post = head.roi_heads if hasattr(head, "roi_heads") else head
    if threshold is not None:
        if isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
            raise CachedetError(f"score_threshold {threshold}: expected a value in [0, 1]")
        post.score_thresh = float(threshold)
    if max_detections is not None:
        if (
            isinstance(max_detections, bool)
            or int(max_detections) != max_detections
            or max_detections < 1
        ):
            raise CachedetError(f"max_detections {max_detections}: expected a whole number >= 1")
        post.detections_per_img = int(max_detections)


def checkpoint_projection(weights: dict, fingerprint: dict, path: str) -> Projection:
    """The projection a run on projected features saved in its checkpoint, checked against the
    run's fingerprint. Raises CachedetError naming ``path`` when it is missing or differs."""
    state = weights.get("projection")
    projection = Projection.from_state(state) if state is not None else None
    if projection is None or projection.sha256 != fingerprint["projection"]["sha256"]:
        raise CachedetError(
            f"{path}: the run was trained on projected features but its checkpoint "
            f"{'holds another projection' if projection is not None else 'holds no projection'}; "
            "images cannot be turned into its features"
        )
    return projection


class Predictor:
    """Loads RUN/checkpoints/last.pt (``checkpoint="best"``: best.pt; or a checkpoint file as ``run``); ``predict_views`` and ``predict_images``
    give COCO results. ``Predictor.from_model`` wraps a detector in memory (validation during training)."""

    def __init__(
        self,
        run: str,
        device: str = "auto",
        score_threshold: float | None = None,
        need_backbone: bool = True,
        checkpoint: str = "last",
        max_detections: int | None = None,
    ):
        """``score_threshold`` and ``max_detections`` (per image) set the detector's own
        post-processing too (``set_score_threshold``); ``None`` keeps the trained 0.05 and 100."""
        run = resolve_path(run)
        path = checkpoint_path(run, checkpoint)
        ckpt = load_run_checkpoint(path)
        record, weights = RunRecord.from_dict(ckpt["run"]), ckpt["state"]
        self.record = record
        detector_config = DetectorConfig.from_dict(record.detector)
        detector = build_detector(detector_config)
        detector.load_state_dict(weights["detector"])
        adapters = tuple(record.adapters or ())  # stages with trained adapters
        backbone = None
        if need_backbone:
            ident = record.backbone
            backbone = build_backbone(config_from_identity(ident), warn=False)
            fine_tuned = weights.get("backbone") is not None and not adapters
            if not fine_tuned:
                check_weights(
                    backbone.identity,
                    ident,
                    f"{path}: the backbone weights available here ({backbone.identity['weights']}) "
                    f"are not the ones the run was trained on ({ident['weights']})",
                )
            if adapters:  # the frozen weights above, plus the trained adapters
                backbone.add_adapters(adapters)
            if weights.get("backbone") is not None:
                backbone.load_state_dict(weights["backbone"])
            if record.fingerprint.get("projection") is not None:
                backbone.set_projection(checkpoint_projection(weights, record.fingerprint, path))
        self._attach(
            run,
            resolve_device(device),
            record.fingerprint,
            CategoryMap.from_json(record.categories),
            detector_config,
            detector,
            backbone,
            adapters,
            score_threshold or 0.0,
        )
        set_score_threshold(self.detector, score_threshold, max_detections)
        self.detector.to(self.device).eval()
        if self.backbone is not None:
            self.backbone.to(self.device).eval()

    @classmethod
    def from_model(
        cls,
        detector_config: DetectorConfig,
        detector,
        categories: list[dict],
        fingerprint: dict,
        backbone: Backbone | None = None,
        adapters=(),
        device: torch.device | None = None,
        score_threshold: float = 0.0,
        name: str = "(in training)",
    ) -> "Predictor":
        """A predictor on a detector (and backbone, for images) in memory, used as they are: the caller
        puts them in eval mode and on ``device`` (default: the detector's). ``categories``: [{id, name}]
        in label order; ``fingerprint``: the features the detector fits (checked against a store)."""
        self = cls.__new__(cls)
        self.record = None
        device = device or next(detector.parameters()).device
        self._attach(
            name,
            device,
            fingerprint,
            CategoryMap.from_json(categories),
            detector_config,
            detector,
            backbone,
            tuple(adapters or ()),
            score_threshold,
        )
        return self

    def _attach(
        self,
        run,
        device,
        fingerprint,
        categories,
        detector_config,
        detector,
        backbone,
        adapters,
        score_threshold,
    ):
        self.run, self.device = run, device
        self.fingerprint = Fingerprint.from_dict(fingerprint)
        self.categories = categories  # the run's labels <-> dataset category ids
        self.detector_config = detector_config
        self.canvas = detector_config.canvas
        self.masks = detector_config.masks  # detections carry RLE segmentations
        self.detector, self.backbone, self.adapters = detector, backbone, adapters
        self.score_threshold = score_threshold

    def image_detections(self, params: list[ViewParams], detections: list[dict]) -> list[dict]:
        """Per view, its detections in original-image pixels, filtered by ``score_threshold``:
        dict(boxes float64 (N, 4) xyxy, scores float32 (N,), labels int64 (N,) contiguous 0..C-1,
        masks bool (N, H, W) of the original image or None). Boxes left with no area in the image
        (they lay in the canvas padding) are dropped."""
        out = []
        for p, det in zip(params, detections):
            boxes = view_to_image_boxes(p, det["boxes"].float().cpu().numpy())
            keep = (det["scores"].cpu() >= self.score_threshold) & torch.from_numpy(
                (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            )
            masks = None
            if "masks" in det:
                kept = keep.to(det["scores"].device)
                masks = np.zeros((int(keep.sum()), *p.orig_size), dtype=bool)
                for i, m in enumerate(self._image_masks(p, det["boxes"][kept], det["masks"][kept])):
                    masks[i] = m
            out.append(
                {
                    "boxes": boxes[keep.numpy()],
                    "scores": det["scores"].cpu()[keep].float().numpy(),
                    "labels": det["labels"].cpu()[keep].numpy().astype(np.int64),
                    "masks": masks,
                }
            )
        return out

    def _to_results(self, params: list[ViewParams], detections: list[dict]) -> list[dict]:
        results = []
        for p, det in zip(params, self.image_detections(params, detections)):
            rows = zip(det["boxes"], det["scores"].tolist(), det["labels"].tolist())
            for i, (box, score, label) in enumerate(rows):
                x1, y1, x2, y2 = (float(v) for v in box)
                result = {
                    "image_id": p.image_id,
                    "category_id": self.categories.to_id(label),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(score), 5),
                }
                if det["masks"] is not None:
                    result["segmentation"] = rle_json(det["masks"][i])
                results.append(result)
        return results

    @staticmethod
    def _image_masks(p: ViewParams, boxes: torch.Tensor, probs: torch.Tensor):
        """Yield bool (H, W) original-image masks: each box's 28x28 probabilities pasted into the box
        mapped back to the image (unclipped, so a box reaching into the padding keeps its scale)."""
        image_boxes = torch.from_numpy(
            view_to_image_boxes(p, boxes.float().cpu().numpy(), clip=False)
        )
        probs = probs.float().cpu()
        if p.flip:  # the mask was predicted on the mirrored view
            probs = probs.flip(-1)
        return paste_masks(probs, image_boxes, p.orig_size)

    def predict_features(
        self, params: list[ViewParams], features: dict[str, torch.Tensor]
    ) -> list[dict]:
        feats = {k: v.to(self.device).float() for k, v in features.items()}
        return self._to_results(params, self.detector.predict(feats))

    def predict_images(
        self,
        items: list[tuple[int, str, tuple[int, int] | None]],
        batch_size: int = 8,
        on_images=None,
        skip=None,
    ) -> list[dict]:
        """items: (image_id, path, (height, width) from the annotations or None) -> COCO results.
        ``skip``: as ``iter_images``'."""
        return _flatten(self.iter_images(items, batch_size, skip), on_images)

    def iter_images(
        self,
        items: list[tuple[int, str, tuple[int, int] | None]],
        batch_size: int = 8,
        skip=None,
    ):
        """Yield (images in the batch, their COCO results) for ``items`` read from image files.
        ``skip(path, error)``, when given, is told of each image that cannot be read, which is then
        left out; without it such an image raises CachedetError naming it."""
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pixels = []
            for image_id, path, size in chunk:
                try:
                    pixels.append((image_id, read_image(path, size)))
                except CachedetError as e:
                    if skip is None:
                        raise
                    skip(path, e)
            yield len(chunk), self._to_results(*self.detect_pixels(pixels)) if pixels else []

    def detect_pixels(
        self, images: list[tuple[int, torch.Tensor]]
    ) -> tuple[list[ViewParams], list[dict]]:
        """images: (image_id, uint8 (3, H, W) RGB) -> (their plain views, detections in canvas pixels),
        one backbone batch; ``image_detections`` maps the detections back to the images.
        Raises CachedetError when the predictor was loaded without its backbone."""
        if self.backbone is None:
            raise CachedetError(
                f"run {self.run}: this predictor was loaded without its backbone; predicting images needs it"
            )
        plain = AugmentConfig(size=self.canvas, augment=False)
        params, views = [], []
        for image_id, image in images:
            p = plan_view(plain, image_id, 0, int(image.shape[1]), int(image.shape[2]))
            params.append(p)
            views.append(
                transform_image(p, normalize(image, self.backbone.mean, self.backbone.std))
            )
        with torch.inference_mode():
            feats = self.backbone(torch.stack(views).to(self.device))
            return params, self.detector.predict({k: v.float() for k, v in feats.items()})

    def check_store(self, store: StoreReader, option: str = "EvalConfig.cache"):
        """Refuse a cache whose features do not fit the run (adapters, augmented views, fingerprint);
        errors name the field ``option``."""
        header = store.header
        if self.adapters:
            raise CachedetError(
                f"{option} {store.url}: run {self.run} trained adapters inside the backbone, so cached frozen "
                "features do not fit it; evaluate from images"
            )
        if header.augmented:
            raise CachedetError(
                f"{option} {store.url}: an augmented cache; evaluate from one made with --no-augment --views 1"
            )
        header.fingerprint().check(
            self.fingerprint,
            f"{option} {store.url} does not fit run {self.run}",
            found_label="store",
        )

    def predict_store(self, store: StoreReader, batch_size: int = 16, on_images=None) -> list[dict]:
        """COCO results for every usable view of a ``--no-augment --views 1`` store."""
        return _flatten(self.iter_store(store, batch_size), on_images)

    def iter_store(
        self, store: StoreReader, batch_size: int = 16, option: str = "EvalConfig.cache"
    ):
        """Yield (views in the batch, their COCO results) from a store's cached features, after
        ``check_store`` (errors name the field ``option``)."""
        self.check_store(store, option)
        usable = store.usable_views()
        for start in range(0, len(usable), batch_size):
            views = usable[start : start + batch_size]
            a, b = int(views[0]), int(views[-1]) + 1
            for shard in range(a // store.shard_views, (b - 1) // store.shard_views + 1):
                store.ensure_verified(shard)  # the bytes its completion record was written for
            block = store.read_features(a, b)
            idx = views - a
            feats = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in block.items()}
            yield (
                len(views),
                self.predict_features([store.view_params(int(v)) for v in views], feats),
            )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
JUNK_NAMES = ("thumbs.db", "desktop.ini")


def scan_inputs(inputs) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Images named in ``inputs`` (files, or folders scanned one level deep, sorted).

    In a folder, hidden files (``.name``, macOS ``._name`` companions, ``.DS_Store``), ``Thumbs.db``,
    names without an image suffix and sub-folders (even ``old.jpg/``) are skipped and counted; a file
    named explicitly is kept as given (an unreadable one is then an error when read). Returns (paths,
    each path's name relative to the input it came from (the file name for a named file), skipped
    {reason: [paths]}). Raises CachedetError naming an input that does not exist, or when no image is left."""
    paths, names, skipped = [], [], {}
    for given in inputs:
        p = resolve_path(str(given))
        if os.path.isdir(p):
            for entry in sorted(os.listdir(p)):
                full = os.path.join(p, entry)
                reason = (
                    "hidden"
                    if entry.startswith(".") or entry.lower() in JUNK_NAMES
                    else "folder"
                    if os.path.isdir(full)
                    else None
                    if os.path.splitext(entry)[1].lower() in IMAGE_SUFFIXES
                    else "not an image"
                )
                if reason:
                    skipped.setdefault(reason, []).append(full)
                else:
                    paths.append(full)
                    names.append(os.path.join(os.path.basename(os.path.normpath(p)), entry))
        elif os.path.exists(p):
            paths.append(p)
            names.append(os.path.basename(p))
        else:
            raise CachedetError(f"{p}: no such image or folder")
    if not paths:
        raise CachedetError("no images found in " + ", ".join(map(str, inputs)))
    return paths, names, skipped


def _flatten(batches, on_images=None) -> list[dict]:
    results = []
    for n, detections in batches:
        results += detections
        if on_images:
            on_images(n)
    return results
