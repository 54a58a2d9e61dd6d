"""``evaluate_run``: predictions for a validation set, scored and stratified, written to JSON."""

from __future__ import annotations

import os
import time
import warnings

from cachedet.cache.store import StoreReader
from cachedet.core.atomic import write_json_atomic
from cachedet.core.errors import CachedetError
from cachedet.core.paths import resolve_path
from cachedet.data.coco import load_detection_dataset, read_annotation_json
from cachedet.data.scan import scan_images
from cachedet.evaluation.evaluator import DetectionEvaluator, inference_on_dataset
from cachedet.evaluation.ground_truth import scoring_ground_truth
from cachedet.evaluation.predictor import COCO_MAX_DETECTIONS, LVIS_MAX_DETECTIONS, Predictor
from cachedet.evaluation.scoring import DEFAULT_COUNT_BINS, training_counts


def evaluate_run(
    run: str,
    annotations: str,
    images: str | None = None,
    train_annotations: str | None = None,
    cache: str | None = None,
    out: str | None = None,
    count_bins: tuple[int, ...] = DEFAULT_COUNT_BINS,
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
    checkpoint: str = "last",
    score_threshold: float | None = None,
    max_detections: int | None = None,
) -> tuple[dict, list[dict]]:
    """Predict on every image of ``annotations`` (from ``images`` or from a ``--no-augment`` cache), score
    with COCOeval (and LVISEval for an LVIS file), and stratify per-class AP by training counts. A run
    with a mask branch is scored for masks too (``segm``, ``lvis_segm``, ``mask_AP`` columns).
    ``checkpoint``: the run's last or best checkpoint. ``score_threshold`` and ``max_detections`` (per
    image) set the detector's post-processing; by default each protocol's: COCO keeps the trained 0.05
    floor and 100 detections, LVIS no floor (0) and 300. Returns (metrics, COCO-format detections); with
    ``out`` both are written as JSON, with the per-class AP chart and precision-recall curves beside them
    (``out``'s name + .per_class_ap.png / .pr_curves.png, when matplotlib is installed)."""
    from cachedet.core.progress import ViewProgress

    if cache is None and images is None:
        raise CachedetError("eval needs --images DIR or --cache VALSTORE")
    t0 = time.perf_counter()
    run, annotations, images, train_annotations, cache, out = (
        resolve_path(p) for p in (run, annotations, images, train_annotations, cache, out)
    )
    dataset = load_detection_dataset(annotations, images or os.path.dirname(annotations))
    if cache is None:  # every image there and as annotated, before the run's model is built
        scan_images(dataset, "--images", progress=progress)
    ground_truth = scoring_ground_truth(
        dataset.raw, str(annotations), dataset.is_lvis
    )  # before any prediction
    if dataset.is_lvis:
        score_threshold = 0.0 if score_threshold is None else score_threshold
        max_detections = max_detections or LVIS_MAX_DETECTIONS
    predictor = Predictor(
        run,
        device=device,
        need_backbone=cache is None,
        checkpoint=checkpoint,
        score_threshold=score_threshold,
        max_detections=max_detections or COCO_MAX_DETECTIONS,
    )
    check_categories(dataset.raw["categories"], predictor.categories, annotations)
    evaluator = DetectionEvaluator(
        ground_truth,
        {cid: predictor.categories.name_of(cid) for cid in predictor.categories.ids},
        masks=predictor.masks and dataset.has_masks,
        lvis=dataset.is_lvis,
        train_counts=training_counts(read_annotation_json(train_annotations)[0])
        if train_annotations
        else None,
        count_bins=tuple(count_bins),
    )
    with ViewProgress("eval", len(dataset.images), unit="images", enabled=progress) as bar:
        if cache is not None:
            store = StoreReader(cache)
            store.header.check_dataset(dataset.sha256, f"--cache {cache}", annotations)
            batches = predictor.iter_store(store)
        else:
            items = [(r.id, dataset.image_path(r), (r.height, r.width)) for r in dataset.images]
            batches = predictor.iter_images(items, batch_size=batch_size)
        scores = inference_on_dataset(batches, evaluator, on_images=bar.advance)
    metrics = {
        "run": run,
        "checkpoint": checkpoint,
        "annotations": annotations,
        "source": "cache" if cache else "images",
        "num_images": len(dataset.images),
        **scores,
        "seconds": time.perf_counter() - t0,
    }
    if predictor.masks and not dataset.has_masks:
        metrics["segm_skipped"] = f"{annotations} has no segmentation to score masks against"
    if out:
        write_json_atomic(os.path.splitext(out)[0] + ".detections.json", evaluator.detections)
        write_json_atomic(out, metrics, indent=2)
        write_pictures(metrics, evaluator.precision, os.path.splitext(out)[0])
    return metrics, evaluator.detections


def check_categories(categories: list[dict], run_categories, path: str) -> None:
    """Refuse a validation file whose categories are not the run's, compared by id AND name (the
    order of the table does not matter). Raises CachedetError listing the id->name pairs that differ."""
    theirs = {int(c["id"]): str(c.get("name", "")) for c in categories}
    ours = {cid: run_categories.name_of(cid) for cid in run_categories.ids}
    if set(theirs) != set(ours):
        raise CachedetError(
            f"{path}: categories differ from the run's ({len(theirs)} vs {len(ours)}); "
            "evaluate on a file with the training categories"
        )
    differ = [(cid, ours[cid], theirs[cid]) for cid in sorted(ours) if ours[cid] != theirs[cid]]
    if differ:
        pairs = ", ".join(f"{cid}: run {a!r} vs file {b!r}" for cid, a, b in differ[:10])
        more = f" and {len(differ) - 10} more" if len(differ) > 10 else ""
        raise CachedetError(
            f"{path}: category names differ from the run's for {len(differ)} ids ({pairs}{more}); "
            "evaluate on a file with the training categories"
        )


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
