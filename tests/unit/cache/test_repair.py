"""``cachedet cache repair`` / ``extract --repair``: damaged or missing shard files, records, mask
arrays and box/metadata arrays are recomputed from the store's own header, bit for bit; a store
whose header is lost is one line saying it must be rebuilt."""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import zarr

from cachedet.cache.store import StoreReader, open_header
from cachedet.core.errors import CachedetError, StoreDamaged
from cachedet.extraction.repair import config_from_header, repair
from cachedet.extraction.run import extract


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    dst = str(tmp_path / "copy.zarr")
    shutil.copytree(tiny_store.url, dst)
    return dst


def _one(store: str, *parts: str) -> str:
    (path,) = glob.glob(os.path.join(store, *parts))
    return path


def _truncate(path: str):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _change_labels(store: str):
    z = zarr.open_array(os.path.join(store, "boxes/labels"), mode="r+")
    z[...] = z[...] + 1


DAMAGE = {
    "truncated feature shard": lambda s: _truncate(
        _one(s, "features", "c4", "c", "1", "0", "0", "0")
    ),
    "missing feature shard": lambda s: os.remove(
        _one(s, "features", "c3", "c", "2", "0", "0", "0")
    ),
    "missing mask array": lambda s: shutil.rmtree(os.path.join(s, "masks", "000001")),
    "truncated mask array": lambda s: _truncate(_one(s, "masks", "000000", "rle", "c", "0")),
    "truncated record": lambda s: _truncate(os.path.join(s, "_shards", "000002.json")),
    "missing record": lambda s: os.remove(os.path.join(s, "_shards", "000000.json")),
    "truncated box chunk": lambda s: _truncate(_one(s, "boxes", "xyxy", "c", "0", "0")),
    "changed labels": _change_labels,
    "truncated metadata chunk": lambda s: _truncate(_one(s, "meta", "scale", "c", "0", "0")),
}


def _same_store(a: str, b: str):
    ra, rb = StoreReader(a), StoreReader(b)
    for spec in ra.specs:
        assert np.array_equal(
            ra.read_stored(spec.name, slice(None))[0], rb.read_stored(spec.name, slice(None))[0]
        )
    for k in ("xyxy", "labels", "ann_ids"):
        assert np.array_equal(ra._boxes[k], rb._boxes[k])
    for k, v in ra.meta.items():
        assert np.array_equal(v, rb.meta[k])
    assert [ra.mask_rles(v) for v in range(ra.num_views)] == [
        rb.mask_rles(v) for v in range(rb.num_views)
    ]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_repair_recomputes_what_is_damaged_bit_for_bit(store_copy, tiny_store, kind):
    DAMAGE[kind](store_copy)
    repair(store_copy, progress=False, device="cpu")
    report = StoreReader(store_copy).verify()
    assert (report["damaged"], report["incomplete"]) == ([], [])
    _same_store(store_copy, tiny_store.url)


def test_a_rerun_after_repair_removed_a_record_works(store_copy, tiny_store):
    """--repair unmarks a shard before recomputing it: a kill then leaves a truncated object of an
    incomplete shard, which a plain rerun must overwrite, not read back."""
    _truncate(_one(store_copy, "features", "c4", "c", "1", "0", "0", "0"))
    os.remove(os.path.join(store_copy, "_shards", "000001.json"))
    cfg = replace(
        config_from_header(store_copy, open_header(store_copy), device="cpu"), repair=False
    )
    result = extract(cfg, progress=False)
    assert result.shards_run == 1
    _same_store(store_copy, tiny_store.url)


def test_a_lost_header_is_one_line_naming_the_rebuild(store_copy):
    _truncate(os.path.join(store_copy, "zarr.json"))
    with pytest.raises(StoreDamaged) as err:
        repair(store_copy, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{store_copy}/zarr.json: ") and "header is lost" in msg
    assert "--overwrite" in msg and "\n" not in msg


def test_another_annotation_file_is_refused(store_copy, tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(CachedetError, match="another annotation file"):
        repair(store_copy, annotations=str(other), progress=False)
    with pytest.raises(CachedetError, match="annotation file not found"):
        repair(store_copy, annotations=str(tmp_path / "gone.json"), progress=False)


def test_the_cli_repairs_a_truncated_shard(store_copy):
    from typer.testing import CliRunner

    from cachedet_cli.main import app

    _truncate(_one(store_copy, "features", "c4", "c", "1", "0", "0", "0"))
    r = CliRunner().invoke(app, ["cache", "repair", store_copy, "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "repaired 1 damaged shard(s): 1 (c4: unreadable" in r.stdout.replace("\n", " ")
    assert StoreReader(store_copy).verify()["damaged"] == []
