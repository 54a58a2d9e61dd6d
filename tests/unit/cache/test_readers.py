"""The feed's codec pipelines (``loader.reader``): zarrs and zarr-python's own read the same
arrays from every storage dtype; the choice is checked up front in one line."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cachedet.cache.dataset import CachedViews, InMemoryViews
from cachedet.cache.layout import ZARRS_PIPELINE, reader_config
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
