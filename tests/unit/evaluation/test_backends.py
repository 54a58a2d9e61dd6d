"""The optional COCO scorer faster-coco-eval gives pycocotools' numbers (the reference) on the same
detections, and is refused in one line where it is not installed (issue 29, item 3)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import to_lvis
from helpers import load_benchmark
from pycocotools import mask as mask_utils

from cachedet.core.errors import CachedetError
from cachedet.evaluation.config import EvalConfig
from cachedet.evaluation.evaluate import evaluate_run
from cachedet.evaluation.evaluator import DetectionEvaluator, inference_on_dataset
from cachedet.evaluation.ground_truth import scoring_ground_truth
from cachedet.evaluation.scoring import COCO_STATS, coco_evaluate

SIDES = ((640, 480), (480, 640), (320, 240), (200, 300))


def generated(n_images: int = 300, classes: int = 6, seed: int = 0) -> tuple[dict, list[dict]]:
    """(COCO ground truth, results) for ``n_images`` images: 0-9 objects each over every area range
    (4-300 px sides), one in 12 a crowd, polygon masks; per image jittered copies of its objects
    (some twice), false positives of every class and, on one image in ten, more than 100
    detections; scores rounded to 3 decimals (so ties occur); results carry an RLE mask."""
    _polygon = load_benchmark("scale")._polygon  # a star-shaped polygon inside a box
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        w, h = SIDES[i % len(SIDES)]
        images.append({"id": i, "file_name": f"{i}.jpg", "width": w, "height": h})
        for _ in range(int(rng.integers(0, 10))):
            side = float(np.exp(rng.uniform(np.log(4), np.log(min(w, h, 300)))))
            bw, bh = side * rng.uniform(0.6, 1.0), side * rng.uniform(0.6, 1.0)
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(rng.integers(1, classes + 1)),
                    "bbox": [x, y, bw, bh],
                    "iscrowd": int(rng.random() < 1 / 12),
                    "segmentation": [_polygon(rng, x, y, bw, bh)],
                }
            )
        truth = [a for a in anns if a["image_id"] == i]
        extra = 110 if i % 10 == 0 else int(rng.integers(0, 15))
        for k in range(len(truth) * 2 + extra):
            if k < 2 * len(truth) and rng.random() < 0.8:  # the object, moved and resized a little
                a = truth[k // 2]
                x0, y0, bw0, bh0 = a["bbox"]
                x, y, bw, bh = (v + float(rng.normal(0, 0.08 * max(bw0, bh0))) for v in a["bbox"])
                bw, bh = max(bw, 1.0), max(bh, 1.0)
                pts = np.asarray(a["segmentation"][0]).reshape(-1, 2)
                pts = (pts - (x0, y0)) * (bw / bw0, bh / bh0) + (x, y)
                polygon = pts.reshape(-1).tolist()
                cid, score = a["category_id"], rng.uniform(0.3, 1.0)
            else:
                bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
                x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
                polygon = _polygon(rng, x, y, bw, bh)
                cid, score = int(rng.integers(1, classes + 1)), rng.uniform(0.0, 0.7)
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], h, w))
            rle["counts"] = rle["counts"].decode()
            dets.append(
                {
                    "image_id": i,
                    "category_id": cid,
                    "bbox": [x, y, bw, bh],
                    "score": round(float(score), 3),
                    "segmentation": rle,
                }
            )
    categories = [{"id": c, "name": f"class_{c}"} for c in range(1, classes + 1)]
    data = {"images": images, "annotations": anns, "categories": categories}
    return scoring_ground_truth(data, "generated.json", False), dets


@pytest.fixture(scope="module")
def case():
    return generated()


def _same_summary(ours: dict, theirs: dict) -> None:
    """The 12 COCO stats in COCOeval's 0..1 units agree to 1e-6; undefined (None) on both sides."""
    assert list(ours) == list(theirs) == list(COCO_STATS)
    for name in COCO_STATS:
        a, b = ours[name], theirs[name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert abs(a / 100 - b / 100) <= 1e-6, (name, a, b)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_gives_pycocotools_numbers(case, iou_type):
    pytest.importorskip("faster_coco_eval")
    gt, dets = case
    assert sum(a["iscrowd"] for a in gt["annotations"]) > 10 and len(dets) > 5000
    reference = coco_evaluate(gt, dets, iou_type)
    fast = coco_evaluate(gt, dets, iou_type, backend="faster-coco-eval")
    assert all(reference["summary"][k] is not None for k in ("APs", "APm", "APl"))
    assert 5 < reference["summary"]["AP"] < 95  # neither trivial nor empty
    _same_summary(fast["summary"], reference["summary"])
    assert fast["category_ids"] == reference["category_ids"]
    np.testing.assert_allclose(fast["precision"], reference["precision"], rtol=0, atol=1e-6)
    assert fast["per_class"].keys() == reference["per_class"].keys()
    for cid, ap in reference["per_class"].items():
        assert fast["per_class"][cid] == pytest.approx(ap, abs=1e-4)  # AP in 0..100


def test_detection_evaluator_reports_the_same_with_either_backend(case):
    pytest.importorskip("faster_coco_eval")
    gt, dets = case
    names = {c["id"]: c["name"] for c in gt["categories"]}
    counts = Counter({1: 5, 2: 50, 3: 500, 4: 5000, 5: 3})
    results = {}
    for backend in ("pycocotools", "faster-coco-eval"):
        ev = DetectionEvaluator(gt, names, masks=True, train_counts=counts, backend=backend)
        batches = ((1, dets[k : k + 997]) for k in range(0, len(dets), 997))
        results[backend] = (inference_on_dataset(batches, ev), ev.precision)
    (ref, ref_pr), (fast, fast_pr) = results["pycocotools"], results["faster-coco-eval"]
    for part in ("bbox", "segm"):
        _same_summary(fast[part], ref[part])
        np.testing.assert_allclose(fast_pr[part][0], ref_pr[part][0], rtol=0, atol=1e-6)
        assert fast_pr[part][1] == ref_pr[part][1]
    for table, key in (("per_class", "category_id"), ("by_train_count", "bin")):
        assert [r[key] for r in fast[table]] == [r[key] for r in ref[table]]
        for a, b in zip(fast[table], ref[table]):
            for col in ("AP", "mask_AP"):
                assert (a[col] is None) == (b[col] is None)
                if b[col] is not None:
                    assert a[col] == pytest.approx(b[col], abs=1e-4)


def _without_faster_coco_eval(monkeypatch):
    """``import faster_coco_eval`` raises ImportError, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)


def test_missing_backend_is_refused_in_one_line_naming_the_field(monkeypatch, tmp_path):
    _without_faster_coco_eval(monkeypatch)
    cfg = EvalConfig(
        run=str(tmp_path), annotations="val.json", images=str(tmp_path), backend="faster-coco-eval"
    )
    with pytest.raises(CachedetError) as e:
        cfg.validate()
    message = str(e.value)
    assert "\n" not in message and message.startswith("EvalConfig.backend faster-coco-eval")
    assert "pip install faster-coco-eval" in message
    with pytest.raises(CachedetError, match="EvalConfig.backend"):
        DetectionEvaluator(generated(2)[0], {}, backend="faster-coco-eval")
    with pytest.raises(CachedetError, match="EvalConfig.backend 'nope': expected pycocotools or"):
        cfg.with_settings(backend="nope").validate()
    cfg.with_settings(backend="pycocotools").validate()  # the default needs nothing more


def test_cli_names_the_backend_option(cli, monkeypatch, tmp_path):
    _without_faster_coco_eval(monkeypatch)
    (tmp_path / "v.json").write_text("{}")
    r = cli(
        "eval", "--run", tmp_path, "--annotations", tmp_path / "v.json", "--images", tmp_path,
        "--backend", "faster-coco-eval",
    )  # fmt: skip
    assert r.exit_code == 2
    assert "cachedet: error: --backend faster-coco-eval: the package is not installed" in r.stderr
    assert "pip install faster-coco-eval" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("lvis", [False, True])
def test_eval_with_either_backend_reports_the_same(
    synthetic, tiny_run, tmp_path, lvis, monkeypatch
):
    """``EvalConfig.backend`` reaches the scorer through eval; an LVIS file's LVISEval numbers do
    not depend on it."""
    pytest.importorskip("faster_coco_eval")
    from cachedet.evaluation import scoring

    used, coco_api = [], scoring.coco_api
    monkeypatch.setattr(
        scoring, "coco_api", lambda backend: used.append(backend) or coco_api(backend)
    )
    annotations = synthetic["val"]
    if lvis:
        with open(annotations) as f:
            data = to_lvis(json.load(f))
        annotations = str(tmp_path / "lvis_val.json")
        Path(annotations).write_text(json.dumps(data))
    cfg = EvalConfig(tiny_run(masks=True), annotations, synthetic["images"], device="cpu")
    ref, dets = evaluate_run(cfg, progress=False)
    fast, fast_dets = evaluate_run(cfg.with_settings(backend="faster-coco-eval"), progress=False)
    assert (ref["backend"], fast["backend"]) == ("pycocotools", "faster-coco-eval")
    assert used == ["pycocotools"] * 2 + ["faster-coco-eval"] * 2  # bbox and segm each
    assert fast_dets == dets and "segm" in ref and ("lvis_bbox" in ref) == lvis
    for part in ("bbox", "segm"):
        _same_summary(fast[part], ref[part])
    for key in ("seconds", "backend", "bbox", "segm"):
        del ref[key], fast[key]
    assert _close(fast, ref)  # per-class, by size, by training count, lvis_bbox / lvis_segm


def _close(a, b) -> bool:
    """Nested metrics equal, floats to 1e-4 (AP in 0..100)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    return a == b
