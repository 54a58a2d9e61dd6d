"""Evaluators with detectron2's protocol: ``reset`` / ``process`` / ``evaluate``.

An evaluator receives COCO-format detections batch by batch (``process``) and scores them at the
end (``evaluate``) through the reference implementations in ``cachedet.evaluation.scoring``.
``inference_on_dataset`` drives a predictor's batches into one evaluator; ``cachedet eval``, the
demo and validation during training all use it.

Detections (COCO results format): dict(image_id, category_id, bbox [x, y, w, h] original-image
pixels, score, and for mask runs segmentation as compressed RLE).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from cachedet.evaluation.scoring import (
    DEFAULT_COUNT_BINS,
    coco_api,
    coco_evaluate,
    lvis_evaluate,
    stratify_by_count,
)


class DatasetEvaluator:
    """Base class: accumulate detections, score them once."""

    def __init__(self):
        self.detections: list[dict] = []

    def reset(self) -> None:
        self.detections = []

    def process(self, detections: list[dict]) -> None:
        self.detections.extend(detections)

    def evaluate(self) -> dict:
        raise NotImplementedError


class COCOEvaluator(DatasetEvaluator):
    """COCOeval for one ``iou_type`` (bbox or segm): {"summary", "per_class", "precision",
    "category_ids"} (``coco_evaluate``). ``backend``: ``pycocotools`` (the reference) or
    ``faster-coco-eval``; an unknown or missing one raises CachedetError on construction."""

    def __init__(self, ground_truth: dict, iou_type: str = "bbox", backend: str = "pycocotools"):
        super().__init__()
        self.ground_truth, self.iou_type, self.backend = ground_truth, iou_type, backend
        coco_api(backend)  # refused now, not after every prediction

    def evaluate(self) -> dict:
        return coco_evaluate(self.ground_truth, self.detections, self.iou_type, self.backend)


class LVISEvaluator(COCOEvaluator):
    """The lvis package's LVISEval (APr/APc/APf): {"summary"}; always the lvis package."""

    def evaluate(self) -> dict:
        return lvis_evaluate(self.ground_truth, self.detections, self.iou_type)


class DetectionEvaluator(DatasetEvaluator):
    """Everything ``cachedet eval`` reports for one validation set.

    ground_truth: the dataset from ``scoring_ground_truth``; names: {category_id: name};
    masks: score segm too (the run predicts masks and the file has segmentations); lvis: add LVISEval;
    train_counts: training annotations per category id, to stratify per-class AP (None: no strata);
    backend: the COCO scorer, ``pycocotools`` (the reference, default) or ``faster-coco-eval``
    (CachedetError naming ``EvalConfig.backend`` when unknown or not installed).
    After ``evaluate``, ``precision`` holds {"bbox"[, "segm"]: (COCOeval precision (10, 101, K),
    category ids)} for precision-recall curves (``cachedet.core.plots.plot_pr_curves``).
    ``evaluate`` returns dict(num_detections, bbox, per_class [{category_id, name, AP[, mask_AP,
    train_annotations]}], by_size, and where they apply segm, mask_by_size, lvis_bbox, lvis_segm,
    by_train_count, count_bins). AP values are 0..100 or None where the scorer leaves them undefined.
    """

    def __init__(
        self,
        ground_truth: dict,
        names: dict[int, str],
        masks: bool = False,
        lvis: bool = False,
        train_counts: Counter | None = None,
        count_bins: tuple[int, ...] = DEFAULT_COUNT_BINS,
        backend: str = "pycocotools",
    ):
        super().__init__()
        self.names, self.train_counts, self.count_bins = names, train_counts, tuple(count_bins)
        self.parts = {"bbox": COCOEvaluator(ground_truth, "bbox", backend)}
        self.precision: dict = {}
        if masks:
            self.parts["segm"] = COCOEvaluator(ground_truth, "segm", backend)
        if lvis:
            self.parts["lvis_bbox"] = LVISEvaluator(ground_truth, "bbox")
            if masks:
                self.parts["lvis_segm"] = LVISEvaluator(ground_truth, "segm")

    def reset(self) -> None:
        super().reset()
        for part in self.parts.values():
            part.reset()

    def process(self, detections: list[dict]) -> None:
        super().process(detections)
        for part in self.parts.values():
            part.process(detections)

    def evaluate(self) -> dict:
        scores = {name: part.evaluate() for name, part in self.parts.items()}
        coco, segm = scores["bbox"], scores.get("segm")
        self.precision = {
            name: (scores[name]["precision"], scores[name]["category_ids"])
            for name in ("bbox", "segm")
            if name in scores
        }
        metrics = {
            "num_detections": len(self.detections),
            "bbox": coco["summary"],
            "per_class": [
                {"category_id": cid, "name": self.names.get(cid, str(cid)), "AP": ap}
                for cid, ap in sorted(coco["per_class"].items())
            ],
        }
        if segm is not None:
            metrics["segm"] = segm["summary"]
            for row in metrics["per_class"]:
                row["mask_AP"] = segm["per_class"].get(row["category_id"])
        for name in ("lvis_bbox", "lvis_segm"):
            if name in scores:
                metrics[name] = scores[name]["summary"]
        if self.train_counts is not None:
            self._stratify(metrics, coco, segm)
        metrics["by_size"] = {k: coco["summary"][k] for k in ("APs", "APm", "APl")}
        if segm is not None:
            metrics["mask_by_size"] = {k: segm["summary"][k] for k in ("APs", "APm", "APl")}
        return metrics

    def _stratify(self, metrics: dict, coco: dict, segm: dict | None) -> None:
        counts, bins = self.train_counts, self.count_bins
        for row in metrics["per_class"]:
            row["train_annotations"] = counts.get(row["category_id"], 0)
        metrics["by_train_count"] = stratify_by_count(coco["per_class"], counts, bins)
        if segm is not None:
            for row, mask_row in zip(
                metrics["by_train_count"], stratify_by_count(segm["per_class"], counts, bins)
            ):
                row["mask_AP"] = mask_row["AP"]
        metrics["count_bins"] = list(bins)


def inference_on_dataset(
    batches: Iterable[tuple[int, list[dict]]], evaluator: DatasetEvaluator, on_images=None
) -> dict:
    """Reset ``evaluator``, feed it every batch of (number of images, detections), and score.

    ``batches`` is a predictor's iterator (``Predictor.iter_images`` / ``iter_store``);
    ``on_images(n)`` is called after each batch (a progress bar's ``advance``).
    """
    evaluator.reset()
    for n, detections in batches:
        evaluator.process(detections)
        if on_images:
            on_images(n)
    return evaluator.evaluate()
