"""A store whose files are truncated or garbled (its zarr.json, an array's zarr.json, a metadata or
box chunk, a feature shard object) is one line from every entry point (``StoreDamaged``, which the
CLI prints as ``cachedet: error: ...``) naming the file or array and what mends it, never a
JSONDecodeError / Zstd / checksum traceback."""

from __future__ import annotations

import glob
import os
import shutil

import pytest

from cachedet.cache.dataset import CachedViews, InMemoryViews
from cachedet.cache.store import StoreReader, open_header
from cachedet.core.errors import StoreDamaged


def _truncate(path: str):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _one_file(store: str, *parts: str) -> str:
    (path,) = glob.glob(os.path.join(store, *parts))
    return path


# kind -> (damage it, what the message names, what it says mends it)
DAMAGE = {
    "truncated zarr.json": (
        lambda s: _truncate(f"{s}/zarr.json"),
        "{s}/zarr.json: ",
        "--overwrite",
    ),
    "garbage zarr.json": (
        lambda s: open(f"{s}/zarr.json", "wb").write(b"\x00\xffgarbage"),
        "{s}/zarr.json: ",
        "--overwrite",
    ),
    "missing zarr.json": (
        lambda s: os.remove(f"{s}/zarr.json"),
        "{s}/zarr.json: missing",
        "--overwrite",
    ),
    "truncated level zarr.json": (
        lambda s: _truncate(f"{s}/features/c4/zarr.json"),
        "{s}/features/c4/zarr.json: ",
        "--overwrite",
    ),
    "corrupt metadata chunk": (
        lambda s: _truncate(_one_file(s, "meta", "image_id", "c", "0")),
        "{s}: meta/image_id: unreadable",
        "cache repair",
    ),
    "corrupt box chunk": (
        lambda s: _truncate(_one_file(s, "boxes", "xyxy", "c", "0", "0")),
        "{s}: boxes/xyxy: unreadable",
        "cache repair",
    ),
}


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    dst = str(tmp_path / "copy.zarr")
    shutil.copytree(tiny_store.url, dst)
    return dst


def _entry_points(store: str):
    """Each library entry point that opens a store, as a callable."""
    return {
        "StoreReader": lambda: StoreReader(store),
        "info": lambda: StoreReader(store).info(),
        "verify": lambda: StoreReader(store).verify(),
        "CachedViews": lambda: list(CachedViews(store)),
        "InMemoryViews": lambda: InMemoryViews(store),
    }


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_header_or_metadata_is_one_line_from_every_entry_point(store_copy, kind):
    damage, names, fix = DAMAGE[kind]
    damage(store_copy)
    for name, call in _entry_points(store_copy).items():
        if name == "StoreReader" and "level" in kind:
            continue  # opening reads no level's array: its readers fail
        with pytest.raises(StoreDamaged) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(names.format(s=store_copy)), (name, msg)
        assert "\n" not in msg and fix in msg, (name, msg)
    if "zarr.json" in kind and "level" not in kind:
        with pytest.raises(StoreDamaged, match="header is lost"):
            open_header(store_copy)


def test_a_truncated_feature_shard_is_damaged_in_one_line(store_copy):
    _truncate(_one_file(store_copy, "features", "c4", "c", "1", "0", "0", "0"))
    report = StoreReader(store_copy).verify()
    assert [(d["shard"], d["level"]) for d in report["damaged"]] == [(1, "c4")]
    assert report["damaged"][0]["error"].startswith("unreadable (")
    for verify_reads in (True, False):  # even unchecked reads fail in one line, not in zarr
        with pytest.raises(StoreDamaged) as err:
            list(CachedViews(store_copy, verify_reads=verify_reads))
        msg = str(err.value)
        assert (
            msg.startswith(f"{store_copy}: shard 1, features/c4: unreadable (") and "\n" not in msg
        )
        assert "--repair" in msg
    with pytest.raises(StoreDamaged, match=r"shards 0-2, features/c4"):
        StoreReader(store_copy).read_stored("c4", slice(None))


@pytest.mark.parametrize("command", [("cache", "info"), ("cache", "verify")])
def test_the_cli_prints_one_error_line(store_copy, command):
    from typer.testing import CliRunner

    from cachedet_cli.main import app

    _truncate(f"{store_copy}/zarr.json")
    r = CliRunner().invoke(app, [*command, store_copy])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cachedet: error: {store_copy}/zarr.json: ")
