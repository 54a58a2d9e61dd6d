"""Evaluation follows each protocol (issue 31): detections per image and score floor per protocol,
categories checked by id and name, metrics independent of annotation ids; predict scans folders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import to_lvis
from helpers import reference_lvis_eval
from test_eval_faults import medium_only, noisy_detections

from cachedet.core.errors import CachedetError
from cachedet.evaluation.config import EvalConfig
from cachedet.evaluation.draw import draw_detections
from cachedet.evaluation.evalset import check_categories
from cachedet.evaluation.evaluate import evaluate_run
from cachedet.evaluation.ground_truth import scoring_ground_truth
from cachedet.evaluation.predictor import Predictor, scan_inputs, set_score_threshold
from cachedet.evaluation.scoring import coco_evaluate, lvis_evaluate

NUMBERINGS = {
    "from 0": lambda i: i,
    "from 1": lambda i: i + 1,
    "negative": lambda i: -5 - i,
    "huge": lambda i: 2**40 + 7 * i,
    "all 0": lambda i: 0,
    "duplicated": lambda i: i // 2,
}


@pytest.mark.parametrize("lvis", [False, True])
def test_metrics_do_not_depend_on_annotation_ids(tmp_path, lvis):
    data = medium_only(lvis=lvis)
    dets = noisy_detections(data)
    score = lvis_evaluate if lvis else coco_evaluate
    results = {}
    for name, number in NUMBERINGS.items():
        numbered = copy.deepcopy(data)
        for i, ann in enumerate(numbered["annotations"]):
            ann["id"] = number(i)
        gt = scoring_ground_truth(numbered, str(tmp_path / "v.json"), lvis)
        results[name] = score(gt, copy.deepcopy(dets))["summary"]
    for name, summary in results.items():
        assert summary == results["from 1"], name


def test_categories_checked_by_id_and_name():
    run = {1: "apple", 2: "berry"}
    check_categories([{"id": 2, "name": "berry"}, {"id": 1, "name": "apple"}], run, "v.json")
    with pytest.raises(CachedetError, match="1: run 'apple' vs file 'berry'.*2: run 'berry'"):
        check_categories([{"id": 1, "name": "berry"}, {"id": 2, "name": "apple"}], run, "v.json")
    with pytest.raises(CachedetError, match="categories differ"):
        check_categories([{"id": 1, "name": "apple"}], run, "v.json")


def test_post_processing_set_from_the_options(tiny_run):
    p = Predictor(
        tiny_run(), device="cpu", need_backbone=False, score_threshold=0.0, max_detections=7
    )
    post = p.detector.head.roi_heads
    assert (post.score_thresh, post.detections_per_img) == (0.0, 7)
    for bad in ({"threshold": 1.5}, {"max_detections": 0}, {"max_detections": 2.5}):
        with pytest.raises(CachedetError):
            set_score_threshold(p.detector, **bad)


def test_lvis_eval_uses_300_and_no_floor_and_equals_lvis_eval(synthetic, tiny_run, tmp_path):

    with open(synthetic["val"]) as f:
        data = to_lvis(json.load(f))
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps(data))
    metrics, dets = evaluate_run(
        EvalConfig(tiny_run(), str(path), synthetic["images"], device="cpu"), progress=False
    )
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    # a head trained 2 steps: near-uniform scores, so more than COCO's 100 survive NMS per image
    assert 100 < max(per_image.values()) <= 300
    ref = reference_lvis_eval(path, dets)
    assert metrics["lvis_bbox"]["AP"] == pytest.approx(ref["AP"] * 100)
    coco, _ = evaluate_run(
        EvalConfig(tiny_run(), synthetic["val"], synthetic["images"], device="cpu"), progress=False
    )
    assert coco["num_detections"] <= 100 * len(data["images"])


def test_folder_scan_skips_junk_and_reports_it(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.jpg")
    Image.new("RGB", (8, 8)).save(photos / "b.PNG")
    for junk in ("._a.jpg", ".DS_Store", "Thumbs.db", "notes.txt", ".hidden.png"):
        (photos / junk).write_bytes(b"\0\1junk")
    (photos / "old.jpg").mkdir()
    single = tmp_path / "c.jpg"
    single.write_bytes(b"not really")
    paths, names, skipped = scan_inputs([photos, single])
    assert [n for n in names] == ["photos/a.jpg", "photos/b.PNG", "c.jpg"]
    assert paths[-1] == str(single)
    assert {k: len(v) for k, v in skipped.items()} == {"hidden": 4, "not an image": 1, "folder": 1}
    with pytest.raises(CachedetError, match="no such image"):
        scan_inputs([tmp_path / "nope"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CachedetError, match="no images found"):
        scan_inputs([empty])


def test_drawn_names_mirror_the_input_folders(tmp_path):
    from PIL import Image

    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / folder / "same.jpg")
    paths, names, _ = scan_inputs([tmp_path / "x", tmp_path / "y"])
    written = draw_detections(paths, [], str(tmp_path / "drawn"), names=names)
    assert len(set(written)) == 2
    assert sorted(
        p.relative_to(tmp_path / "drawn").as_posix() for p in (tmp_path / "drawn").rglob("*.png")
    ) == [
        "x/same.png",
        "y/same.png",
    ]
    again = draw_detections(paths, [], str(tmp_path / "d2"), names=["same.jpg", "same.jpg"])
    assert len(set(again)) == 2


def test_cli_refuses_out_of_range_options_naming_the_flag(cli, tmp_path):
    r = cli(
        "predict", tmp_path, "--run", tmp_path, "--out", tmp_path / "d.json", "--max-detections", 0
    )
    assert r.exit_code == 2 and "--max-detections: expected an integer >= 1, got 0" in r.stderr
    (tmp_path / "v.json").write_text("{}")  # inputs exist: the range is what is refused
    r = cli(
        "eval", "--run", tmp_path, "--annotations", tmp_path / "v.json", "--score-threshold", -1
    )
    assert (
        r.exit_code == 2
        and "--score-threshold: expected a number >= 0 and <= 1, got -1" in r.stderr
    )


def test_eval_and_validation_share_the_category_check(synthetic, tmp_path):
    """One EvalSet for eval and for validation: a val file with two names swapped is refused by
    both, naming their own field (validation compared ids only before)."""
    from cachedet.evaluation.evalset import EvalSet

    data = json.loads(Path(synthetic["val"]).read_text())
    ours = {c["id"]: c["name"] for c in data["categories"]}
    a, b = sorted(ours)[:2]
    for c in data["categories"]:
        c["name"] = {a: ours[b], b: ours[a]}.get(c["id"], c["name"])
    path = tmp_path / "swapped.json"
    path.write_text(json.dumps(data))
    for prefix in ("EvalConfig.", "val."):
        evalset = EvalSet(str(path), synthetic["images"], prefix=prefix)
        with pytest.raises(CachedetError, match=rf"^{prefix}annotations .*names differ.*{a}: run"):
            evalset.evaluator(ours, masks=False)
    EvalSet(synthetic["val"], synthetic["images"]).evaluator(ours, masks=False)  # the same file
