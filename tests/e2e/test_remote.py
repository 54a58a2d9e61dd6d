"""Stores behind fsspec URLs: a real S3-compatible server (moto) on loopback, and memory://."""

import os
import socket

import pytest
from conftest import small_config
from conftest import train_config as tiny_train
from helpers import assert_same_store, extract_args

from cachedet.cache.store import FeatureStore, StoreReader
from cachedet.engine.train import train
from cachedet.extraction.run import extract

pytest.importorskip("s3fs", reason="remote-store tests need s3fs (pip install -e '.[test]')")
moto_server = pytest.importorskip("moto.server", reason="remote-store tests need moto[server]")

BUCKET = "cachedet-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1 and the standard AWS variables pointing every client at it."""
    import fsspec

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(k, v)
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()


@pytest.fixture(scope="module")
def local_reference(synthetic, tmp_path_factory):
    cfg = small_config(synthetic, str(tmp_path_factory.mktemp("ref") / "ref.zarr"))
    extract(cfg, progress=False)
    return cfg.out


def test_extract_info_verify_and_train_on_s3(s3, synthetic, local_reference, cli, tmp_path):
    url = f"{s3}/train.zarr"
    r = cli(
        *extract_args(synthetic, url),
        "--backbone",
        "test_resnet",
        "--random-init",
        "--size",
        96,
        "--views",
        2,
        "--seed",
        3,
        "--scale-range",
        0.1,
        2.0,
        "--shard-views",
        5,
        "--batch-size",
        4,
        "--quiet",
    )  # the library's default range
    assert r.exit_code == 0, r.stdout
    assert "instance masks: stored" in r.stdout
    assert_same_store(local_reference, url)  # features, boxes, metadata and instance masks

    r = cli("cache", "info", url)
    assert r.exit_code == 0 and "shards complete: 5/5" in r.stdout
    info = FeatureStore(url).info()
    assert info["bytes_on_disk"] > 0 and info["bytes_features"] > 0
    assert cli("cache", "verify", url, "--quiet").exit_code == 0

    run = train(tiny_train(tmp_path / "run", url, epochs=1, masks=True), progress=False)
    assert run.steps == 3 and os.path.exists(os.path.join(run.run, "checkpoints", "last.pt"))


def test_an_interrupted_s3_extraction_resumes(s3, synthetic, local_reference, monkeypatch):
    from cachedet.cache import store as store_mod

    url = f"{s3}/resumed.zarr"
    real_write, calls = store_mod.write_level, []

    def interrupting_write(array, start, block):
        calls.append(start)
        if len(calls) == 7:  # third shard, first level
            raise KeyboardInterrupt
        real_write(array, start, block)

    monkeypatch.setattr(store_mod, "write_level", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        extract(small_config(synthetic, url), progress=False)
    monkeypatch.setattr(store_mod, "write_level", real_write)
    assert sorted(FeatureStore(url).shard_records()) == [0, 1]
    result = extract(small_config(synthetic, url), progress=False)
    assert result.shards_skipped_complete == 2 and result.shards_run == 3
    assert StoreReader(url).verify()["complete"] == [0, 1, 2, 3, 4]
    assert_same_store(local_reference, url)


def test_memory_store(synthetic, local_reference):
    url = "memory://cachedet/train.zarr"
    extract(small_config(synthetic, url), progress=False)
    assert_same_store(local_reference, url)
    assert FeatureStore(url).info()["shards_complete"] == 5
