"""One front door (``cachedet.api``): the CLI and Python build the same thing from the same inputs.

For each recipe: the same images extracted through ``cachedet extract`` and ``cachedet.extract``
give the same store header, and the same store trained through ``cachedet train-heads`` and
``cachedet.train_heads`` gives the same settings and the same detector (parameter names and shapes).
Before the front door resolved recipes, a ``--recipe paper`` store trained a 4conv1fc box head from
the CLI and a 2-FC head from Python, and Python's ``ExtractConfig()`` recorded no recipe and LSJ
0.1-2.0 where the CLI's default was the short recipe's 0.8-1.25."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from helpers import extract_args

import cachedet
import cachedet.core.errors as cachedet_errors
from cachedet.backbones.backbone import BackboneConfig
from cachedet.data.views import AugmentConfig


def _header(store) -> dict:
    header = dict(zarr.open_group(str(store), mode="r").attrs["cachedet"])
    for key in ("created", "cachedet_version"):
        header.pop(key, None)
    return header


def _train_settings(run) -> dict:
    with open(run / "config.json") as f:
        train = json.load(f)["train"]
    train.pop("out")
    return train


def _shapes(run) -> dict:
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return {k: tuple(v.shape) for k, v in ckpt["state"]["detector"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [None, "paper"])  # the default, and the non-default recipe
def test_cli_and_python_extract_and_train_the_same(cli, synthetic, tmp_path, recipe):
    chosen = ("--recipe", recipe) if recipe else ()
    size = ("--backbone", "test_resnet", "--random-init", "--size", 64)
    r = cli(
        *extract_args(synthetic, tmp_path / "cli.zarr"), *size, "--views", 1, *chosen, "--quiet"
    )
    assert r.exit_code == 0, r.output
    cfg = cachedet.ExtractConfig(
        annotations=synthetic["train"],
        images=synthetic["images"],
        out=str(tmp_path / "py.zarr"),
        backbone=BackboneConfig("test_resnet", None, "random"),
        augment=AugmentConfig(size=64),
        views=1,
        **({"recipe": recipe} if recipe else {}),
    )
    cachedet.extract(cfg, progress=False)
    assert _header(tmp_path / "cli.zarr") == _header(tmp_path / "py.zarr")
    assert _header(tmp_path / "py.zarr")["recipe"] == (recipe or "short")

    tiny = ("--epochs", 1, "--batch-size", 6, "--neck-channels", 16, "--quiet")
    r = cli("train-heads", "--cache", tmp_path / "cli.zarr", "--out", tmp_path / "cli_run", *tiny)
    assert r.exit_code == 0, r.output
    cachedet.train_heads(
        cachedet.TrainConfig.of(
            out=str(tmp_path / "py_run"),
            cache=str(tmp_path / "cli.zarr"),
            epochs=1,
            batch_size=6,
            neck_channels=16,
        ),
        progress=False,
    )
    cli_run, py_run = tmp_path / "cli_run", tmp_path / "py_run"
    assert _train_settings(cli_run) == _train_settings(py_run)
    assert _train_settings(py_run)["recipe"] == (recipe or "short")
    want = {"box_convs": 4, "box_fcs": 1} if recipe == "paper" else {"box_convs": 0, "box_fcs": 2}
    assert _train_settings(py_run)["detector_options"] == want
    assert _shapes(cli_run) == _shapes(py_run)


RANGES = [  # (train-heads flag, value, the TrainConfig.of setting, the field both name)
    ("--mask-convs", -1, {"detector_options": {"mask_convs": -1}}, "detector.options.mask_convs"),
    (
        "--rois-per-image",
        0,
        {"detector_options": {"rois_per_image": 0}},
        "detector.options.rois_per_image",
    ),
    ("--box-fcs", -2, {"detector_options": {"box_fcs": -2}}, "detector.options.box_fcs"),
    ("--neck-channels", -8, {"neck_channels": -8}, "detector.neck_channels"),
    ("--weight-decay", -1, {"weight_decay": -1}, "optim.weight_decay"),
    ("--epochs", 0, {"epochs": 0}, "optim.epochs"),
]


@pytest.mark.parametrize("flag, value, setting, field", RANGES, ids=[r[0] for r in RANGES])
def test_every_cli_range_is_refused_from_python_naming_the_field(
    cli, tmp_path, flag, value, setting, field
):
    """The configs check themselves: Python gets the field, the CLI the flag, for the same value."""
    (tmp_path / "none").mkdir()  # the CLI's path check passes: the range is what is refused
    with pytest.raises(cachedet_errors.CachedetError, match=rf"^{field}\b"):
        cachedet.train_heads(
            cachedet.TrainConfig.of(
                out=str(tmp_path / "py"), cache=str(tmp_path / "none"), **setting
            ),
            progress=False,
        )
    r = cli("train-heads", "--cache", tmp_path / "none", "--out", tmp_path / "cli", flag, value)
    assert r.exit_code == 2 and f"cachedet: error: {flag}" in r.stderr, r.output


EVAL_RANGES = [  # (eval flag, value, the EvalConfig field both name)
    ("--batch-size", 0, "batch_size"),
    ("--max-detections", 0, "max_detections"),
    ("--score-threshold", 1.5, "score_threshold"),
    ("--count-bins", "100,10", "count_bins"),
    ("--checkpoint", "first", "checkpoint"),
    ("--backend", "fastest", "backend"),
]


@pytest.mark.parametrize("flag, value, field", EVAL_RANGES, ids=[r[0] for r in EVAL_RANGES])
def test_every_eval_range_is_refused_from_python_naming_the_field(
    cli, tmp_path, flag, value, field
):
    """EvalConfig checks itself: Python gets EvalConfig.FIELD, the CLI the flag, before any file is read."""
    (tmp_path / "v.json").write_text("{}")  # inputs exist: the range is what is refused
    python_value = tuple(int(v) for v in value.split(",")) if field == "count_bins" else value
    with pytest.raises(cachedet_errors.CachedetError, match=rf"^EvalConfig\.{field}\b"):
        cachedet.evaluate(
            str(tmp_path),
            str(tmp_path / "v.json"),
            str(tmp_path),
            progress=False,
            **{field: python_value},
        )
    r = cli(
        "eval",
        "--run",
        tmp_path,
        "--annotations",
        tmp_path / "v.json",
        "--images",
        tmp_path,
        flag,
        value,
    )
    assert r.exit_code == 2 and f"cachedet: error: {flag}" in r.stderr, r.output


def test_evaluate_takes_a_config_or_its_fields(tmp_path):
    cfg = cachedet.EvalConfig(run=str(tmp_path / "run"), annotations=str(tmp_path / "v.json"))
    with pytest.raises(cachedet_errors.CachedetError, match="^EvalConfig.images: eval needs"):
        cachedet.evaluate(cfg, progress=False)
    with pytest.raises(cachedet_errors.CachedetError, match="EvalConfig has no setting colour"):
        cachedet.evaluate(str(tmp_path), str(tmp_path / "v.json"), colour=1)
    with pytest.raises(cachedet_errors.CachedetError, match="not both"):
        cachedet.evaluate(cfg, images=str(tmp_path))


def test_predict_cli_and_model_predict_files_agree(cli, tiny_run, synthetic, tmp_path):
    """The CLI's predict goes through Model.predict_files: same detections, same skips."""
    import json
    import os
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(os.path.join(synthetic["images"], "val"), folder)
    (folder / "._companion.jpg").write_bytes(b"\0\1")
    (folder / "notes.txt").write_text("x")
    run = tiny_run()
    found = cachedet.load(run, device="cpu", score_threshold=0.0).predict_files([folder])
    assert set(found.skipped) == {"hidden", "not an image"}
    assert found.predicted == list(range(len(found.paths)))
    r = cli(
        "predict",
        folder,
        "--run",
        run,
        "--out",
        tmp_path / "d.json",
        "--device",
        "cpu",
        "--score-threshold",
        0,
    )
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "d.json").read_text())
    assert [(d["file_name"], d["category_id"]) for d in written] == [
        (d["file_name"], d["category_id"]) for d in found.detections
    ]
    np.testing.assert_allclose(  # boxes are rounded to 0.01 px in both
        [d["bbox"] for d in written], [d["bbox"] for d in found.detections], atol=0.011
    )


def test_a_cache_runs_canvas_is_its_stores_from_python_too(tiny_store, tmp_path):
    """The CLI refuses --size on a cache run; Python refuses source.size the same way."""
    with pytest.raises(cachedet_errors.CachedetError, match=r"^source\.size 320: a cache run"):
        cachedet.train_heads(
            cachedet.TrainConfig.of(out=str(tmp_path / "run"), cache=tiny_store.url, size=320),
            progress=False,
        )
