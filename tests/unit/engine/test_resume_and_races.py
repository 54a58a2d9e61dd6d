"""Resuming with changed options, run-directory locking, and two creators racing on one new store."""

from __future__ import annotations

import dataclasses
import inspect
import json
import multiprocessing
import os
import shutil

import pytest
import torch
from conftest import small_config, train_config

import cachedet_cli.main  # noqa: F401  (imports every command, so each registers its options)
from cachedet.backbones.backbone import build_backbone
from cachedet.cache.store import FeatureStore, StoreReader
from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.engine.config import PATH_OF
from cachedet.engine.train import TrainConfig, train
from cachedet.extraction.run import _header, extract, plan_views, prepare_store
from cachedet.runs.record import RunDir
from cachedet_cli.common import with_flags

LIGHT = {
    "box_convs": 0,
    "box_fcs": 1,
    "box_representation": 32,
    "rois_per_image": 16,
    "proposals_per_image": 32,
}


@pytest.fixture(scope="module")
def store(synthetic, tmp_path_factory):
    cfg = small_config(synthetic, str(tmp_path_factory.mktemp("cache") / "s.zarr"), views=1)
    extract(cfg, progress=False)
    return cfg


def tiny(out, cache, **kw) -> TrainConfig:
    return train_config(
        out,
        cache,
        **{
            **dict(
                epochs=1, batch_size=6, neck_channels=16, warmup_steps=1, detector_options=LIGHT
            ),
            **kw,
        },
    )


def lrs(run) -> list[float]:
    return [round(json.loads(ln)["lr"], 9) for ln in open(os.path.join(run, "metrics.jsonl"))]


def test_model_changes_are_refused_naming_each(store, tmp_path):
    run = train(tiny(tmp_path / "run", store.out), progress=False).run
    changed = dataclasses.replace(
        tiny(run, store.out, epochs=2, neck_channels=32, head="retinanet"), resume=True
    )
    with pytest.raises(CachedetError) as e:
        train(changed, progress=False)
    text = str(e.value)  # the library names config fields; the CLI shows their options
    assert (
        "detector.neck_channels: run 16, given 32" in text
        and "detector.head: run 'faster-rcnn', given 'retinanet'" in text
    )
    assert "\n" not in text and "optim.epochs" in text  # names what may change instead
    shown = with_flags(text)
    assert (
        "--neck-channels: run 16, given 32" in shown
        and "--head: run 'faster-rcnn', given 'retinanet'" in shown
    )
    assert "--epochs" in shown


def test_extended_run_follows_the_longer_schedule_and_weights(store, tmp_path):
    """1 epoch, then --resume to 3 epochs == 3 epochs from scratch (the step schedule's first decay
    falls after the first epoch, so the short run's steps were those of the long run too)."""
    full = train(tiny(tmp_path / "full", store.out, epochs=3, warmup_steps=0), progress=False)
    short = train(tiny(tmp_path / "ext", store.out, epochs=1, warmup_steps=0), progress=False)
    ext = train(
        dataclasses.replace(tiny(short.run, store.out, epochs=3, warmup_steps=0), resume=True),
        progress=False,
    )
    assert ext.steps == full.steps == 6
    assert lrs(ext.run) == lrs(full.run) and min(lrs(full.run)) < max(lrs(full.run))
    a, b = (
        torch.load(os.path.join(r, "checkpoints", "last.pt"), weights_only=False)["state"][
            "detector"
        ]
        for r in (full.run, ext.run)
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    config = json.load(open(os.path.join(ext.run, "config.json")))
    assert config["train"]["epochs"] == 3 and config["resumes"] == [
        {"step": 2, "epoch": 1, "changed": {"epochs": [1, 3]}}
    ]


def test_new_lr_applies_from_the_next_step_and_is_recorded(store, tmp_path):
    run = train(
        tiny(tmp_path / "run", store.out, epochs=1, warmup_steps=0, schedule="cosine"),
        progress=False,
    ).run
    train(
        dataclasses.replace(
            tiny(run, store.out, epochs=2, warmup_steps=0, schedule="cosine", lr=0.05), resume=True
        ),
        progress=False,
    )
    fresh = train(
        tiny(tmp_path / "fresh", store.out, epochs=2, warmup_steps=0, schedule="cosine", lr=0.05),
        progress=False,
    )
    assert lrs(run)[2:] == lrs(fresh.run)[2:]  # the resumed steps follow the new lr's curve
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["train"]["lr"] == 0.05 and config["resumes"][-1]["changed"] == {
        "epochs": [1, 2],
        "lr": [0.01, 0.05],
    }


def test_cli_resume_alone_takes_the_runs_settings(store, tmp_path, cli):
    out = tmp_path / "run"
    r = cli(
        "train-heads",
        "--cache",
        store.out,
        "--out",
        out,
        "--epochs",
        1,
        "--batch-size",
        6,
        "--neck-channels",
        16,
        "--box-convs",
        0,
        "--box-fcs",
        1,
        "--head",
        "cascade",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    r = cli("train-heads", "--out", out, "--resume", "--epochs", 2, "--quiet")
    assert r.exit_code == 0, r.output
    assert "4 steps, 2 epochs" in r.stdout
    saved = json.load(open(out / "config.json"))["train"]
    assert saved["head"] == "cascade" and saved["neck_channels"] == 16 and saved["batch_size"] == 6
    r = cli(
        "train-heads", "--out", out, "--resume", "--epochs", 3, "--neck-channels", 32, "--quiet"
    )
    assert (
        r.exit_code == 2
        and "--neck-channels: run 16, given 32" in r.stderr
        and "Traceback" not in r.output
    )
    r = cli("train-heads", "--out", tmp_path / "none", "--resume", "--quiet")
    assert r.exit_code == 2 and "no run to resume" in r.stderr


def test_every_train_heads_option_maps_to_a_config_field():
    """--resume overrides the run's settings field by field: each option must name its TrainConfig field."""
    from cachedet_cli.train_heads import FIELD_OF, train_heads_command

    fields = set(PATH_OF)  # every setting, by its flat name
    options = [p for p in inspect.signature(train_heads_command).parameters if p != "ctx"]
    assert {
        name: FIELD_OF.get(name, name)
        for name in options
        if FIELD_OF.get(name, name) not in fields | {None}
    } == {}


def test_a_run_directory_has_one_writer(store, tmp_path):
    holder = RunDir(str(tmp_path / "run"))
    holder.lock()  # as another train-heads on the same --out would
    try:
        with pytest.raises(CachedetError, match="another train-heads is writing this run"):
            train(tiny(tmp_path / "run", store.out), progress=False)
    finally:
        holder.unlock()
    assert train(tiny(tmp_path / "run", store.out), progress=False).steps == 2


def _create(cfg, header, plan, barrier, results):
    barrier.wait()
    try:
        prepare_store(cfg, header, plan)
        FeatureStore(cfg.out)
        results.put("ok")
    except Exception as e:  # the test reports whatever a creator raised
        results.put(f"{type(e).__name__}: {e}")


def test_two_creators_racing_on_a_new_store(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "race.zarr"), views=2, shard_views=4)
    dataset = load_detection_dataset(cfg.annotations, cfg.images)
    plan = plan_views(dataset, cfg.augment, cfg.views)
    header = _header(
        cfg, build_backbone(cfg.backbone, warn=False), dataset, plan, hybrid=None, masks=True
    )
    ctx = multiprocessing.get_context("fork")
    for attempt in range(12):
        if os.path.exists(cfg.out):
            shutil.rmtree(cfg.out)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(target=_create, args=(cfg, header, plan, barrier, results))
            for _ in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = [results.get(timeout=5) for _ in procs]
        assert outcomes == ["ok", "ok"], (attempt, outcomes)
        assert FeatureStore(cfg.out).num_views == len(plan.views)
    assert not [
        n for n in os.listdir(tmp_path) if n.startswith(".race.zarr.creating")
    ]  # no temporary left
    result = extract(cfg, progress=False)  # the raced store is a normal one: extraction fills it
    assert (
        result.shards_run == result.shards_total
        and len(StoreReader(cfg.out).shard_records()) == result.shards_total
    )


def test_interrupted_creations_are_replaced_and_foreign_folders_kept(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"), views=1)
    stale = (
        tmp_path / f".s.zarr.creating-{os.uname().nodename}-999999999-deadbeef"
    )  # a killed creator's temporary
    (stale / "features").mkdir(parents=True)
    (tmp_path / "s.zarr" / "meta").mkdir(
        parents=True
    )  # laid out before its header (an object-store crash)
    assert extract(cfg, progress=False).shards_run > 0
    assert not stale.exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CachedetError, match="exists and is not a cachedet store"):
        extract(small_config(synthetic, str(foreign), views=1), progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
