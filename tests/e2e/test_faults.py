"""Faults during extraction and training: kills, failed writes, damaged shards, checkpoints."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import small_config
from conftest import train_config as tiny_train
from helpers import assert_same_store

from cachedet.cache import store as store_mod
from cachedet.cache.store import FeatureStore, StoreReader, StoreWriter
from cachedet.core.errors import CachedetError
from cachedet.engine.train import train
from cachedet.extraction.run import extract


def shard_object(url: str, level: str, shard: int) -> str:
    return os.path.join(url, "features", level, "c", str(shard), "0", "0", "0")


@pytest.fixture(scope="module")
def clean(synthetic, tmp_path_factory):
    cfg = small_config(synthetic, str(tmp_path_factory.mktemp("clean") / "clean.zarr"))
    extract(cfg, progress=False)
    return cfg


def test_verify_lists_damaged_shards_and_repair_recomputes_them(synthetic, clean, tmp_path, cli):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"))
    extract(cfg, progress=False)
    assert StoreReader(cfg.out).verify()["complete"] == [0, 1, 2, 3, 4]
    level = FeatureStore(cfg.out).specs[1].name
    with open(shard_object(cfg.out, level, 1), "r+b") as f:  # flip bytes in the middle of shard 1
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x00\xff" * 8)
    os.remove(
        shard_object(cfg.out, FeatureStore(cfg.out).specs[0].name, 3)
    )  # shard 3 lost an object
    report = StoreReader(cfg.out).verify()
    assert [d["shard"] for d in report["damaged"]] == [1, 3] and report["complete"] == [0, 2, 4]
    r = cli("cache", "verify", cfg.out, "--quiet")
    assert (
        r.exit_code == 1
        and "damaged shard 1" in r.stdout
        and "damaged shard 3" in r.stdout
        and "--repair" in r.stdout
    )

    assert extract(cfg, progress=False).shards_run == 0  # a plain rerun trusts its records
    result = extract(small_config(synthetic, cfg.out, repair=True), progress=False)
    assert [d["shard"] for d in result.repaired] == [1, 3] and result.shards_run == 2
    assert cli("cache", "verify", cfg.out, "--quiet").exit_code == 0
    assert_same_store(clean.out, cfg.out)


def test_uint8_shards_verify_with_their_quant_params(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "q.zarr"), dtype="uint8")
    extract(cfg, progress=False)
    assert StoreReader(cfg.out).verify()["complete"] == [0, 1, 2, 3, 4]
    quant = os.path.join(cfg.out, "quant", FeatureStore(cfg.out).specs[0].name, "c", "2", "0", "0")
    with open(quant, "r+b") as f:  # the features are intact, one shard's scales are not
        f.seek(os.path.getsize(quant) // 2)
        f.write(b"\x01\x02\x03\x04")
    assert [d["shard"] for d in StoreReader(cfg.out).verify()["damaged"]] == [2]


def test_incomplete_shards_are_reported(synthetic, tmp_path, cli):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"))
    extract(cfg, progress=False)
    StoreWriter(cfg.out).remove_record(2)
    report = StoreReader(cfg.out).verify()
    assert report["incomplete"] == [2] and not report["damaged"]
    r = cli("cache", "verify", cfg.out, "--quiet")
    assert r.exit_code == 1 and "incomplete: 2" in r.stdout


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_writes_are_clear_and_never_marked_complete(
    synthetic, clean, tmp_path, monkeypatch, code
):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"))
    real_write = store_mod.write_level

    def failing_write(array, start, block):
        if start == 10:  # shard 2 (5 views per shard)
            raise OSError(code, os.strerror(code), array.path)
        real_write(array, start, block)

    monkeypatch.setattr(store_mod, "write_level", failing_write)
    with pytest.raises(CachedetError) as e:
        extract(cfg, progress=False)
    assert f"writing shard 2 failed: {os.strerror(code)}" in str(e.value) and cfg.out in str(
        e.value
    )
    assert 2 not in FeatureStore(cfg.out).shard_records()
    monkeypatch.setattr(store_mod, "write_level", real_write)
    result = extract(cfg, progress=False)
    assert (
        result.shards_run == 5 - result.shards_skipped_complete
        and 2 in FeatureStore(cfg.out).shard_records()
    )
    assert_same_store(clean.out, cfg.out)


KILLED_EXTRACT = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import small_config
from cachedet.cache.store import StoreWriter
from cachedet.extraction.run import extract

real = StoreWriter.write_record
def slow_record(self, record):
    if record["shard"] == 3:  # shard 3's features are written; its record never will be
        print("READY", flush=True)
        time.sleep(60)
    real(self, record)
StoreWriter.write_record = slow_record
extract(small_config({paths!r}, {out!r}, shard_views=2), progress=False)
"""


@pytest.mark.slow
def test_sigkill_during_extraction_resumes_to_the_same_store(synthetic, tmp_path):
    reference = small_config(synthetic, str(tmp_path / "ref.zarr"), shard_views=2)
    extract(reference, progress=False)
    out = str(tmp_path / "killed.zarr")
    script = KILLED_EXTRACT.format(
        tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), paths=synthetic, out=out
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(0.3)  # let the next shard's compute get going
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = FeatureStore(out).shard_records()
    assert 3 not in done and len(done) >= 3
    result = extract(small_config(synthetic, out, shard_views=2), progress=False)
    assert result.shards_skipped_complete == len(done) and result.shards_run == 12 - len(done)
    assert_same_store(reference.out, out)


def test_a_checkpoint_interrupted_while_written_leaves_the_previous_one(
    synthetic, tmp_path, monkeypatch
):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"))
    extract(cfg, progress=False)
    full = train(tiny_train(tmp_path / "full", cfg.out, epochs=3), progress=False)
    real_fsync, calls = os.fsync, {"n": 0}

    def dying_fsync(fd):
        calls["n"] += 1
        # config.json, then one checkpoint per epoch: die while the third epoch's checkpoint is written
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", dying_fsync)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_train(tmp_path / "killed", cfg.out, epochs=3), progress=False)
    monkeypatch.setattr(os, "fsync", real_fsync)
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    assert os.listdir(ckpt_dir) == ["last.pt"]  # no temp file left behind
    assert torch.load(ckpt_dir / "last.pt", weights_only=False)["epoch"] == 2  # epochs count from 1
    resumed = train(tiny_train(tmp_path / "killed", cfg.out, epochs=3, resume=True), progress=False)
    assert resumed.steps == full.steps
