"""Every shard block the cached feed and eval read is checked against its completion record:
an absent chunk (which zarr reads as zeros) or changed bytes stop the run in one line naming the
store, shard and array, and the command that repairs it."""

from __future__ import annotations

import glob
import os
import shutil

import pytest

from cachedet.cache.dataset import CachedViews, InMemoryViews
from cachedet.cache.store import StoreReader
from cachedet.core.errors import CachedetError


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    dst = str(tmp_path / "copy.zarr")
    shutil.copytree(tiny_store.url, dst)
    return dst


def _chunk(store: str, level: str, shard: int) -> str:
    (path,) = glob.glob(os.path.join(store, "features", level, "c", str(shard), "*", "*", "*"))
    return path


def _all_views(dataset) -> list[int]:
    dataset.set_epoch(0)
    return sorted(int(s["view"]) for s in dataset) if isinstance(dataset, CachedViews) else []


def test_an_intact_store_reads_without_complaint(store_copy):
    assert _all_views(CachedViews(store_copy, shuffle_buffer=2)) == list(range(12))
    InMemoryViews(store_copy)


@pytest.mark.parametrize("reader", ["zarrs", "zarr"])
@pytest.mark.parametrize("damage", ["absent", "flipped"])
@pytest.mark.parametrize("feed", [CachedViews, InMemoryViews])
def test_a_damaged_block_stops_the_feed_naming_store_shard_and_array(
    store_copy, damage, feed, reader
):
    level = StoreReader(store_copy).specs[1].name
    path = _chunk(store_copy, level, 1)
    if damage == "absent":
        os.remove(path)  # as an interrupted copy leaves it: zarr reads the fill value
    else:
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x10
        open(path, "wb").write(bytes(data))
    with pytest.raises(CachedetError) as err:
        _all_views(feed(store_copy, reader=reader))
    msg = str(err.value)
    assert msg.startswith(f"{store_copy}: shard 1, features/{level}: ") and "\n" not in msg
    assert "--repair" in msg and "cache verify" in msg


def test_verify_reads_off_reads_what_zarr_returns(store_copy):
    level = StoreReader(store_copy).specs[1].name
    os.remove(_chunk(store_copy, level, 1))
    assert _all_views(CachedViews(store_copy, verify_reads=False)) == list(range(12))


def test_eval_from_a_store_checks_each_shard_once(store_copy):
    reader = StoreReader(store_copy)
    reader.ensure_verified(0)
    level = reader.specs[0].name
    os.remove(_chunk(store_copy, level, 2))
    reader.ensure_verified(0)  # checked before: not read again
    with pytest.raises(CachedetError, match=rf"shard 2, features/{level}"):
        reader.ensure_verified(2)
    assert not reader.read_stored(level, slice(8, 12))[0].any()  # what zarr alone hands out


def _change_rows(store: str, array: str, view: int):
    """Change one stored value of ``array`` (a box coordinate, a label, a metadata field) at the
    first row of ``view``, as a bit flip that still decodes leaves it."""
    import zarr

    z = zarr.open_array(os.path.join(store, array), mode="r+")
    offsets = zarr.open_array(os.path.join(store, "boxes/offsets"))[...]
    row = int(offsets[view]) if array.startswith("boxes/") and array != "boxes/offsets" else view
    values = z[...]
    values[row] = values[row] + 1
    z[...] = values


@pytest.mark.parametrize("array", ["boxes/xyxy", "boxes/labels", "boxes/offsets", "meta/scale"])
def test_changed_boxes_labels_or_metadata_are_damaged(store_copy, array):
    view = 5  # shard 1 (shards of 4 views)
    _change_rows(store_copy, array, view)
    report = StoreReader(store_copy).verify()
    assert [(d["shard"], d["level"]) for d in report["damaged"]] == [(1, array)]
    for feed in (CachedViews, InMemoryViews):
        with pytest.raises(CachedetError) as err:
            _all_views(feed(store_copy)) if feed is CachedViews else feed(store_copy)
        msg = str(err.value)
        assert msg.startswith(f"{store_copy}: shard 1, {array}: ") and "\n" not in msg
        assert "--repair" in msg


def test_records_without_row_checksums_still_read(store_copy):
    """Stores written before rows were checksummed: their records hold levels and masks only."""
    import json

    for path in glob.glob(os.path.join(store_copy, "_shards", "*.json")):
        rec = json.load(open(path))
        rec["crc32c"] = {k: v for k, v in rec["crc32c"].items() if "/" not in k}
        json.dump(rec, open(path, "w"))
    _change_rows(store_copy, "boxes/xyxy", 5)
    assert StoreReader(store_copy).verify()["damaged"] == []
    assert _all_views(CachedViews(store_copy)) == list(range(12))
