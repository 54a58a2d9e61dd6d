"""benchmarks/scale.py: the COCO/LVIS-sized generator, and a --quick-sized measurement."""

import json
import os

import numpy as np
import pytest
from helpers import load_benchmark


def test_generator_writes_a_valid_coco_and_lvis_file(tmp_path):
    scale = load_benchmark("scale")
    data = scale.coco_like(50, seed=3)
    assert len(data["images"]) == 50 and len(data["categories"]) == 80
    per_image = len(data["annotations"]) / 50
    assert 5 < per_image < 9  # ~7, as COCO train
    by_id = {im["id"]: im for im in data["images"]}
    for a in data["annotations"]:
        im, (poly,) = by_id[a["image_id"]], a["segmentation"]
        pts = np.asarray(poly).reshape(-1, 2)
        assert len(pts) == 16 and (pts >= -0.5).all()
        assert (pts[:, 0] <= im["width"] + 0.5).all() and (pts[:, 1] <= im["height"] + 0.5).all()
    assert scale.coco_like(50, seed=3) == data  # seeded
    lvis = scale.coco_like(20, classes=1203, lvis=True)
    assert {c["frequency"] for c in lvis["categories"]} == {"r", "c", "f"}
    assert all(
        "neg_category_ids" in im and "not_exhaustive_category_ids" in im for im in lvis["images"]
    )
    path, images = scale.write_dataset(str(tmp_path / "d"), data)
    from cachedet.data.coco import load_detection_dataset
    from cachedet.data.scan import scan_images

    ds = load_detection_dataset(path, images)  # the library accepts it, polygons and all
    assert len(ds.images) == 50 and ds.has_masks
    assert scan_images(ds, "images", progress=False).bad == []  # every link opens, sizes agree
    dets = scale.detections_for(data, per_image=100)
    assert len(dets) == 50 * 100


@pytest.mark.slow
def test_quick_sizes_measure_in_fresh_processes(tmp_path):
    scale = load_benchmark("scale")
    rows = scale.measure_sizes([30], str(tmp_path), log=lambda *_: None)
    (row,) = rows
    assert row["images"] == 30 and row["json_load_s"] > 0 and row["load_s"] > 0
    assert row["load_peak_mb"] > row["import_mb"] > 0 and row["time_ratio"] > 0
    evals = scale.measure_eval(10, str(tmp_path), log=lambda *_: None)
    assert [r["protocol"] for r in evals] == ["COCO", "LVIS"] and all(
        r["detections"] == 1000 for r in evals
    )
    fast = evals[0]["faster_coco_eval"]  # the same detections through eval --backend
    if "skipped" not in fast:
        assert fast["stats_agree"] and fast["eval_s"] > 0 and fast["speedup"] > 0
    text = scale.markdown(
        {"machine": {"cpu": "x"}, "load_before": 0, "load_after": 0, "sizes": rows, "eval": evals}
    )
    assert "| 30 |" in text and json.dumps(rows)
    assert ("faster-coco-eval s" in text) == ("skipped" not in fast)
    assert os.path.exists(os.path.join(tmp_path, "coco_30", "annotations.json"))
