"""``evaluate_run``: predictions for a validation set, scored and stratified, written to JSON."""

from __future__ import annotations

import os
import time
import warnings

from cachedet.core.atomic import write_json_atomic
from cachedet.data.coco import read_annotation_json
from cachedet.evaluation.config import EvalConfig
from cachedet.evaluation.evalset import EvalSet
from cachedet.evaluation.predictor import COCO_MAX_DETECTIONS, LVIS_MAX_DETECTIONS, Predictor
from cachedet.evaluation.scoring import training_counts


def evaluate_run(cfg: EvalConfig, progress: bool = True) -> tuple[dict, list[dict]]:
    """Predict on every image of ``cfg.annotations`` (from ``cfg.images`` or from a ``--no-augment``
    store ``cfg.cache``), score with COCOeval (and LVISEval for an LVIS file), and stratify per-class
    AP by training counts. A run with a mask branch is scored for masks too (``segm``, ``lvis_segm``,
    ``mask_AP`` columns). Post-processing follows each protocol unless ``cfg`` sets it (see
    ``EvalConfig``). Returns (metrics, COCO-format detections: bbox [x, y, w, h] in original-image
    pixels); with ``cfg.out`` both are written as JSON, with the per-class AP chart and
    precision-recall curves beside them (``out``'s name + .per_class_ap.png / .pr_curves.png).
    Raises CachedetError naming the EvalConfig field at fault."""
    from cachedet.core.progress import ViewProgress

    cfg.validate()
    t0 = time.perf_counter()
    evalset = EvalSet(cfg.annotations, cfg.images, cfg.cache, progress=progress)  # before any model
    score_threshold, max_detections = cfg.score_threshold, cfg.max_detections
    if evalset.is_lvis:
        score_threshold = 0.0 if score_threshold is None else score_threshold
        max_detections = max_detections or LVIS_MAX_DETECTIONS
    predictor = Predictor(
        cfg.run,
        device=cfg.device,
        need_backbone=cfg.cache is None,
        checkpoint=cfg.checkpoint,
        score_threshold=score_threshold,
        max_detections=max_detections or COCO_MAX_DETECTIONS,
    )
    train_counts = None
    if cfg.train_annotations:
        train_counts = training_counts(read_annotation_json(cfg.train_annotations)[0])
    evaluator = evalset.evaluator(
        {cid: predictor.categories.name_of(cid) for cid in predictor.categories.ids},
        predictor.masks,
        train_counts,
        cfg.count_bins,
        cfg.backend,
    )
    with ViewProgress("eval", evalset.num_images, unit="images", enabled=progress) as bar:
        scores = evalset.score(predictor, evaluator, cfg.batch_size, on_images=bar.advance)
    metrics = {
        "run": cfg.run,
        "checkpoint": cfg.checkpoint,
        "annotations": cfg.annotations,
        "source": evalset.source,
        "num_images": evalset.num_images,
        "backend": cfg.backend,
        **scores,
        "seconds": time.perf_counter() - t0,
    }
    if predictor.masks and not evalset.dataset.has_masks:
        metrics["segm_skipped"] = f"{cfg.annotations} has no segmentation to score masks against"
    if cfg.out:
        stem = os.path.splitext(cfg.out)[0]
        write_json_atomic(stem + ".detections.json", evaluator.detections)
        write_json_atomic(cfg.out, metrics, indent=2)
        write_pictures(metrics, evaluator.precision, stem)
    return metrics, evaluator.detections


def write_pictures(metrics: dict, precision: dict, stem: str) -> list[str]:
    """STEM.per_class_ap.png and STEM.pr_curves.png (and STEM.mask_pr_curves.png for masks); nothing,
    with a warning, without matplotlib. Returns the files written."""
    from cachedet.core.plots import matplotlib_available, plot_per_class_ap, plot_pr_curves

    if not matplotlib_available():
        warnings.warn(
            "matplotlib is not installed, so eval draws no AP charts (pip install matplotlib)",
            stacklevel=2,
        )
        return []
    names = {row["category_id"]: row["name"] for row in metrics["per_class"]}
    where = f"{metrics['num_images']} images, {metrics['source']}"
    written = [
        plot_per_class_ap(
            metrics["per_class"], f"{stem}.per_class_ap.png", f"AP per class ({where})"
        )
    ]
    for part, label in (("bbox", "pr_curves"), ("segm", "mask_pr_curves")):
        if part in precision:
            array, ids = precision[part]
            title = "box" if part == "bbox" else "mask"
            written.append(
                plot_pr_curves(
                    array, [names.get(c, str(c)) for c in ids], f"{stem}.{label}.png", title
                )
            )
    return written
