"""COCO / LVIS scoring through the reference implementations, plus the paper's stratification.

AP is never re-implemented here: COCOeval / LVISEval compute it; this module only picks the
numbers out (summary stats, per-class AP from COCOeval's precision array) and groups classes by
how many training annotations they have. COCO scoring runs on pycocotools (the reference, the
default) or, by choice, on faster-coco-eval (``COCO_BACKENDS``): the same protocol with its
matching and accumulation in C++, tested to give pycocotools' numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import Counter

import numpy as np

from cachedet.core.errors import CachedetError

COCO_BACKENDS = ("pycocotools", "faster-coco-eval")  # the first is the reference and the default
COCO_STATS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
DEFAULT_COUNT_BINS = (10, 100, 1000)  # -> 1-10, 11-100, 101-1000, >1000


def count_bins_labels(edges: tuple[int, ...]) -> list[str]:
    labels, lo = [], 1
    for e in edges:
        labels.append(f"{lo}-{e}")
        lo = e + 1
    labels.append(f">{edges[-1]}")
    return labels


def bin_of(count: int, edges: tuple[int, ...]) -> int:
    for i, e in enumerate(edges):
        if count <= e:
            return i
    return len(edges)


def for_iou_type(detections: list[dict], iou_type: str) -> list[dict]:
    """The results COCOeval / LVISEval should see: for ``segm`` without ``bbox`` (so both take area and
    box from the RLE mask), for ``bbox`` without ``segmentation``."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    return [{k: v for k, v in d.items() if k != drop} for d in detections]


def _stat(value: float) -> float | None:
    """A reference scorer's summary number in 0..100; its -1 (undefined: no ground truth in that
    area range or frequency group) becomes None, shown as "-" and stored as null."""
    return None if value < 0 else float(value * 100)


def coco_api(backend: str = "pycocotools", field: str = "EvalConfig.backend") -> tuple:
    """(COCO, COCOeval) classes of the COCO scorer ``backend``: ``pycocotools`` or
    ``faster-coco-eval`` (its ``COCO`` and ``COCOeval_faster``, the same interface). Raises
    CachedetError naming ``field`` for an unknown backend or a faster-coco-eval not installed."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend != "faster-coco-eval":
        raise CachedetError(f"{field} {backend!r}: expected {' or '.join(COCO_BACKENDS)}")
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise CachedetError(
            f"{field} faster-coco-eval: the package is not installed; pip install "
            "faster-coco-eval (or score with the default, pycocotools)"
        ) from None
    return COCO, COCOeval_faster


def _coco_gt(gt_dataset: dict, iou_type: str, COCO):
    gt = COCO()
    gt.dataset = copy.deepcopy(gt_dataset)
    gt.dataset.setdefault("info", {})
    for ann in gt.dataset["annotations"]:
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
        if iou_type == "segm" and not ann.get("segmentation"):
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _coco_results(gt, detections: list[dict], iou_type: str, COCO):
    """COCO results object; an empty one by hand, since ``loadRes`` refuses an empty list."""
    if detections:
        return gt.loadRes(copy.deepcopy(for_iou_type(detections, iou_type)))
    dt = COCO()
    dt.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    dt.createIndex()
    return dt


def coco_evaluate(
    gt_dataset: dict, detections: list[dict], iou_type: str = "bbox", backend: str = "pycocotools"
) -> dict:
    """Score COCO-format detections with pycocotools' COCOeval (``iou_type`` bbox or segm), or with
    faster-coco-eval's ``COCOeval_faster`` (``backend``, see ``coco_api``, which raises for it).

    Returns {"summary": {AP, AP50, ..., ARl in 0..100, or None where COCOeval says -1 (no ground
    truth of that size)}, "per_class": {category_id: AP or None}, "precision": COCOeval's precision
    for area all and 100 detections, nested lists (IoU thresholds 0.5:0.95 = 10, 101 recall points,
    classes in "category_ids" order; -1 where a class has no ground truth),
    "category_ids": [...]}. No detections scores 0 wherever
    there is ground truth. For segm, ground truth without a segmentation is scored as its box.
    """
    COCO, COCOeval = coco_api(backend)
    gt = _coco_gt(gt_dataset, iou_type, COCO)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, _coco_results(gt, detections, iou_type, COCO), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    summary = {k: _stat(v) for k, v in zip(COCO_STATS, ev.stats)}
    precision = ev.eval["precision"]  # (T iou, R recall, K classes, A areas, M maxdets)
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[int(cid)] = float(p.mean() * 100) if p.size else None
    return {
        "summary": summary,
        "per_class": per_class,
        "precision": precision[:, :, :, 0, -1].tolist(),
        "category_ids": [int(c) for c in ev.params.catIds],
    }


@contextlib.contextmanager
def _lvis_quirks():
    """While LVISEval runs: lvis 0.5.3 (the latest release) uses ``np.float``, removed in numpy 1.24,
    so it is lent; and the package's INFO/WARNING log lines (its own handler) are held back."""
    import logging

    added = not hasattr(np, "float")
    if added:
        np.float = float  # type: ignore[attr-defined]
    logger = logging.getLogger("lvis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if added:
            del np.float


def _lvis_objects(gt_dataset: dict, detections: list[dict], iou_type: str):
    """(LVIS, LVISResults) from an in-memory dataset; the ``lvis`` package only reads files and
    refuses an empty result list, so both are built on its classes' indexes."""
    import logging

    from lvis import LVIS, LVISResults

    class _Ground(LVIS):
        def __init__(self, dataset):
            self.logger = logging.getLogger("lvis")
            self.dataset = dataset
            self._create_index()

    class _NoResults(LVISResults):
        def __init__(self, gt):
            self.logger = logging.getLogger("lvis")
            self.dataset = {**copy.deepcopy(gt.dataset), "annotations": []}
            self._create_index()

    gt = _Ground(copy.deepcopy(gt_dataset))
    if not detections:
        return gt, _NoResults(gt)
    return gt, LVISResults(gt, copy.deepcopy(for_iou_type(detections, iou_type)))


def lvis_evaluate(ground_truth: dict | str, detections: list[dict], iou_type: str = "bbox") -> dict:
    """Score with the ``lvis`` package's LVISEval (``iou_type`` bbox or segm): AP, AP50, AP75, APs/m/l,
    APr, APc, APf (0..100, None where LVISEval says -1: no ground truth in that group).

    ``ground_truth`` is a dataset prepared by ``cachedet.evaluation.ground_truth`` or an LVIS file path.
    """
    from lvis import LVISEval

    if isinstance(ground_truth, str):
        from cachedet.data.coco import read_annotation_json

        ground_truth = read_annotation_json(ground_truth)[0]
    with contextlib.redirect_stdout(io.StringIO()), _lvis_quirks():
        gt, dt = _lvis_objects(ground_truth, detections, iou_type)
        ev = LVISEval(gt, dt, iou_type=iou_type)
        ev.run()
        results = ev.get_results()
    return {"summary": {k: _stat(v) for k, v in results.items()}}


def training_counts(train_dataset: dict) -> Counter:
    """Training annotations per category id (crowd excluded)."""
    return Counter(
        a["category_id"] for a in train_dataset.get("annotations", []) if not a.get("iscrowd", 0)
    )


def stratify_by_count(
    per_class: dict, counts: Counter, edges: tuple[int, ...] = DEFAULT_COUNT_BINS
) -> list[dict]:
    """Mean AP of the classes in each training-count bin (classes with no val objects are left out)."""
    labels = count_bins_labels(edges)
    rows = []
    for b, label in enumerate(labels):
        aps = [
            ap
            for cid, ap in per_class.items()
            if ap is not None and counts.get(cid, 0) > 0 and bin_of(counts[cid], edges) == b
        ]
        rows.append({"bin": label, "classes": len(aps), "AP": float(np.mean(aps)) if aps else None})
    unseen = [ap for cid, ap in per_class.items() if ap is not None and counts.get(cid, 0) == 0]
    if unseen:
        rows.append({"bin": "0 (unseen)", "classes": len(unseen), "AP": float(np.mean(unseen))})
    return rows
