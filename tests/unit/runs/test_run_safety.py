"""Runs as careful as stores: resume knows its data, distributed layouts that cannot hang."""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import pytest
from conftest import small_config, train_config

from cachedet.cache.dataset import CachedViews, rank_blocks, shard_blocks
from cachedet.core.errors import CachedetError
from cachedet.data.views import AugmentConfig
from cachedet.engine.train import train
from cachedet.extraction.run import extract


def tiny_extract(synthetic, out: str, **kw) -> str:
    """A test_resnet store at 64 px (``kw`` overrides ``small_config``'s settings); its path."""
    cfg = small_config(synthetic, out, augment=AugmentConfig(size=64, seed=1), **kw)
    extract(cfg, progress=False)
    return cfg.out


@pytest.fixture(scope="module")
def one_view_run(tiny_store, tmp_path_factory):
    """A 1-epoch run on tiny_store (12 images x 1 view, 64 px)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(train_config(out, tiny_store.url, epochs=1), progress=False)
    return str(out)


def test_resume_on_a_reextracted_store_is_refused_listing_old_and_new(
    one_view_run, synthetic, tmp_path
):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(one_view_run, run)
    other = tiny_extract(synthetic, str(tmp_path / "two_views.zarr"), views=2, shard_views=4)
    with pytest.raises(CachedetError) as err:
        train(train_config(run, other, epochs=2, resume=True), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "holds other data than run" in msg
    # the checkpoint's value first, then the one given now
    assert "views_per_image: checkpoint has 1, asked for 2" in msg
    assert "views: checkpoint has 12, asked for 24" in msg


def test_resume_names_the_checkpoints_side_first(one_view_run, synthetic, tmp_path):
    import shutil

    from cachedet.backbones.backbone import BackboneConfig

    run = str(tmp_path / "run")
    shutil.copytree(one_view_run, run)
    other = tiny_extract(
        synthetic,
        str(tmp_path / "effnet.zarr"),
        views=1,
        backbone=BackboneConfig("test_efficientnet", None, "random"),
    )
    with pytest.raises(CachedetError) as err:
        train(train_config(run, other, epochs=2, resume=True), progress=False)
    assert "backbone.name: checkpoint has 'test_resnet', asked for 'test_efficientnet'" in str(
        err.value
    )


@pytest.mark.parametrize("world", [2, 3, 5])
def test_fewer_shard_blocks_than_ranks_still_give_every_rank_views(world):
    views = np.arange(6)
    blocks = shard_blocks(views, 64)  # one shard: one block
    shares = [rank_blocks(blocks, r, world) for r in range(world)]
    flat = [np.concatenate(s) if s else np.zeros(0, int) for s in shares]
    assert all(len(f) for f in flat)  # every rank has work
    assert sorted(np.concatenate(flat).tolist()) == views.tolist()  # disjoint, complete
    # shares never span shards
    blocks = shard_blocks(np.arange(10), 4)  # 3 blocks: 4, 4, 2
    for r in range(5):
        for b in rank_blocks(blocks, r, 5):
            assert len(set((b // 4).tolist())) == 1


def test_enough_blocks_keep_the_round_robin_share():
    blocks = shard_blocks(np.arange(12), 4)
    assert [b.tolist() for b in rank_blocks(blocks, 1, 2)] == [[4, 5, 6, 7]]


def test_more_ranks_than_views_is_refused_up_front(tiny_store):
    with pytest.raises(CachedetError, match=r"12 views per epoch in 3 shard block\(s\).*13 ranks"):
        CachedViews(tiny_store.url, rank=0, world=13)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str, cache: str, results, **kw) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        r = train(
            train_config(out, cache, epochs=1, batch_size=2, device="cpu", **kw), progress=False
        )
        results.put((rank, r.steps))
    except CachedetError as e:
        results.put((rank, str(e)))


def _spawn_two(out: str, cache: str, **kw) -> dict:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, port, out, cache, results), kwargs=kw) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return got


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo on CPU, spawned ranks")
def test_two_gloo_ranks_train_on_a_store_of_one_shard_block(synthetic, tmp_path):
    store = tiny_extract(synthetic, str(tmp_path / "one_shard.zarr"), views=1, shard_views=64)
    got = _spawn_two(str(tmp_path / "ddp"), store)
    assert got == {0: 3, 1: 3}  # 12 views: 6 per rank, batches of 2
    # a rank that cannot start (only rank 0 loads the validation set) stops both, each with a
    # message (rank 1 names rank 0's) instead of rank 1 waiting for it forever
    missing = str(tmp_path / "no_val.json")
    got = _spawn_two(
        str(tmp_path / "ddp2"), store, val_annotations=missing, val_images=synthetic["images"]
    )
    assert "no_val.json" in got[0] and got[1].startswith("rank 0 of 2 stopped: ")


# --- checkpoints, metrics, config.json and writes as careful as stores -----------------------


def _flip_a_weight_bit(path: str) -> None:
    import torch

    ckpt = torch.load(path, weights_only=False)
    weight = next(t for t in ckpt["state"]["detector"].values() if t.numel() >= 64)
    raw = weight.contiguous().view(-1).view(torch.uint8).numpy().tobytes()[:64]
    data = bytearray(open(path, "rb").read())
    at = data.find(raw)
    assert at >= 0
    data[at + 3] ^= 0x40  # a high exponent bit of a float32 weight
    open(path, "wb").write(bytes(data))


def test_a_flipped_bit_in_last_pt_is_refused(one_view_run, tmp_path):
    import shutil

    from cachedet.runs.record import load_run_checkpoint

    path = str(tmp_path / "last.pt")
    shutil.copy(os.path.join(one_view_run, "checkpoints", "last.pt"), path)
    load_run_checkpoint(path)  # intact: loads
    _flip_a_weight_bit(path)
    with pytest.raises(CachedetError, match=r"last.pt: damaged checkpoint \(its checksum"):
        load_run_checkpoint(path)


def test_non_finite_weights_are_neither_written_nor_loaded(one_view_run, tmp_path):
    import torch

    from cachedet.runs.checkpoint import checksum, save_atomic
    from cachedet.runs.record import load_run_checkpoint

    ckpt = torch.load(os.path.join(one_view_run, "checkpoints", "last.pt"), weights_only=False)
    name = next(iter(ckpt["state"]["detector"]))
    ckpt["state"]["detector"][name].view(-1)[0] = float("nan")
    path = str(tmp_path / "last.pt")
    open(path, "wb").write(b"previous")
    with pytest.raises(CachedetError, match=rf"not written: weight detector.{name} became NaN"):
        save_atomic(ckpt, path)
    assert open(path, "rb").read() == b"previous"
    ckpt["checksum"] = checksum(ckpt)  # as a file with a NaN weight would be, checksum intact
    torch.save(ckpt, path)
    with pytest.raises(CachedetError, match=rf"weight detector.{name} is NaN or infinite"):
        load_run_checkpoint(path)


def test_a_full_disk_leaves_the_old_file_and_says_what_it_needed(tmp_path, monkeypatch):
    import errno

    from cachedet.core import atomic
    from cachedet.core.errors import WriteError

    path = tmp_path / "f.json"
    atomic.write_json_atomic(str(path), {"old": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(WriteError) as err:
        atomic.write_bytes_atomic(str(path), b"x" * 5000)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot write (No space left on device: 5.0 KB needed, ")
    assert "free" in msg and "\n" not in msg
    assert path.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["f.json"]


def test_a_checkpoint_that_cannot_be_written_stops_with_how_to_continue(
    tiny_store, tmp_path, monkeypatch
):
    import errno

    import cachedet.runs.checkpoint as checkpoint_mod
    from cachedet.core import atomic
    from cachedet.core.errors import WriteError
    from cachedet.runs.record import load_run_checkpoint

    real, calls = checkpoint_mod.save_torch_atomic, []

    def second_fails(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise atomic.write_error(OSError(errno.ENOSPC, "No space left on device"), path, 9)
        real(obj, path)

    monkeypatch.setattr(checkpoint_mod, "save_torch_atomic", second_fails)
    out = tmp_path / "run"
    with pytest.raises(WriteError) as err:
        train(train_config(out, tiny_store.url, epochs=2), progress=False)
    msg = str(err.value)
    assert "last.pt: cannot write (No space left on device" in msg
    assert msg.endswith(f"then continue with TrainConfig.out {out} TrainConfig.resume")
    assert load_run_checkpoint(str(out / "checkpoints" / "last.pt"))["step"] == 3  # epoch 1's
    monkeypatch.setattr(checkpoint_mod, "save_torch_atomic", real)
    stale = out / "checkpoints" / f".last.pt.{'0' * 32}.tmp"  # what a killed write leaves
    stale.write_bytes(b"half")
    r = train(train_config(out, tiny_store.url, epochs=2, resume=True), progress=False)
    assert r.steps == 6 and not stale.exists()


def test_metrics_survive_a_bad_line_and_never_repeat_a_step(tiny_store, tmp_path):
    import json
    import warnings

    from cachedet.runs.record import RunDir

    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.path)
    rows = [{"epoch": 0, "step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    lines = [json.dumps(r) + "\n" for r in rows]
    open(run.metrics, "w").writelines(lines[:1] + ['{"step": 2, "lo\n'] + lines[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.truncate_metrics(3)
    assert [json.loads(x)["step"] for x in open(run.metrics)] == [1, 2, 3]  # later lines kept
    assert "skipped 1 malformed line(s) (line 2)" in str(caught[0].message)
    # killed before its first checkpoint, then started again: no step twice
    out = tmp_path / "fresh"
    os.makedirs(out)
    open(out / "metrics.jsonl", "w").writelines(lines[:2])
    train(train_config(out, tiny_store.url, epochs=1), progress=False)
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3]


def test_a_config_json_with_unknown_settings_is_refused_not_downgraded(one_view_run, tmp_path, cli):

    import json
    import shutil

    from cachedet.engine.config import TrainConfig

    run = tmp_path / "run"
    shutil.copytree(one_view_run, run)
    saved = json.load(open(run / "config.json"))
    saved["train"]["ema_decay"] = 0.999  # a setting of a newer cachedet
    json.dump(saved, open(run / "config.json", "w"))
    with pytest.raises(CachedetError, match=r"config.json: settings .* does not know: ema_decay"):
        TrainConfig.of_run(str(run))
    r = cli("train-heads", "--config", run / "config.json", "--out", tmp_path / "x", "--quiet")
    assert r.exit_code == 2 and "--config" in r.stderr and "ema_decay" in r.stderr


def test_an_unfinished_store_is_refused_unless_asked(tiny_store, tmp_path):
    import shutil
    import warnings

    url = str(tmp_path / "partial.zarr")
    shutil.copytree(tiny_store.url, url)
    records = sorted(os.listdir(os.path.join(url, "_shards")))
    os.remove(os.path.join(url, "_shards", records[-1]))  # as extract killed before the last
    with pytest.raises(CachedetError, match=r"extraction unfinished \(2 of 3 shards complete"):
        CachedViews(url)
    with pytest.raises(CachedetError, match="loader.allow_incomplete"):
        train(train_config(tmp_path / "run", url, epochs=1), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CachedViews(url, allow_incomplete=True)
    assert len(ds) == 8 and "training on the finished shards only" in str(caught[-1].message)


def test_extract_removes_completion_record_temps_of_killed_writes(synthetic, tmp_path):
    import time

    url = tiny_extract(synthetic, str(tmp_path / "s.zarr"), views=1, shard_views=4)
    old = os.path.join(url, "_shards", f".000001.json.{'a' * 32}.tmp")
    live = os.path.join(url, "_shards", f".000002.json.{'b' * 32}.tmp")  # a writer at work now
    for path in (old, live):
        open(path, "w").write("{")
    os.utime(old, (time.time() - 3600,) * 2)
    tiny_extract(synthetic, url, views=1, shard_views=4)  # the next run (nothing to recompute)
    assert not os.path.exists(old) and os.path.exists(live)


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            {"neck_channels": -8},
            "detector.neck_channels: expected an integer >= 1 and <= 16384, got -8",
        ),
        ({"weight_decay": -1}, "optim.weight_decay: expected a number >= 0, got -1"),
        ({"lr": float("nan")}, "optim.lr: expected a number > 0, got nan"),
        ({"batch_size": 2.5}, "loader.batch_size: expected an integer >= 1, got 2.5"),
        ({"epochs": True}, "optim.epochs: expected an integer >= 1 and <= 1048576, got True"),
    ],
)
def test_numbers_are_checked_in_one_line_naming_the_field(setting, message):
    from cachedet.engine.config import TrainConfig

    with pytest.raises(CachedetError) as err:
        TrainConfig.of(out="r", cache="c", **setting).validate()
    assert str(err.value) == message


def test_extract_numbers_are_checked_naming_the_field(synthetic, tmp_path):
    with pytest.raises(
        CachedetError, match=r"^ExtractConfig.views: expected an integer >= 1, got 1.5$"
    ):
        small_config(synthetic, str(tmp_path / "s.zarr"), views=1.5).validate()
    with pytest.raises(CachedetError, match=r"^augment.size: expected an integer >= 32"):
        AugmentConfig(size=-3)


def test_the_cli_shows_the_flag(cli, tmp_path):
    r = cli("train-heads", "--cache", tmp_path, "--out", tmp_path / "r", "--neck-channels", "-8")
    assert r.exit_code == 2 and "error: --neck-channels: expected an integer >= 1" in r.stderr
    r = cli("train-heads", "--cache", tmp_path, "--out", tmp_path / "r", "--weight-decay", "-1")
    assert r.exit_code == 2 and "error: --weight-decay: expected a number >= 0" in r.stderr


def test_a_batch_larger_than_the_store_is_cut_to_it(tiny_store, tmp_path):
    with pytest.warns(UserWarning, match=r"loader.batch_size 1000000000000: .* batches hold 12"):
        r = train(
            train_config(tmp_path / "r", tiny_store.url, epochs=1, batch_size=10**12),
            progress=False,
        )
    assert r.steps == 1


def test_extraction_on_a_cluster_without_workers_stops_with_a_message():
    from dask.distributed import LocalCluster

    from cachedet.extraction.shards import run_shards_on_dask

    class Bar:
        def advance(self, n):
            pass

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(CachedetError, match=r"no dask worker for 1 s with 2 shard\(s\) left"):
            run_shards_on_dask(
                [1, 2], 0, cluster.scheduler_address, Bar(), worker_timeout=1, poll=0.2
            )
    with pytest.raises(CachedetError, match=r"scheduler tcp://127.0.0.1:9: no dask scheduler"):
        run_shards_on_dask([1], 0, "tcp://127.0.0.1:9", Bar(), worker_timeout=1)


def test_the_cli_turns_a_write_refused_by_the_system_into_one_line(capsys):
    import errno

    import typer

    from cachedet_cli.common import user_errors

    @user_errors
    def command():
        raise OSError(errno.EROFS, "Read-only file system", "/runs/r/export/model.onnx")

    with pytest.raises(typer.Exit) as exit_:
        command()
    err = capsys.readouterr().err.strip()
    assert exit_.value.exit_code == 2 and "\n" not in err
    assert err.startswith("cachedet: error: /runs/r/export/model.onnx: cannot write (Read-only")


def test_epochs_count_from_1_everywhere_and_a_resume_says_where_it_goes_on(
    tiny_store, tmp_path, capsys
):
    import json

    from cachedet.runs.record import load_run_checkpoint

    out = tmp_path / "run"
    train(train_config(out, tiny_store.url, epochs=2), progress=False)
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert sorted({r["epoch"] for r in rows}) == [1, 2]
    assert load_run_checkpoint(str(out / "checkpoints" / "last.pt"))["epoch"] == 2
    saved = json.load(open(out / "config.json"))
    # what ran, not the defaults: the store's canvas, the lr the optimiser used
    assert saved["train"]["size"] == 64 and saved["train"]["lr"] == 0.01
    capsys.readouterr()
    train(train_config(out, tiny_store.url, epochs=3, resume=True), progress=False)
    assert f"resuming {out} after epoch 2 of 3, step 6" in capsys.readouterr().out
    train(train_config(out, tiny_store.url, epochs=3, resume=True), progress=False)  # done
    resumes = json.load(open(out / "config.json"))["resumes"]
    assert [r["epoch"] for r in resumes] == [2]  # the resume with nothing to do added none


def test_ctrl_c_says_where_to_resume(tiny_store, tmp_path, monkeypatch):
    import torch

    from cachedet.core.errors import Interrupted

    real, calls = torch.optim.SGD.step, []

    def ctrl_c(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:  # in epoch 2, after epoch 1's checkpoint
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as err:
        train(train_config(out, tiny_store.url, epochs=2), progress=False)
    assert str(err.value) == (
        f"interrupted; {out}/checkpoints/last.pt (after epoch 1, step 3) is intact; "
        f"continue with TrainConfig.out {out} TrainConfig.resume"
    )


def test_the_cli_prints_ctrl_c_in_one_line_and_exits_130(capsys):
    import typer

    from cachedet.core.errors import Interrupted
    from cachedet_cli.common import user_errors

    @user_errors
    def command():
        raise Interrupted("interrupted; continue with TrainConfig.out r TrainConfig.resume")

    with pytest.raises(typer.Exit) as exit_:
        command()
    assert exit_.value.exit_code == 130
    assert capsys.readouterr().err == "cachedet: interrupted; continue with --out r --resume\n"


def test_checkpoint_every_n_steps_resumes_mid_epoch_exactly(tiny_store, tmp_path, monkeypatch):
    import json

    import torch

    from cachedet.runs.record import load_run_checkpoint

    full = train(train_config(tmp_path / "full", tiny_store.url, epochs=2), progress=False)
    real, calls = torch.optim.SGD.step, []

    def killed(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:  # epoch 2's third step, after the checkpoint at step 5
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", killed)
    out = tmp_path / "run"
    cfg = train_config(out, tiny_store.url, epochs=2, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt, match=r"in epoch 2, after its step 2, step 5"):
        train(cfg, progress=False)
    monkeypatch.setattr(torch.optim.SGD, "step", real)
    ckpt = load_run_checkpoint(str(out / "checkpoints" / "last.pt"))
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (1, 2, 5)
    resumed = train(train_config(out, tiny_store.url, epochs=2, resume=True), progress=False)
    assert resumed.steps == full.steps == 6
    a = load_run_checkpoint(str(tmp_path / "full" / "checkpoints" / "last.pt"))["state"]
    b = load_run_checkpoint(str(out / "checkpoints" / "last.pt"))["state"]
    for k, w in a["detector"].items():
        torch.testing.assert_close(w, b["detector"][k], rtol=1e-5, atol=1e-6)
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in rows] == [1, 1, 1, 2, 2, 2]


def test_api_images_and_numbers_are_checked_in_one_line():
    import torch

    from cachedet.api import to_pixels

    with pytest.raises(CachedetError, match=r"^images\[0\]: an empty image \(shape \(0, 0, 3\)\)$"):
        to_pixels(np.zeros((0, 0, 3), np.uint8), "images[0]")
    nan = torch.full((3, 8, 8), float("nan"))
    with pytest.raises(CachedetError, match=r"^image: the image holds NaN or infinite values$"):
        to_pixels(nan)
