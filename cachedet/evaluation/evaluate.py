"""``evaluate_run``: predictions for a validation set, scored and stratified, written to JSON."""

from __future__ import annotations

import os
import time

from cachedet.atomic import write_json_atomic
from cachedet.cache.store import StoreReader
from cachedet.data.coco import load_detection_dataset, read_annotation_json
from cachedet.errors import CachedetError
from cachedet.paths import resolve_path
from cachedet.evaluation.ground_truth import scoring_ground_truth
from cachedet.evaluation.predictor import Predictor
from cachedet.evaluation.scoring import (
    DEFAULT_COUNT_BINS, coco_evaluate, lvis_evaluate, stratify_by_count, training_counts,
)


def evaluate_run(run: str, annotations: str, images: str | None = None, train_annotations: str | None = None,
                 cache: str | None = None, out: str | None = None, count_bins: tuple[int, ...] = DEFAULT_COUNT_BINS,
                 device: str = "auto", batch_size: int = 8, progress: bool = True) -> tuple[dict, list[dict]]:
    """Predict on every image of ``annotations`` (from ``images`` or from a ``--no-augment`` cache), score
    with COCOeval (and LVISEval for an LVIS file), and stratify per-class AP by training counts. A run
    with a mask branch is scored for masks too (``segm``, ``lvis_segm``, ``mask_AP`` columns).
    Returns (metrics, COCO-format detections); with ``out`` both are written as JSON."""
    from cachedet.progress import ViewProgress

    if cache is None and images is None:
        raise CachedetError("eval needs --images DIR or --cache VALSTORE")
    t0 = time.perf_counter()
    run, annotations, images, train_annotations, cache, out = (
        resolve_path(p) for p in (run, annotations, images, train_annotations, cache, out))
    dataset = load_detection_dataset(annotations, images or os.path.dirname(annotations))
    ground_truth = scoring_ground_truth(dataset.raw, str(annotations), dataset.is_lvis)  # before any prediction
    predictor = Predictor(run, device=device, need_backbone=cache is None)
    if dataset.categories.ids != predictor.categories.ids:
        raise CachedetError(f"{annotations}: categories differ from the run's ({len(dataset.categories)} vs "
                            f"{len(predictor.categories)}); evaluate on a file with the training categories")
    with ViewProgress("eval", len(dataset.images), unit="images", enabled=progress) as bar:
        if cache is not None:
            store = StoreReader(cache)
            store.header.check_dataset(dataset.sha256, f"--cache {cache}", annotations)
            detections = predictor.predict_store(store, on_images=bar.advance)
        else:
            items = [(r.id, dataset.image_path(r), (r.height, r.width)) for r in dataset.images]
            detections = predictor.predict_images(items, batch_size=batch_size, on_images=bar.advance)
    seconds_predict = time.perf_counter() - t0
    coco = coco_evaluate(ground_truth, detections)
    metrics = {
        "run": run,
        "annotations": annotations,
        "source": "cache" if cache else "images",
        "num_images": len(dataset.images),
        "num_detections": len(detections),
        "bbox": coco["summary"],
        "per_class": [{"category_id": cid, "name": predictor.categories.name_of(cid), "AP": ap}
                      for cid, ap in sorted(coco["per_class"].items())],
        "seconds_predict": seconds_predict,
    }
    segm = None
    if predictor.masks and dataset.has_masks:
        segm = coco_evaluate(ground_truth, detections, "segm")
        metrics["segm"] = segm["summary"]
        for row in metrics["per_class"]:
            row["mask_AP"] = segm["per_class"].get(row["category_id"])
    elif predictor.masks:
        metrics["segm_skipped"] = f"{annotations} has no segmentation to score masks against"
    if dataset.is_lvis:
        metrics["lvis_bbox"] = lvis_evaluate(ground_truth, detections)["summary"]
        if segm is not None:
            metrics["lvis_segm"] = lvis_evaluate(ground_truth, detections, "segm")["summary"]
    if train_annotations:
        train_data, _ = read_annotation_json(train_annotations)
        counts = training_counts(train_data)
        for row in metrics["per_class"]:
            row["train_annotations"] = counts.get(row["category_id"], 0)
        metrics["by_train_count"] = stratify_by_count(coco["per_class"], counts, tuple(count_bins))
        if segm is not None:
            for row, mask_row in zip(metrics["by_train_count"], stratify_by_count(segm["per_class"], counts, tuple(count_bins))):
                row["mask_AP"] = mask_row["AP"]
        metrics["count_bins"] = list(count_bins)
    metrics["by_size"] = {k: coco["summary"][k] for k in ("APs", "APm", "APl")}
    if segm is not None:
        metrics["mask_by_size"] = {k: segm["summary"][k] for k in ("APs", "APm", "APl")}
    if out:
        write_json_atomic(os.path.splitext(out)[0] + ".detections.json", detections)
        write_json_atomic(out, metrics, indent=2)
    return metrics, detections
