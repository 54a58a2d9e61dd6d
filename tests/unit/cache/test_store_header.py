"""StoreHeader: exact JSON round-trip, typed fields, diff, refusals."""

import dataclasses
import json

import pytest
import zarr

from cachedet.cache.header import Hybrid, MaskInfo, Storage, StoreHeader
from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec
from cachedet.data.coco import load_detection_dataset


def raw_header(store) -> dict:
    return zarr.open_group(store.url, mode="r").attrs["cachedet"]


def test_header_of_a_real_store_round_trips_exactly(tiny_store):
    raw = raw_header(tiny_store)
    header = StoreHeader.from_dict(raw, tiny_store.url)
    assert header.to_dict() == raw
    assert json.dumps(header.to_dict()) == json.dumps(
        raw
    )  # same keys in the same order: byte-identical JSON
    assert StoreHeader.from_dict(header.to_dict(), "again") == header


def test_typed_fields_of_a_real_store(tiny_store, synthetic):
    h = tiny_store.header
    assert (
        h.canvas == 64 and h.augmented and h.views == 1 and h.num_views == 12 and h.num_shards == 3
    )
    assert h.storage == Storage(dtype="float16", codec="zstd", shard_views=4)
    assert [s.name for s in h.specs] == list(h.shapes) and all(
        isinstance(s, FeatureSpec) for s in h.specs
    )
    first = h.specs[0]
    assert h.shapes[first.name] == (first.channels, 64 // first.stride, 64 // first.stride)
    assert h.masks.format == "coco-rle" and h.masks.objects == int(tiny_store.box_offsets[-1])
    dataset = load_detection_dataset(synthetic["train"], synthetic["images"])
    assert h.categories == dataset.categories and h.dataset_sha256 == dataset.sha256
    assert h.hybrid is None and "hybrid" not in h.to_dict()


def test_optional_parts_and_unknown_keys_round_trip(tiny_store):
    header = dataclasses.replace(
        tiny_store.header,
        masks=None,
        hybrid=Hybrid(
            cache_stage=2,
            backbone={"name": "x", "weights_sha256": "ab"},
            specs=(FeatureSpec("c3", 8, 8),),
        ),
    )
    d = {**header.to_dict(), "added_later": {"k": 1}}
    again = StoreHeader.from_dict(d, "s")
    assert again.to_dict() == d and list(again.to_dict()) == list(d)
    assert d["masks"] is None and list(d)[-4:] == ["hybrid", "masks", "recipe", "added_later"]


def test_diff_names_each_differing_identity_field(tiny_store):
    h = tiny_store.header
    other = dataclasses.replace(
        h,
        storage=dataclasses.replace(h.storage, dtype="uint8"),
        augment={**h.augment, "size": 96},
        views=3,
        masks=None,
        num_images=99,
        cachedet_version="0.0",
    )  # the last two are not identity
    lines = h.diff(other)
    assert [line.split(":")[0] for line in lines] == [
        "augment.size",
        "masks",
        "storage.dtype",
        "views",
    ]
    assert (
        "augment.size: store has 64, asked for 96" in lines
        and "views: store has 1, asked for 3" in lines
    )
    assert "storage.dtype: store has 'float16', asked for 'uint8'" in lines
    assert lines[1].endswith("asked for None")
    assert h.diff(dataclasses.replace(h, num_images=99)) == []


def test_malformed_headers_are_refused_naming_the_store(tiny_store):
    raw = raw_header(tiny_store)
    with pytest.raises(CachedetError, match=r"^s\.zarr: not a cachedet feature store"):
        StoreHeader.from_dict(None, "s.zarr")
    with pytest.raises(
        CachedetError, match=r"^s\.zarr: schema_version is 99, this cachedet reads 1"
    ):
        StoreHeader.from_dict({**raw, "schema_version": 99}, "s.zarr")
    broken = {k: v for k, v in raw.items() if k != "storage"}
    with pytest.raises(
        CachedetError, match=r"^s\.zarr: malformed cachedet header .*KeyError: 'storage'"
    ):
        StoreHeader.from_dict(broken, "s.zarr")


def test_check_dataset_names_the_cache_and_the_file(tiny_store):
    h = tiny_store.header
    h.check_dataset(h.dataset_sha256, "--cache c", "val.json")
    with pytest.raises(
        CachedetError, match="--cache c: was extracted from another annotation file than val"
    ):
        h.check_dataset("0" * 64, "--cache c", "val.json")


def test_mask_info_and_storage_round_trip():
    m = MaskInfo(format="coco-rle", objects=5, objects_from_boxes=1)
    s = Storage(dtype="uint8", codec="lz4", shard_views=8)
    assert MaskInfo.from_dict(m.to_dict()) == m and Storage.from_dict(s.to_dict()) == s
    assert list(s.to_dict()) == ["dtype", "codec", "shard_views"]
