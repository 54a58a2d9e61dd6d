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

from cachedet.backbones import Backbone, build_backbone, config_from_identity
from cachedet.cache.store import FeatureStore
from cachedet.data.images import read_image
from cachedet.data.masks import rle_json
from cachedet.data.views import AugmentConfig, normalize, plan_view, transform_image, view_to_image_boxes
from cachedet.engine.checkpoint import load_checkpoint
from cachedet.engine.sources import check_fingerprint, fingerprint as make_fingerprint
from cachedet.errors import CachedetError
from cachedet.paths import resolve_path
from cachedet.extract import resolve_device
from cachedet.models.masks import paste_masks
from cachedet.models.detector import DetectorConfig, build_detector
from cachedet.structures import ViewParams


class Predictor:
    """Loads RUN/checkpoints/last.pt; ``predict_views`` and ``predict_images`` give COCO results."""

    def __init__(self, run: str, device: str = "auto", score_threshold: float = 0.0, need_backbone: bool = True):
        run = resolve_path(run)
        path = os.path.join(run, "checkpoints", "last.pt") if os.path.isdir(run) else run
        ckpt = load_checkpoint(path)
        self.run, self.device = run, resolve_device(device)
        self.fingerprint = ckpt["fingerprint"]
        self.categories = ckpt["categories"]
        self.category_ids = [int(c["id"]) for c in sorted(self.categories, key=lambda c: c["id"])]
        self.names = {int(c["id"]): c["name"] for c in self.categories}
        self.detector_config = DetectorConfig.from_dict(ckpt["detector_config"])
        self.canvas = self.detector_config.canvas
        self.masks = self.detector_config.masks  # detections carry RLE segmentations
        self.detector = build_detector(self.detector_config)
        self.detector.load_state_dict(ckpt["detector"])
        self.detector.to(self.device).eval()
        self.score_threshold = score_threshold
        self.adapters = tuple(ckpt.get("adapters") or ())  # stages with trained adapters
        self.backbone: Backbone | None = None
        if need_backbone:
            ident = ckpt["backbone_identity"]
            self.backbone = build_backbone(config_from_identity(ident), warn=False)
            fine_tuned = ckpt.get("backbone") is not None and not self.adapters
            if not fine_tuned and self.backbone.identity["weights_sha256"] != ident["weights_sha256"]:
                raise CachedetError(f"{path}: the backbone weights available here ({self.backbone.identity['weights']}) "
                                    f"are not the ones the run was trained on ({ident['weights']})")
            if self.adapters:  # the frozen weights above, plus the trained adapters
                self.backbone.add_adapters(self.adapters)
            if ckpt.get("backbone") is not None:
                self.backbone.load_state_dict(ckpt["backbone"])
            self.backbone.to(self.device).eval()

    def image_detections(self, params: list[ViewParams], detections: list[dict]) -> list[dict]:
        """Per view, its detections in original-image pixels, filtered by ``score_threshold``:
        dict(boxes float64 (N, 4) xyxy, scores float32 (N,), labels int64 (N,) contiguous 0..C-1,
        masks bool (N, H, W) of the original image or None). Boxes left with no area in the image
        (they lay in the canvas padding) are dropped."""
        out = []
        for p, det in zip(params, detections):
            boxes = view_to_image_boxes(p, det["boxes"].float().cpu().numpy())
            keep = (det["scores"].cpu() >= self.score_threshold) & torch.from_numpy(
                (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
            masks = None
            if "masks" in det:
                kept = keep.to(det["scores"].device)
                masks = np.zeros((int(keep.sum()), *p.orig_size), dtype=bool)
                for i, m in enumerate(self._image_masks(p, det["boxes"][kept], det["masks"][kept])):
                    masks[i] = m
            out.append({"boxes": boxes[keep.numpy()], "scores": det["scores"].cpu()[keep].float().numpy(),
                        "labels": det["labels"].cpu()[keep].numpy().astype(np.int64), "masks": masks})
        return out

    def _to_results(self, params: list[ViewParams], detections: list[dict]) -> list[dict]:
        results = []
        for p, det in zip(params, self.image_detections(params, detections)):
            rows = zip(det["boxes"], det["scores"].tolist(), det["labels"].tolist())
            for i, (box, score, label) in enumerate(rows):
                x1, y1, x2, y2 = (float(v) for v in box)
                result = {"image_id": p.image_id, "category_id": self.category_ids[label],
                          "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                          "score": round(float(score), 5)}
                if det["masks"] is not None:
                    result["segmentation"] = rle_json(det["masks"][i])
                results.append(result)
        return results

    @staticmethod
    def _image_masks(p: ViewParams, boxes: torch.Tensor, probs: torch.Tensor):
        """Yield bool (H, W) original-image masks: each box's 28x28 probabilities pasted into the box
        mapped back to the image (unclipped, so a box reaching into the padding keeps its scale)."""
        image_boxes = torch.from_numpy(view_to_image_boxes(p, boxes.float().cpu().numpy(), clip=False))
        probs = probs.float().cpu()
        if p.flip:  # the mask was predicted on the mirrored view
            probs = probs.flip(-1)
        return paste_masks(probs, image_boxes, p.orig_size)

    def predict_features(self, params: list[ViewParams], features: dict[str, torch.Tensor]) -> list[dict]:
        feats = {k: v.to(self.device).float() for k, v in features.items()}
        return self._to_results(params, self.detector.predict(feats))

    def predict_images(self, items: list[tuple[int, str, tuple[int, int] | None]], batch_size: int = 8, on_images=None) -> list[dict]:
        """items: (image_id, path, (height, width) from the annotations or None) -> COCO-format results."""
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            pixels = [(image_id, read_image(path, size)) for image_id, path, size in chunk]
            results += self._to_results(*self.detect_pixels(pixels))
            if on_images:
                on_images(len(chunk))
        return results

    def detect_pixels(self, images: list[tuple[int, torch.Tensor]]) -> tuple[list[ViewParams], list[dict]]:
        """images: (image_id, uint8 (3, H, W) RGB) -> (their plain views, detections in canvas pixels),
        one backbone batch; ``image_detections`` maps the detections back to the images."""
        assert self.backbone is not None
        plain = AugmentConfig(size=self.canvas, augment=False)
        params, views = [], []
        for image_id, image in images:
            p = plan_view(plain, image_id, 0, int(image.shape[1]), int(image.shape[2]))
            params.append(p)
            views.append(transform_image(p, normalize(image, self.backbone.mean, self.backbone.std)))
        with torch.inference_mode():
            feats = self.backbone(torch.stack(views).to(self.device))
            return params, self.detector.predict({k: v.float() for k, v in feats.items()})

    def check_store(self, store: FeatureStore):
        header = store.header
        if self.adapters:
            raise CachedetError(f"--cache {store.url}: run {self.run} trained adapters inside the backbone, so cached frozen "
                                "features do not fit it; evaluate from --images")
        if header["augment"]["augment"]:
            raise CachedetError(f"--cache {store.url}: an augmented cache; evaluate from one made with --no-augment --views 1")
        found = make_fingerprint(store.specs, header["backbone"], int(header["augment"]["size"]), header["dataset"]["categories"])
        check_fingerprint(found, self.fingerprint, f"--cache {store.url} does not fit run {self.run}", found_label="store")

    def predict_store(self, store: FeatureStore, batch_size: int = 16, on_images=None) -> list[dict]:
        self.check_store(store)
        results = []
        usable = store.usable_views()
        for start in range(0, len(usable), batch_size):
            views = usable[start:start + batch_size]
            a, b = int(views[0]), int(views[-1]) + 1
            block = store.read_features(a, b)
            idx = (views - a)
            feats = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in block.items()}
            results += self.predict_features([store.view_params(int(v)) for v in views], feats)
            if on_images:
                on_images(len(views))
        return results

