"""One front door (``cachedet.api``): the CLI and Python build the same thing from the same inputs.

For each recipe: the same images extracted through ``cachedet extract`` and ``cachedet.extract``
give the same store header, and the same store trained through ``cachedet train-heads`` and
``cachedet.train_heads`` gives the same settings and the same detector (parameter names and shapes).
Before the front door resolved recipes, a ``--recipe paper`` store trained a 4conv1fc box head from
the CLI and a 2-FC head from Python, and Python's ``ExtractConfig()`` recorded no recipe and LSJ
0.1-2.0 where the CLI's default was the short recipe's 0.8-1.25."""

from __future__ import annotations

import json

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
    with pytest.raises(cachedet_errors.CachedetError, match=rf"^{field}\b"):
        cachedet.train_heads(
            cachedet.TrainConfig.of(
                out=str(tmp_path / "py"), cache=str(tmp_path / "none"), **setting
            ),
            progress=False,
        )
    r = cli("train-heads", "--cache", tmp_path / "none", "--out", tmp_path / "cli", flag, value)
    assert r.exit_code == 2 and f"cachedet: error: {flag}" in r.stderr, r.output
