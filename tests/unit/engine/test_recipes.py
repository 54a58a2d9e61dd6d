"""Recipes: resolution (explicit settings win), the warm-up rule, agreement of extract and train-heads
(recorded in the store header and config.json), and the one-line guidance for short schedules."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import zarr

from cachedet.core.errors import CachedetError
from cachedet.core.recipes import RECIPES, schedule_advice, train_recipe, warmup_steps_for
from cachedet.engine.config import resolve_recipe
from cachedet.engine.train import TrainConfig, lr_factor

TINY = ("--epochs", 1, "--batch-size", 6, "--neck-channels", 16, "--quiet")


def test_warmup_is_five_percent_of_the_run_capped_at_1000_steps():
    assert [warmup_steps_for(n) for n in (1, 10, 96, 216, 2000, 20_000, 10**6)] == [
        1,
        1,
        5,
        11,
        100,
        1000,
        1000,
    ]
    factor = lr_factor(TrainConfig.of(out="r", cache="c"), 200)  # 10 warm-up steps
    assert (
        factor(0) == pytest.approx(0.001)
        and factor(5) == pytest.approx(0.5005)
        and factor(10) == 1.0
    )
    explicit = lr_factor(TrainConfig.of(out="r", cache="c", warmup_steps=100), 200)
    assert explicit(50) == pytest.approx(0.5005)


def test_recipe_fills_in_only_what_is_not_given():
    short, paper = RECIPES["short"], RECIPES["paper"]
    cfg = TrainConfig.of(out="r", cache="c")
    assert cfg.recipe == "auto" and cfg.source.scale_range is None  # resolved at the front door
    cfg, notes = resolve_recipe(cfg)  # no store to read at "c": the default recipe
    assert cfg.recipe == "short" and cfg.source.scale_range == short.scale_range and notes == []
    assert cfg.detector.options == {"box_convs": 0, "box_fcs": 2}
    cfg = TrainConfig.of(
        out="r", cache="c", recipe="paper", detector_options={"box_fcs": 2, "rois_per_image": 64}
    )
    assert cfg.source.scale_range == paper.scale_range
    assert cfg.detector.options == {
        "box_convs": 4,
        "box_fcs": 2,
        "rois_per_image": 64,
    }  # the given box_fcs wins
    assert TrainConfig.of(
        out="r", cache="c", recipe="paper", scale_range=(0.5, 1.5)
    ).source.scale_range == (
        0.5,
        1.5,
    )
    assert (
        TrainConfig.of(out="r", cache="c", head="cascade").detector.options == {}
    )  # the cascade keeps its own head
    with pytest.raises(
        CachedetError, match="TrainConfig.recipe fast: expected one of short, paper"
    ):
        TrainConfig.of(out="r", cache="c", recipe="fast")


def test_runs_recorded_before_recipes_keep_their_settings():
    legacy = TrainConfig.from_dict(
        {
            "out": "r",
            "cache": "c",
            "scale_range": [0.1, 2.0],
            "detector_options": {},
            "warmup_steps": 100,
        }
    )
    assert (
        legacy.recipe is None and legacy.detector.options == {} and legacy.optim.warmup_steps == 100
    )


def test_train_heads_takes_the_store_recipe_unless_given():
    assert train_recipe(None, None) == ("short", None)
    assert train_recipe(None, SimpleNamespace(recipe="paper")) == ("paper", None)
    name, note = train_recipe("short", SimpleNamespace(recipe="paper"))
    assert name == "short" and "extracted with recipe paper" in note
    with pytest.raises(CachedetError, match="TrainConfig.recipe nope"):
        train_recipe("nope", None)


def test_schedule_advice_only_for_wide_jitter_on_short_schedules():
    assert "try recipe short" in schedule_advice((0.1, 2.0), epochs=24)
    assert schedule_advice((0.1, 2.0), epochs=600) is None
    assert (
        schedule_advice((0.8, 1.25), epochs=24) is None
        and schedule_advice((0.5, 1.5), epochs=5) is None
    )
    assert "use TrainConfig.recipe short" in schedule_advice(
        (0.1, 2.0), views=4, field="TrainConfig.recipe"
    )


def _header(store: str) -> dict:
    return zarr.open_group(store, mode="r").attrs["cachedet"]


def test_extract_and_train_heads_agree_on_the_recipe(cli, synthetic, tmp_path):
    common = (
        "--annotations",
        synthetic["train"],
        "--images",
        synthetic["images"],
        "--backbone",
        "test_resnet",
        "--random-init",
        "--size",
        96,
        "--views",
        1,
        "--shard-views",
        6,
        "--quiet",
    )
    r = cli("extract", *common, "--out", tmp_path / "paper.zarr", "--recipe", "paper")
    assert r.exit_code == 0, r.output
    assert "LSJ 0.1-2 is the paper's range" in r.stderr and "use --recipe short" in r.stderr
    header = _header(str(tmp_path / "paper.zarr"))
    assert header["recipe"] == "paper" and header["augment"]["scale_range"] == [0.1, 2.0]

    r = cli("extract", *common, "--out", tmp_path / "mine.zarr", "--scale-range", 0.6, 1.4)
    assert r.exit_code == 0, r.output
    assert "paper's range" not in r.output
    header = _header(str(tmp_path / "mine.zarr"))
    assert header["recipe"] == "short" and header["augment"]["scale_range"] == [
        0.6,
        1.4,
    ]  # the flag wins

    r = cli("train-heads", "--cache", tmp_path / "paper.zarr", "--out", tmp_path / "run", *TINY)
    assert r.exit_code == 0, r.output
    assert "for 1 epochs try --recipe short" in r.output  # the guidance line
    with open(tmp_path / "run" / "config.json") as f:
        train = json.load(f)["train"]
    assert train["recipe"] == "paper" and train["warmup_steps"] is None
    assert train["detector_options"] == {"box_convs": 4, "box_fcs": 1}

    r = cli(
        "train-heads",
        "--cache",
        tmp_path / "paper.zarr",
        "--out",
        tmp_path / "run2",
        "--recipe",
        "short",
        "--box-convs",
        1,
        *TINY,
    )
    assert r.exit_code == 0, r.output
    assert "--recipe short: the cache was extracted with recipe paper" in r.output
    with open(tmp_path / "run2" / "config.json") as f:
        train = json.load(f)["train"]
    assert train["recipe"] == "short" and train["detector_options"] == {
        "box_convs": 1,
        "box_fcs": 2,
    }


def test_a_run_saved_before_recipes_resumes_without_a_recipe_difference():
    from cachedet.engine.resume import resume_changes

    saved = TrainConfig.of(out="r", cache="c", recipe=None).to_dict()
    del saved["recipe"]
    assert resume_changes(saved, TrainConfig.from_dict(saved)) == {}
