"""StoreWriter / StoreReader on a store laid out by hand (no backbone): one open group each."""

import numpy as np
import pytest
import torch
import zarr

from cachedet.cache import schema
from cachedet.cache.header import MaskInfo, Storage, StoreHeader
from cachedet.cache.layout import create_store
from cachedet.cache.store import (
    CHECKSUM,
    StoreReader,
    StoreWriter,
    features_checksum,
    masks_checksum,
)
from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec, ViewParams
from cachedet.data.masks import encode_rle

CANVAS, VIEWS, SHARD = 32, 5, 3
SPECS = (FeatureSpec("c3", 4, 8), FeatureSpec("c4", 6, 16))


def make_store(tmp_path, dtype="float16") -> str:
    header = StoreHeader(
        backbone={"name": "handmade", "weights": "none", "weights_sha256": "0" * 64},
        specs=SPECS,
        shapes={s.name: (s.channels, CANVAS // s.stride, CANVAS // s.stride) for s in SPECS},
        dataset={
            "annotations_sha256": "f" * 64,
            "categories": [{"id": 3, "name": "a"}],
            "dropped": {},
        },
        augment={"size": CANVAS, "augment": False},
        views=1,
        storage=Storage(dtype, "zstd", SHARD),
        num_views=VIEWS,
        num_images=VIEWS,
        cachedet_version="test",
        masks=MaskInfo(format=schema.MASK_FORMAT, objects=VIEWS, objects_from_boxes=0),
    )
    side = (CANVAS, CANVAS)
    views = [ViewParams(i, 0, side, side, (0, 0), False, CANVAS) for i in range(VIEWS)]
    boxes = {
        "offsets": np.arange(VIEWS + 1, dtype=np.int64),
        "xyxy": np.tile(np.array([[2, 2, 10, 12]], dtype=np.float32), (VIEWS, 1)),
        "labels": np.zeros(VIEWS, dtype=np.int64),
        "ann_ids": np.arange(VIEWS, dtype=np.int64),
    }
    url = str(tmp_path / "hand.zarr")
    assert create_store(url, header, views, boxes)
    return url


def features(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = lambda s: (n, s.channels, CANVAS // s.stride, CANVAS // s.stride)  # noqa: E731
    return {s.name: rng.normal(size=shape(s)).astype(np.float32) for s in SPECS}


def square_mask(v: int) -> bytes:
    m = np.zeros((CANVAS, CANVAS), dtype=bool)
    m[2:12, 2 + v : 10 + v] = True
    return encode_rle(m)


def write_shard(writer: StoreWriter, shard: int, start: int, n: int, dtype: str) -> dict:
    encoded = {k: schema.encode(v, dtype) for k, v in features(n, shard).items()}
    quant = {k: q for k, (_, q) in encoded.items()} if schema.is_quantized(dtype) else None
    digests = writer.write_features(shard, {k: e for k, (e, _) in encoded.items()}, start, quant)
    digests["masks"] = writer.write_masks(
        shard, [[square_mask(v)] for v in range(start, start + n)]
    )
    record = {
        "shard": shard,
        "views": [start, start + n],
        CHECKSUM: digests,
        "skipped": [],
        "seconds": 0.0,
    }
    writer.write_record(record)
    return record


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_written_shards_read_back_and_verify(tmp_path, dtype):
    url = make_store(tmp_path, dtype)
    writer = StoreWriter(url)
    record = write_shard(writer, 0, 0, SHARD, dtype)
    reader = StoreReader(url)
    assert reader.shard_records() == {0: record} and writer.shard_records() == {0: record}
    assert reader.usable_views().tolist() == [0, 1, 2]
    got, want = reader.read_features(0, SHARD), features(SHARD, 0)
    tol = {"float16": 1e-2, "uint8": 0.05}[dtype]
    assert all(np.abs(got[k] - want[k]).max() < tol for k in want)
    assert reader.masks(1).shape == (1, CANVAS, CANVAS) and reader.masks(1)[0, 2:12, 3:11].all()
    assert reader.view_params(2).canvas == CANVAS and reader.boxes(2)[1].tolist() == [0]
    assert reader.verify() == {"complete": [0], "incomplete": [1], "damaged": [], "shards_total": 2}


def test_removed_record_makes_a_shard_incomplete_again(tmp_path):
    url = make_store(tmp_path)
    writer = StoreWriter(url)
    write_shard(writer, 0, 0, SHARD, "float16")
    write_shard(writer, 1, SHARD, VIEWS - SHARD, "float16")
    assert StoreReader(url).verify()["complete"] == [0, 1]
    writer.remove_record(0)
    writer.remove_record(0)  # already gone: nothing to do
    reader = StoreReader(url)
    assert reader.verify()["incomplete"] == [0] and reader.usable_views().tolist() == [3, 4]


def test_changed_bytes_are_reported_as_damaged(tmp_path):
    url = make_store(tmp_path)
    writer = StoreWriter(url)
    record = write_shard(writer, 0, 0, SHARD, "float16")
    writer.write_record({**record, "crc32c": {**record["crc32c"], "c4": "0" * 8}})
    assert StoreReader(url).verify()["damaged"] == [
        {"shard": 0, "level": "c4", "error": "crc32c differs from the one recorded at write time"}
    ]


def test_records_with_sha256_from_older_stores_still_verify(tmp_path):
    """Stores written before CRC-32C keep sha256 records: verify checks those with sha256."""
    url = make_store(tmp_path)
    writer = StoreWriter(url)
    record = write_shard(writer, 0, 0, SHARD, "float16")
    reader = StoreReader(url)
    stored = {k: reader.read_stored(k, slice(0, SHARD)) for k in record["crc32c"] if k != "masks"}
    sha = {k: features_checksum(b, q, "sha256") for k, (b, q) in stored.items()}
    sha["masks"] = masks_checksum(*reader.read_shard_masks(0), "sha256")
    legacy = {k: v for k, v in record.items() if k != "crc32c"}
    writer.write_record({**legacy, "sha256": sha})
    assert StoreReader(url).verify()["complete"] == [0]
    writer.write_record({**legacy, "sha256": {**sha, "masks": "0" * 64}})
    assert StoreReader(url).verify()["damaged"] == [
        {
            "shard": 0,
            "level": "masks",
            "error": "sha256 differs from the one recorded at write time",
        }
    ]


def test_writer_and_reader_refuse_what_is_not_a_store(tmp_path):
    zarr.open_group(
        str(tmp_path / "group.zarr"), mode="w"
    )  # a zarr group without a cachedet header
    (tmp_path / "plain").mkdir()
    for cls in (StoreWriter, StoreReader):
        with pytest.raises(CachedetError, match="group.zarr: not a cachedet feature store"):
            cls(str(tmp_path / "group.zarr"))
        for name in ("plain", "absent"):
            with pytest.raises(CachedetError, match=f"{name}: no feature store here"):
                cls(str(tmp_path / name))


def test_bytes_on_disk_grow_with_written_shards(tmp_path):
    url = make_store(tmp_path)
    writer = StoreWriter(url)
    empty = writer.bytes_on_disk("features")
    write_shard(writer, 0, 0, SHARD, "float16")
    written = writer.bytes_on_disk("features")
    assert written > empty and writer.bytes_on_disk() >= written


def test_sha256_records_of_older_stores_are_the_same_digests():
    """Golden values, hashed by hashlib alone, of what cachedet wrote before CRC-32C: the masks'
    rle bytes then int64 offsets; a uint8 block then its float32 quant params."""
    rle, offsets = np.frombuffer(b"0 12 5 3", np.uint8), np.array([0, 8])
    assert masks_checksum(rle, offsets, "sha256") == (
        "e2432a607c2afa5664a7f2fd3333740f83950daaab2473a4277bd4dedb5c7eb9"
    )
    block, quant = np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3), np.array([[[0.5, 2.0]]])
    assert features_checksum(block, quant, "sha256") == (
        "5aa1a91d1d3c45e757516cb84a96b3cdd20e642009e02ab6d2bfbdbb155810e6"
    )


def test_a_record_without_checksums_is_reported_as_such(tmp_path):
    url = make_store(tmp_path)
    writer = StoreWriter(url)
    record = write_shard(writer, 0, 0, SHARD, "float16")
    writer.write_record({k: v for k, v in record.items() if k != CHECKSUM})
    assert StoreReader(url).verify()["damaged"] == [
        {"shard": 0, "level": "masks", "error": "no checksum in the completion record"}
    ]


def test_crc32c_is_the_castagnoli_checksum():
    """The check value of CRC-32C (RFC 3720, iSCSI) for the nine bytes "123456789"."""
    nine = np.frombuffer(b"123456789", dtype=np.uint8)
    assert features_checksum(nine) == "e3069283"
    assert masks_checksum(nine, np.zeros(0, dtype=np.int64)) == "e3069283"


@pytest.mark.parametrize("kind", ["crc32c", "sha256"])
@pytest.mark.parametrize("dtype", [np.float16, np.uint16, np.uint8])
def test_checksums_hash_the_bytes_tobytes_gives(dtype, kind):
    """Checksums are taken in place (no copy) but must equal those of ``tobytes()`` (block, then
    its quant params as float32), which every completion record was computed from; strided
    blocks included."""
    import hashlib

    import google_crc32c

    def reference(*parts: bytes) -> str:
        if kind == "sha256":
            return hashlib.sha256(b"".join(parts)).hexdigest()
        return f"{google_crc32c.value(b''.join(parts)):08x}"

    block = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).astype(dtype)
    quant = np.linspace(0, 1, 2 * 3 * 2).reshape(2, 3, 2)
    for b in (block, block[:, ::2], block.transpose(0, 1, 3, 2)):
        raw = np.ascontiguousarray(b).tobytes()
        assert features_checksum(b, None, kind) == reference(raw)
        assert features_checksum(b, quant, kind) == reference(
            raw, quant.astype(np.float32).tobytes()
        )


def test_an_all_zero_shard_is_written(tmp_path):
    """Feature chunks are written even when they equal the fill value (zarr would skip them, after
    comparing every chunk with it): every complete shard has its object on disk."""
    url = make_store(tmp_path)
    writer = StoreWriter(url)
    zeros = {k: np.zeros_like(v, dtype=np.float16) for k, v in features(SHARD, 0).items()}
    digests = writer.write_features(0, zeros, 0)
    digests["masks"] = writer.write_masks(0, [[square_mask(v)] for v in range(SHARD)])
    writer.write_record(
        {"shard": 0, "views": [0, SHARD], CHECKSUM: digests, "skipped": [], "seconds": 0.0}
    )
    for s in SPECS:
        assert (
            tmp_path / "hand.zarr" / "features" / s.name / "c" / "0" / "0" / "0" / "0"
        ).is_file()
    reader = StoreReader(url)
    assert not reader.read_level("c3", slice(0, SHARD)).any()
    assert reader.verify()["complete"] == [0]


def test_index_reads_equal_slice_reads(tmp_path):
    url = make_store(tmp_path)
    writer = StoreWriter(url)
    write_shard(writer, 0, 0, SHARD, "float16")
    write_shard(writer, 1, SHARD, VIEWS - SHARD, "float16")
    reader = StoreReader(url)
    whole = reader.read_level("c4", slice(0, VIEWS))
    for views in ([1, 2, 3], [0, 2, 4], [0, 4], [3]):
        got = reader.read_level("c4", np.array(views))
        np.testing.assert_array_equal(got, whole[views])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "uint8"])
def test_encode_into_writes_the_bytes_encode_gives(dtype):
    """The pipeline encodes each batch straight into its slice of the shard's array; the bytes
    and quant params must be those of ``schema.encode`` (every store written before used it),
    for float16 inputs (autocast on CUDA) as for float32."""
    x = np.random.default_rng(0).normal(size=(5, 3, 4, 6)).astype(np.float32) * 40
    for source in (x, x.astype(np.float16)):
        want, want_quant = schema.encode(source.astype(np.float32), dtype)
        out = np.full((7,) + x.shape[1:], 7, dtype=schema.zarr_dtype(dtype))
        quant = schema.encode_into(torch.from_numpy(source), dtype, out[1:6])
        np.testing.assert_array_equal(out[1:6], want)
        assert (out[0] == 7).all() and (out[6] == 7).all()  # nothing outside the slice
        if want_quant is None:
            assert quant is None
        else:
            np.testing.assert_array_equal(quant, want_quant)
