"""The feed's codec pipelines (``loader.reader``): zarrs and zarr-python's own read the same
arrays from every storage dtype; the choice is checked up front in one line."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cachedet.cache.dataset import CachedViews, InMemoryViews
from cachedet.cache.readers import ZARRS_PIPELINE, reader_config
from cachedet.cache.store import StoreReader
from cachedet.core.errors import CachedetError
from cachedet.data.views import AugmentConfig
from cachedet.engine.config import LoaderConfig
from cachedet.extraction.run import extract
from tests.conftest import small_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("zarrs") is None, reason="zarrs is not installed"
)


@pytest.fixture(scope="module")
def stores(synthetic, tmp_path_factory):
    """{dtype: store} of 12 images x 1 view (test_resnet, canvas 64, shards of 4 views)."""
    root = tmp_path_factory.mktemp("readers")
    out = {}
    for dtype in ("float16", "bfloat16", "uint8", "uint4"):
        out[dtype] = str(root / f"{dtype}.zarr")
        cfg = small_config(
            synthetic,
            out[dtype],
            augment=AugmentConfig(size=64, seed=1),
            views=1,
            shard_views=4,
            dtype=dtype,
        )
        extract(cfg, progress=False)
    return out


def _epoch(feed: CachedViews) -> dict[int, dict[str, np.ndarray]]:
    feed.set_epoch(0)
    return {int(s["view"]): {k: v.numpy() for k, v in s["features"].items()} for s in feed}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "uint8", "uint4"])
def test_zarrs_and_zarr_hand_out_the_same_features(stores, dtype):
    fast = _epoch(CachedViews(stores[dtype], shuffle_buffer=3, reader="zarrs"))
    plain = _epoch(CachedViews(stores[dtype], shuffle_buffer=3, reader="zarr"))
    assert sorted(fast) == sorted(plain) == list(range(12))
    for view, levels in plain.items():
        for name, x in levels.items():
            assert np.array_equal(fast[view][name], x), (dtype, view, name)


def test_in_memory_views_read_the_same_bytes_with_either_reader(stores):
    fast = InMemoryViews(stores["uint8"], reader="zarrs").stored
    plain = InMemoryViews(stores["uint8"], reader="zarr").stored
    for name, (x, q) in plain.items():
        assert np.array_equal(fast[name][0], x) and np.array_equal(fast[name][1], q)


def test_the_reader_decides_the_arrays_codec_pipeline(stores):
    reader = StoreReader(stores["float16"])
    name = reader.specs[0].name
    plain = type(reader.features_array(name)._async_array.codec_pipeline).__name__
    reader.use_reader("zarrs")
    fast = type(reader.features_array(name)._async_array.codec_pipeline).__name__
    assert fast == ZARRS_PIPELINE.rsplit(".", 1)[1] and plain != fast


def test_reader_config():
    assert reader_config("zarr") == {}
    assert reader_config("auto") == {"codec_pipeline.path": ZARRS_PIPELINE}
    assert reader_config("zarrs", one_thread=True)["threading.max_workers"] == 1
    with pytest.raises(CachedetError, match=r"^loader.reader: expected one of auto, zarrs, zarr"):
        reader_config("tensorstore")


def test_without_zarrs_auto_falls_back_and_zarrs_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "zarrs" else real(name, *a)
    )
    assert reader_config("auto") == {}
    with pytest.raises(CachedetError, match=r"^loader.reader zarrs: the zarrs package is not"):
        LoaderConfig(reader="zarrs").validate(online=False)


def test_the_cli_refuses_an_unknown_reader_naming_the_flag(cli, tmp_path):
    r = cli("train-heads", "--cache", tmp_path, "--out", tmp_path / "r", "--reader", "fast")
    assert r.exit_code == 2 and "error: --reader: expected one of auto, zarrs, zarr" in r.stderr


FORKED_FEED = """
import sys
from torch.utils.data import DataLoader
from cachedet.cache.dataset import CachedViews, collate_views
ds = CachedViews(sys.argv[1], shuffle_buffer=2, reader=sys.argv[2])
ds.set_epoch(0)
parent = sorted(int(s["view"]) for s in ds)  # the parent decodes first: zarrs' threads start
for start in ("fork", "spawn"):
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_views,
                        multiprocessing_context=start)
    views = sorted(v for b in loader for v in b["views"])
    assert views == parent, (start, views, parent)
print("read", len(parent))
"""


@pytest.mark.parametrize("reader", ["auto", "zarrs"])
def test_workers_forked_after_the_parent_decoded_read_every_view(stores, reader):
    """zarrs' Rust threads do not survive a fork: a DataLoader worker forked from a process that
    had decoded with zarrs would hang decoding. The feed reopens its reader in each process, and a
    forked child reads with zarr's own pipeline (warning when zarrs was asked for)."""
    import subprocess
    import sys

    r = subprocess.run(  # in a child process, so that a hang is a failure, not a stuck suite
        [sys.executable, "-c", FORKED_FEED, stores["uint8"], reader],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "read 12" in r.stdout, r.stderr[-2000:]
    assert ("forked from one whose zarrs threads had started" in r.stderr) == (reader == "zarrs")


def test_a_forked_child_of_a_zarrs_process_reads_with_zarr(stores):
    import multiprocessing

    from cachedet.cache.readers import forked_after_zarrs

    reader = StoreReader(stores["float16"])
    reader.use_reader("zarrs")
    reader.features_array(reader.specs[0].name)  # this process has opened arrays with zarrs
    assert not forked_after_zarrs() and reader_config("auto") != {}
    queue = multiprocessing.get_context("fork").SimpleQueue()
    child = multiprocessing.get_context("fork").Process(
        target=lambda: queue.put((forked_after_zarrs(), reader_config("auto")))
    )
    child.start()
    child.join()
    assert queue.get() == (True, {})
