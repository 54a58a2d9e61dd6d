"""Paths as users type them: ``~`` and relative paths resolved once for zarr and fsspec alike,
printed verbatim (no console markup), Windows separators in ``file_name``."""

from __future__ import annotations

import os
import shutil

from conftest import edit_json

from cachedet.core.paths import resolve_path
from cachedet.data.coco import load_detection_dataset


def test_resolve_path_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert resolve_path("~/c.zarr") == str(tmp_path / "home" / "c.zarr")
    assert resolve_path("rel/c.zarr") == str(tmp_path / "rel" / "c.zarr")
    assert resolve_path("file://" + str(tmp_path / "x")) == str(tmp_path / "x")
    for url in ("s3://bucket/c.zarr", "memory://c.zarr", "gs://b/~/c"):
        assert resolve_path(url) == url
    assert resolve_path(None) is None
    assert resolve_path(resolve_path("~/a")) == resolve_path("~/a")


def test_tilde_store_lands_in_one_place_for_every_stage(synthetic, tmp_path, monkeypatch, cli):
    """``--out=~/cache.zarr`` (the shell leaves ``~`` after ``=``): arrays and shard records both under $HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    base = [
        "--annotations",
        synthetic["train"],
        "--images",
        synthetic["images"],
        "--backbone",
        "test_resnet",
        "--random-init",
        "--size",
        "64",
        "--views",
        "1",
        "--no-augment",
        "--quiet",
    ]
    r = cli("extract", *base, "--out=~/cache.zarr")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "~").exists()
    assert {"_shards", "features", "meta", "zarr.json"} <= set(os.listdir(home / "cache.zarr"))
    shutil.copytree(
        home / "cache.zarr", tmp_path / "moved.zarr"
    )  # one folder holds the whole store
    r = cli("cache", "verify", "moved.zarr")
    assert r.exit_code == 0 and "1/1 shards complete" in r.stdout, r.output
    r = cli(
        "train-heads",
        "--cache=~/cache.zarr",
        "--out=~/run",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--neck-channels",
        "16",
        "--box-fcs",
        "1",
        "--box-convs",
        "0",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert (home / "run" / "checkpoints" / "last.pt").exists() and not (tmp_path / "~").exists()


def test_paths_with_markup_characters_print_verbatim(synthetic, tmp_path, cli):
    store = tmp_path / "my store [v1] #2 [bold].zarr"
    r = cli(
        "extract",
        "--annotations",
        synthetic["val"],
        "--images",
        synthetic["images"],
        "--out",
        store,
        "--backbone",
        "test_resnet",
        "--random-init",
        "--size",
        "64",
        "--views",
        "1",
        "--no-augment",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].startswith(f"{store}: ")
    for args in (("cache", "info", store), ("cache", "verify", store)):
        r = cli(*args)
        assert r.exit_code == 0 and str(store) in r.stdout, r.output


def test_windows_separators_in_file_name(synthetic, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(synthetic["images"], images)
    ann = tmp_path / "ann.json"
    shutil.copy(synthetic["val"], ann)
    edit_json(
        str(ann),
        lambda d: [
            img.update(file_name=img["file_name"].replace("/", "\\")) for img in d["images"]
        ],
    )
    ds = load_detection_dataset(str(ann), str(images))
    assert "\\" in ds.images[0].file_name
    assert all(os.path.isfile(ds.image_path(r)) for r in ds.images)
