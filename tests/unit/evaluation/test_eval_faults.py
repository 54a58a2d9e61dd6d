"""Evaluation says what pycocotools / LVIS say: undefined metrics stay undefined, optional fields
are settled when the file is loaded, and every reported number equals the reference scorer's."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import reference_cocoeval
from helpers import reference_lvis_eval

from cachedet.core.errors import CachedetError
from cachedet.evaluation.config import EvalConfig
from cachedet.evaluation.evaluate import evaluate_run
from cachedet.evaluation.ground_truth import scoring_ground_truth
from cachedet.evaluation.scoring import COCO_STATS, coco_evaluate, lvis_evaluate, stratify_by_count
from cachedet_cli.common import console
from cachedet_cli.eval_predict import print_metrics

CATS = [
    {"id": 1, "name": "a", "frequency": "f"},
    {"id": 2, "name": "b", "frequency": "c"},
    {"id": 3, "name": "c", "frequency": "r"},
]


def medium_only(lvis: bool = True) -> dict:
    """Six 200x200 images, only medium objects (32²..96² px), no object of the rare class 3."""
    rng = np.random.default_rng(1)
    images, anns = [], []
    for i in range(1, 7):
        images.append(
            {
                "id": i,
                "file_name": f"{i}.png",
                "width": 200,
                "height": 200,
                "neg_category_ids": [3],
                "not_exhaustive_category_ids": [],
            }
        )
        for k in range(2):
            w, h = (float(v) for v in rng.uniform(40, 80, 2))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": 1 + (i + k) % 2,
                    "bbox": [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    cats = copy.deepcopy(CATS) if lvis else [{"id": c["id"], "name": c["name"]} for c in CATS]
    if not lvis:
        for img in images:
            del img["neg_category_ids"], img["not_exhaustive_category_ids"]
    return {"images": images, "annotations": anns, "categories": cats}


def noisy_detections(data: dict, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for a in data["annotations"]:
        x, y, w, h = (v + float(rng.normal(0, 4)) for v in a["bbox"])
        dets.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x, y, max(w, 2), max(h, 2)],
                "score": float(rng.uniform(0.2, 1)),
            }
        )
        dets.append(
            {
                "image_id": a["image_id"],
                "category_id": 3 - a["category_id"] % 2 if a["category_id"] == 1 else 1,
                "bbox": [5.0, 5.0, 50.0, 50.0],
                "score": float(rng.uniform(0, 0.5)),
            }
        )
    return dets


def test_every_number_equals_cocoeval_and_undefined_is_none():
    data = medium_only(lvis=False)
    dets = noisy_detections(data)
    ours = coco_evaluate(data, dets)
    ev = reference_cocoeval(data, dets)
    for k, ref in zip(COCO_STATS, ev.stats):
        assert ours["summary"][k] == (None if ref == -1 else pytest.approx(ref * 100)), k
    assert (
        ours["summary"]["APs"] is None
        and ours["summary"]["APl"] is None
        and ours["summary"]["APm"] is not None
    )
    precision = ev.eval["precision"]
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        ref = float(p[p > -1].mean() * 100) if (p > -1).any() else None
        assert ours["per_class"][cid] == (None if ref is None else pytest.approx(ref)), cid
    assert ours["per_class"][3] is None  # no ground truth of class 3


def test_lvis_numbers_equal_lvis_eval_and_no_rare_objects_is_none(tmp_path):

    data = medium_only()
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(data))
    dets = noisy_detections(data)
    ours = lvis_evaluate(scoring_ground_truth(data, str(path), True), dets)["summary"]
    ref = reference_lvis_eval(path, dets)
    assert ours.keys() == ref.keys()
    for k, v in ref.items():
        assert ours[k] == (None if v == -1 else pytest.approx(v * 100)), k
    assert ours["APr"] is None and ours["APs"] is None and ours["APc"] is not None
    empty = lvis_evaluate(scoring_ground_truth(data, str(path), True), [])["summary"]
    assert (
        empty["AP"] == 0.0 and empty["APr"] is None
    )  # no detections: 0 where defined, None where not


def test_optional_fields_defaulted_and_wrong_ones_named(tmp_path):
    data = medium_only()
    for img in data["images"]:
        del img["neg_category_ids"], img["not_exhaustive_category_ids"]
    data["annotations"][0]["segmentation"] = [[10, 10, 30, 10, 30, 30, 10, 30]]
    for a in data["annotations"]:
        del a["area"]
    gt = scoring_ground_truth(data, "v.json", True)
    assert all(
        img["neg_category_ids"] == [] and img["not_exhaustive_category_ids"] == []
        for img in gt["images"]
    )
    assert gt["annotations"][0]["area"] == pytest.approx(
        400, abs=25
    )  # the polygon's area, not the box's
    a = gt["annotations"][1]
    assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3])
    assert "area" not in data["annotations"][0]  # the caller's data is not changed
    assert lvis_evaluate(gt, noisy_detections(gt))["summary"]["AP"] > 0

    bad = medium_only()
    del bad["categories"][1]["frequency"]
    with pytest.raises(
        CachedetError, match=r"v.json: categories\[1\].frequency: missing in 1 of 3"
    ):
        scoring_ground_truth(bad, "v.json", True)
    bad = medium_only()
    bad["images"][2]["neg_category_ids"] = "3"
    with pytest.raises(CachedetError, match=r"images\[2\].neg_category_ids: expected a list"):
        scoring_ground_truth(bad, "v.json", True)
    bad = medium_only()
    bad["annotations"][4]["area"] = "big"
    with pytest.raises(CachedetError, match=r"annotations\[4\].area: expected a number"):
        scoring_ground_truth(bad, "v.json", False)


def test_fields_checked_before_any_prediction(tmp_path):
    """A bad field is reported before the run is even opened (no prediction work is lost)."""
    bad = medium_only()
    del bad["categories"][0]["frequency"]
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(CachedetError, match=r"categories\[0\].frequency"):
        evaluate_run(
            EvalConfig(str(tmp_path / "no-such-run"), str(path), str(tmp_path)), progress=False
        )


def test_tables_show_undefined_as_a_dash():
    data = medium_only(lvis=False)
    coco = coco_evaluate(data, noisy_detections(data))
    rows = stratify_by_count(coco["per_class"], {1: 5, 2: 500, 3: 50})
    assert [r["AP"] is None for r in rows] == [False, True, False, True]
    metrics = {
        "num_images": 6,
        "source": "images",
        "bbox": coco["summary"],
        "by_size": {k: coco["summary"][k] for k in ("APs", "APm", "APl")},
        "by_train_count": rows,
        "per_class": [
            {"category_id": c, "name": str(c), "AP": ap} for c, ap in coco["per_class"].items()
        ],
    }
    out = console()
    with out.capture() as cap:
        print_metrics(json.loads(json.dumps(metrics)), out)  # through JSON: None is stored as null
    text = cap.get()
    size_row = [ln for ln in text.splitlines() if ln.startswith("│ box") and ln.count("│") == 5][-1]
    assert [c.strip() for c in size_row.split("│")[2:5]] == [
        "-",
        f"{coco['summary']['APm']:.1f}",
        "-",
    ]
    assert "0.0" not in size_row
    assert json.loads(json.dumps(metrics))["bbox"]["APs"] is None
