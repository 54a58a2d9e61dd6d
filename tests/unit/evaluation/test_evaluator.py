"""The evaluator protocol (reset / process / evaluate) against pycocotools called directly."""

from collections import Counter

import pytest

from cachedet.evaluation.evaluator import COCOEvaluator, DetectionEvaluator, inference_on_dataset
from cachedet.evaluation.scoring import coco_evaluate

GT = {
    "images": [{"id": i, "width": 100, "height": 100} for i in (1, 2)],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 3,
            "bbox": [10, 10, 30, 30],
            "area": 900,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 2,
            "category_id": 7,
            "bbox": [50, 50, 40, 20],
            "area": 800,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 3,
            "bbox": [5, 60, 20, 20],
            "area": 400,
            "iscrowd": 0,
        },
    ],
}
DETS = [
    [
        {"image_id": 1, "category_id": 3, "bbox": [11, 10, 30, 29], "score": 0.9},
        {"image_id": 1, "category_id": 7, "bbox": [60, 60, 10, 10], "score": 0.4},
    ],
    [{"image_id": 2, "category_id": 7, "bbox": [52, 50, 38, 20], "score": 0.8}],
]


def test_batches_give_what_cocoeval_gives_on_all_detections():
    seen = []
    ev = COCOEvaluator(GT)
    ev.process(
        [{"image_id": 9, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}]
    )  # cleared by reset
    result = inference_on_dataset(((1, d) for d in DETS), ev, on_images=seen.append)
    assert seen == [1, 1]
    assert result == coco_evaluate(GT, DETS[0] + DETS[1])
    assert 0 < result["summary"]["AP"] < 100


def test_detection_evaluator_names_classes_and_stratifies_by_training_counts():
    ev = DetectionEvaluator(
        GT, {3: "cat", 7: "dog"}, train_counts=Counter({3: 5, 7: 500}), count_bins=(10, 100)
    )
    metrics = inference_on_dataset(((1, d) for d in DETS), ev)
    reference = coco_evaluate(GT, DETS[0] + DETS[1])
    assert metrics["bbox"] == reference["summary"] and metrics["num_detections"] == 3
    assert [(r["name"], r["train_annotations"]) for r in metrics["per_class"]] == [
        ("cat", 5),
        ("dog", 500),
    ]
    by_bin = {r["bin"]: r["AP"] for r in metrics["by_train_count"]}
    assert by_bin["1-10"] == pytest.approx(reference["per_class"][3]) and by_bin["11-100"] is None
    assert by_bin[">100"] == pytest.approx(reference["per_class"][7])
    assert "segm" not in metrics and "lvis_bbox" not in metrics
