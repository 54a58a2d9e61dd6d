"""Validation during training: metric lines, checkpoints/best.pt, resume, TensorBoard and curves.png."""

import json
import os

import pytest
import torch
from conftest import small_config, train_config
from PIL import Image

from cachedet.core.errors import CachedetError
from cachedet.data.views import AugmentConfig
from cachedet.engine.train import train
from cachedet.extraction.run import extract
from cachedet.runs.record import load_run_checkpoint


@pytest.fixture(scope="module")
def stores(synthetic, tmp_path_factory):
    """A training store (1 view per image) and a --no-augment --views 1 store of the validation images."""
    root = tmp_path_factory.mktemp("val")
    train_store = small_config(synthetic, str(root / "train.zarr"), views=1)
    val_store = small_config(
        synthetic,
        str(root / "val.zarr"),
        annotations=synthetic["val"],
        views=1,
        augment=AugmentConfig(size=96, augment=False),
    )
    extract(train_store, progress=False)
    extract(val_store, progress=False)
    return train_store.out, val_store.out


def val_lines(run) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "val" in r]


def is_png(path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def check_best(run, metric="bbox.AP"):
    """best.pt holds the step of the first validation line with the highest ``metric``."""
    part, stat = metric.split(".")
    lines = val_lines(run)
    top = max(r["val"][part][stat] for r in lines)
    first = next(r for r in lines if r["val"][part][stat] == top)
    best = load_run_checkpoint(os.path.join(run, "checkpoints", "best.pt"))
    assert best["step"] == first["step"] and best["best"]["value"] == pytest.approx(top)
    assert best["best"] == load_run_checkpoint(os.path.join(run, "checkpoints", "last.pt"))["best"]
    return lines, best


@pytest.mark.slow
def test_validation_from_images_keeps_the_best_checkpoint(stores, synthetic, tmp_path):
    run = str(tmp_path / "run")
    train(
        train_config(
            run,
            stores[0],
            epochs=4,
            lr=0.02,
            eval_every=2,
            val_annotations=synthetic["val"],
            val_images=synthetic["images"],
        ),
        progress=False,
    )
    lines, best = check_best(run)
    assert [r["epoch"] for r in lines] == [2, 4]  # every 2 epochs (and the last), from 1
    assert set(lines[0]["val"]) >= {"bbox", "num_detections", "seconds"}
    weights = best["state"]["detector"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["train"]["eval_every"] == 2
    assert is_png(os.path.join(run, "curves.png"))


@pytest.mark.slow
def test_validation_from_a_store_resumes_against_the_best_so_far(stores, synthetic, tmp_path):
    run = str(tmp_path / "run")
    cfg = train_config(
        run, stores[0], epochs=2, lr=0.02, val_annotations=synthetic["val"], val_cache=stores[1]
    )
    train(cfg, progress=False)
    first_best = load_run_checkpoint(os.path.join(run, "checkpoints", "best.pt"))["best"]
    train(cfg.with_settings(epochs=4, resume=True), progress=False)
    lines, best = check_best(run)
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert best["best"]["value"] >= first_best["value"]


def test_bad_validation_options_fail_before_training(stores, synthetic, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CachedetError, match="val.annotations .*no such file"):
        train(
            train_config(
                run,
                stores[0],
                val_annotations=str(tmp_path / "nope.json"),
                val_images=synthetic["images"],
            ),
            progress=False,
        )
    with pytest.raises(CachedetError, match="val.cache .*augmented"):
        train(
            train_config(run, stores[0], val_annotations=synthetic["train"], val_cache=stores[0]),
            progress=False,
        )
    with pytest.raises(CachedetError, match="val.best_metric"):
        train(
            train_config(
                run,
                stores[0],
                val_annotations=synthetic["val"],
                val_cache=stores[1],
                best_metric="box.AP",
            ),
            progress=False,
        )
    assert not os.path.exists(run / "metrics.jsonl")


@pytest.mark.slow
def test_tensorboard_files_read_back(stores, synthetic, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(
        train_config(
            run, stores[0], epochs=2, val_annotations=synthetic["val"], val_cache=stores[1]
        ),
        progress=False,
    )
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "loss/loss",
        "loss/loss_cls",
        "train/lr",
        "train/views_per_s",
        "val/bbox.AP",
        "val/bbox.AP50",
    } <= tags
    steps = [e.step for e in acc.Scalars("loss/loss")]
    assert steps == list(range(1, len(steps) + 1))
    assert [e.value for e in acc.Scalars("val/bbox.AP")] == pytest.approx(
        [r["val"]["bbox"]["AP"] for r in val_lines(run)]
    )


@pytest.mark.slow
def test_eval_and_predict_take_the_best_checkpoint(cli, stores, synthetic, tmp_path):
    run = tmp_path / "run"
    train(
        train_config(
            run, stores[0], epochs=2, val_annotations=synthetic["val"], val_cache=stores[1]
        ),
        progress=False,
    )
    out = tmp_path / "m.json"
    r = cli(
        "eval",
        "--run",
        run,
        "--annotations",
        synthetic["val"],
        "--cache",
        stores[1],
        "--checkpoint",
        "best",
        "--out",
        out,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    metrics = json.loads(out.read_text())
    best = load_run_checkpoint(str(run / "checkpoints" / "best.pt"))["best"]
    assert metrics["checkpoint"] == "best" and metrics["bbox"]["AP"] == pytest.approx(best["value"])
    assert is_png(tmp_path / "m.per_class_ap.png") and is_png(tmp_path / "m.pr_curves.png")
    plain = tmp_path / "plain"
    train(train_config(plain, stores[0], epochs=1), progress=False)
    r = cli(
        "eval",
        "--run",
        plain,
        "--annotations",
        synthetic["val"],
        "--cache",
        stores[1],
        "--checkpoint",
        "best",
    )
    assert r.exit_code != 0 and "has no checkpoints/best.pt" in r.output


@pytest.mark.slow
def test_config_replay_with_an_override_trains_as_that_setting_would(cli, stores, tmp_path):
    original = tmp_path / "original"
    train(train_config(original, stores[0], epochs=1, lr=0.01), progress=False)
    r = cli(
        "train-heads",
        "--config",
        original / "config.json",
        "--out",
        tmp_path / "replay",
        "--lr",
        0.02,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    train(train_config(tmp_path / "direct", stores[0], epochs=1, lr=0.02), progress=False)
    replay = load_run_checkpoint(str(tmp_path / "replay" / "checkpoints" / "last.pt"))["state"][
        "detector"
    ]
    direct = load_run_checkpoint(str(tmp_path / "direct" / "checkpoints" / "last.pt"))["state"][
        "detector"
    ]
    assert replay.keys() == direct.keys() and all(torch.equal(replay[k], direct[k]) for k in replay)
    config = json.loads((tmp_path / "replay" / "config.json").read_text())
    assert config["overrides"] == {"lr": 0.02} and config["replayed_from"] == str(
        original / "config.json"
    )
    assert (
        config["train"]["lr"] == 0.02
        and config["train"]["detector_options"]["box_representation"] == 128
    )


@pytest.mark.slow
def test_train_heads_ends_with_the_per_class_table(cli, stores, synthetic, tmp_path):
    """train-heads with validation prints eval's per-class AP table of its last pass."""
    light = ["--box-convs", 0, "--box-fcs", 2, "--box-representation", 128]
    light += ["--rois-per-image", 64, "--proposals-per-image", 200, "--neck-channels", 32]
    r = cli(
        "train-heads",
        "--cache",
        stores[0],
        "--out",
        tmp_path / "run",
        "--epochs",
        1,
        "--batch-size",
        4,
        *light,
        "--val-annotations",
        synthetic["val"],
        "--val-cache",
        stores[1],
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert "per-class AP of the last validation" in r.output
    with open(synthetic["val"]) as f:
        categories = json.load(f)["categories"]
    for c in categories:
        assert f"{c['name']} ({c['id']})" in r.output, r.output
