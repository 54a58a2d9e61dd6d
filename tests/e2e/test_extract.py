import json
import os

import numpy as np
import pytest
import torch
from conftest import edit_json, small_config
from helpers import all_arrays, extract_args, reference_boxes

from cachedet.backbones.backbone import BackboneConfig, build_backbone
from cachedet.cache import store as store_mod
from cachedet.cache.store import FeatureStore
from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.data.images import read_image
from cachedet.data.views import normalize, plan_view, transform_image
from cachedet.extraction.run import dry_run, extract


def test_features_equal_the_backbone_on_the_same_view(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"))
    result = extract(cfg, progress=False)
    assert result.num_views == 24 and result.shards_total == 5 and result.shards_run == 5
    fs = FeatureStore(cfg.out)
    backbone = build_backbone(cfg.backbone)
    ds = load_detection_dataset(cfg.annotations, cfg.images)
    for view in (0, 7, 23):
        params = fs.view_params(view)
        rec = next(r for r in ds.images if r.id == params.image_id)
        assert params == plan_view(cfg.augment, rec.id, params.view_index, rec.height, rec.width)
        image = transform_image(
            params, normalize(read_image(ds.image_path(rec)), backbone.mean, backbone.std)
        )
        with torch.no_grad():
            want = backbone(image[None])
        got = fs.read_features(view, view + 1)
        for name, ref in want.items():
            assert got[name].shape == tuple(ref.shape)
            np.testing.assert_allclose(
                got[name], ref.numpy(), rtol=2e-3, atol=2e-3
            )  # float16 rounding


def test_boxes_and_metadata_equal_a_reference_transform(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"), views=3)
    extract(cfg, progress=False)
    fs = FeatureStore(cfg.out)
    ds = load_detection_dataset(cfg.annotations, cfg.images)
    by_id = {r.id: r for r in ds.images}
    assert fs.num_views == 36
    for view in range(fs.num_views):
        p = fs.view_params(view)
        rec = by_id[p.image_id]
        assert p.view_index == view % 3
        want, keep = reference_boxes(p, rec.boxes)
        boxes, labels = fs.boxes(view)
        np.testing.assert_allclose(boxes, want, atol=1e-3)
        assert labels.tolist() == rec.labels[keep].tolist()
        assert fs.ann_ids(view).tolist() == rec.ann_ids[keep].tolist()
        assert tuple(fs.meta["valid_size"][view]) == p.valid_size
        np.testing.assert_allclose(fs.meta["scale"][view], p.scale)


def test_interrupted_run_resumes_to_identical_arrays(synthetic, tmp_path, monkeypatch):
    clean = small_config(synthetic, str(tmp_path / "clean.zarr"))
    extract(clean, progress=False)

    cfg = small_config(synthetic, str(tmp_path / "resumed.zarr"))
    real_write, calls = store_mod.write_level, []

    def interrupting_write(array, start, block):
        calls.append(start)
        if len(calls) == 5:  # second shard, second level: a shard half written
            raise KeyboardInterrupt
        real_write(array, start, block)

    monkeypatch.setattr(store_mod, "write_level", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, progress=False)
    monkeypatch.setattr(store_mod, "write_level", real_write)
    assert sorted(FeatureStore(cfg.out).shard_records()) == [
        0
    ]  # the half-written shard is not complete

    result = extract(cfg, progress=False)
    assert result.shards_skipped_complete == 1 and result.shards_run == 4
    a, b = all_arrays(clean.out), all_arrays(cfg.out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert extract(cfg, progress=False).shards_run == 0  # a third run has nothing left to do


def test_incompatible_store_is_refused_and_overwrite_rebuilds(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"))
    extract(cfg, progress=False)
    other = small_config(synthetic, cfg.out, views=3)
    with pytest.raises(
        CachedetError, match=r"another configuration.*views: store has 2, asked for 3"
    ):
        extract(other, progress=False)
    with pytest.raises(
        CachedetError, match=r"storage.dtype: store has 'float16', asked for 'bfloat16'"
    ):
        extract(small_config(synthetic, cfg.out, dtype="bfloat16"), progress=False)
    with pytest.raises(
        CachedetError,
        match=r"backbone.name: store has 'test_resnet', asked for 'test_efficientnet'",
    ):
        extract(
            small_config(
                synthetic, cfg.out, backbone=BackboneConfig("test_efficientnet", None, "random")
            ),
            progress=False,
        )
    rebuilt = small_config(synthetic, cfg.out, views=3, overwrite=True)
    assert extract(rebuilt, progress=False).num_views == 36
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    with pytest.raises(CachedetError, match="not a cachedet store"):
        (tmp_path / "plain" / "_shards").mkdir()
        (tmp_path / "plain" / "_shards" / "000000.json").write_text('{"shard": 0, "views": [0, 1]}')
        extract(small_config(synthetic, str(tmp_path / "plain")), progress=False)


def test_reader_refuses_other_schema_versions(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"))
    extract(cfg, progress=False)
    meta_path = os.path.join(cfg.out, "zarr.json")
    edit_json(meta_path, lambda d: d["attributes"]["cachedet"].update(schema_version=99))
    with pytest.raises(CachedetError, match="schema_version is 99"):
        FeatureStore(cfg.out)
    with pytest.raises(CachedetError, match="no feature store here"):
        FeatureStore(str(tmp_path / "nowhere.zarr"))


@pytest.mark.parametrize("problem", ["missing", "corrupt", "truncated", "wrong_size"])
def test_bad_images_stop_with_the_file_name(dataset_copy, tmp_path, problem):
    ds = load_detection_dataset(dataset_copy["train"], dataset_copy["images"])
    bad = ds.image_path(ds.images[4])
    if problem == "missing":
        os.remove(bad)
    elif problem == "corrupt":
        open(bad, "wb").write(b"\x89PNG garbage" * 10)
    elif problem == "truncated":
        data = open(bad, "rb").read()
        open(bad, "wb").write(data[: len(data) // 3])
    else:
        edit_json(
            dataset_copy["train"],
            lambda d: d["images"][4].update(width=d["images"][4]["width"] + 1),
        )
    cfg = small_config(dataset_copy, str(tmp_path / "s.zarr"))
    with pytest.raises(CachedetError) as e:
        extract(cfg, progress=False)
    assert bad in str(e.value)
    if (
        problem != "truncated"
    ):  # found by the header scan before any work: no store, and the dry run says so
        first = {
            "missing": "image file not found",
            "corrupt": "cannot read image header",
            "wrong_size": "image is",
        }[problem]
        assert str(e.value).startswith(f"{bad}: {first}")
        assert "(1 of 12 images of" in str(e.value)
        assert not os.path.exists(cfg.out)
        with pytest.raises(CachedetError, match=first):
            dry_run(cfg)
        report = dry_run(small_config(dataset_copy, cfg.out, skip_bad=True))
        assert report.scan.summary().startswith("1 of 12 images bad")
        assert [b["image_id"] for b in report.scan.bad] == [ds.images[4].id]
    # --skip-bad: the image's views are recorded and left out, everything else is extracted
    result = extract(small_config(dataset_copy, cfg.out, skip_bad=True), progress=False)
    assert {s["image_id"] for s in result.skipped_images} == {ds.images[4].id}
    fs = FeatureStore(cfg.out)
    assert fs.info()["skipped_images"] == [ds.images[4].id]
    usable = fs.usable_views()
    assert len(usable) == fs.num_views - 2
    assert ds.images[4].id not in set(fs.meta["image_id"][usable].tolist())


@pytest.mark.parametrize(
    "dtype, codec",
    [("bfloat16", "zstd"), ("float32", "lz4"), ("float16", "none"), ("uint8", "zstd")],
)
def test_storage_dtypes_and_codecs(synthetic, tmp_path, dtype, codec):
    ref = small_config(synthetic, str(tmp_path / "ref.zarr"), dtype="float32", codec="none")
    extract(ref, progress=False)
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"), dtype=dtype, codec=codec)
    extract(cfg, progress=False)
    want = FeatureStore(ref.out).read_features(0, 6)
    got = FeatureStore(cfg.out).read_features(0, 6)
    tol = {"bfloat16": 8e-3, "float16": 1e-3, "float32": 0, "uint8": 0}[dtype]
    for name in want:
        assert got[name].dtype == np.float32
        if dtype == "uint8":  # at most half a quantisation step of each view's channel range
            flat = want[name].reshape(6, want[name].shape[1], -1)
            half_step = (flat.max(2) - flat.min(2)) / 510
            err = np.abs(got[name] - want[name]).reshape(flat.shape).max(2)
            assert (err <= half_step * 1.001 + 1e-6).all()
            assert (err > 0).any()  # it is lossy: the test would notice a silent float fallback
            continue
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol)
    info = FeatureStore(cfg.out).info()
    assert info["codec"] == codec and info["shards_complete"] == info["shards_total"] == 5
    assert info["bytes_per_view"] > 0 and info["compression_ratio"] > (
        0.9 if codec == "none" else 1.0
    )


def test_dry_run_writes_nothing(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "s.zarr"))
    r = dry_run(cfg)
    assert not os.path.exists(cfg.out)
    assert r.num_views == 24 and r.views_per_second > 0
    assert r.bytes_per_view == 2 * (48 * 12 * 12 + 192 * 6 * 6 + 96 * 3 * 3)
    big = dry_run(cfg, num_images=118_287)
    assert big.total_bytes == big.bytes_per_view * 118_287 * 2


def test_cli_extract_cache_info_and_resume(cli, synthetic, tmp_path):
    out = tmp_path / "s.zarr"
    args = [
        *extract_args(synthetic, out),
        "--backbone",
        "test_resnet",
        "--random-init",
        "--size",
        64,
        "--views",
        2,
        "--shard-views",
        8,
        "--quiet",
    ]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "24 views in 3 shards; ran 3, 0 already complete" in r.stdout
    assert "dropped annotations: none" in r.stdout
    r = cli(*args)
    assert "ran 0, 3 already complete" in r.stdout
    r = cli("cache", "info", out)
    assert r.exit_code == 0
    assert (
        "shards complete: 3/3" in r.stdout and "compression ratio" in r.stdout and "c5" in r.stdout
    )
    info = json.loads(cli("cache-info", out, "--json").stdout)
    assert info["views"] == 24 and [lv["name"] for lv in info["levels"]] == ["c3", "c4", "c5"]
    r = cli(*args[:-1], "--dry-run", "--num-images", 118287)
    assert r.exit_code == 0 and "236,574" in r.stdout and "estimated extraction time" in r.stdout
    r = cli("cache", "verify", tmp_path / "missing.zarr")
    assert r.exit_code == 2 and "no feature store here" in r.stderr


@pytest.mark.slow
def test_dask_workers_and_an_existing_scheduler_write_the_same_store(synthetic, tmp_path):
    from dask.distributed import LocalCluster
    from helpers import assert_same_store

    single = small_config(synthetic, str(tmp_path / "one.zarr"))
    extract(single, progress=False)
    multi = small_config(synthetic, str(tmp_path / "two.zarr"), workers=2)
    assert extract(multi, progress=False).shards_run == 5
    assert_same_store(single.out, multi.out)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        joined = small_config(
            synthetic, str(tmp_path / "joined.zarr"), scheduler=cluster.scheduler_address
        )
        assert extract(joined, progress=False).shards_run == 5
    assert_same_store(single.out, joined.out)


def test_store_of_edited_annotations_says_what_changed_and_update_reuses_shards(
    dataset_copy, tmp_path
):
    """After an edit of the annotation file the store is refused with what changed and the ways
    on; --update keeps the shards whose views and image files are unchanged, and the result equals
    a fresh extraction of the edited file (features, boxes, metadata, masks)."""
    from helpers import assert_same_store

    cfg = small_config(dataset_copy, str(tmp_path / "s.zarr"))  # 12 images x 2 views, shards of 5
    extract(cfg, progress=False)

    def edit(d):
        first = d["images"][1]["id"]
        box = next(a for a in d["annotations"] if a["image_id"] == first)
        box["bbox"] = [box["bbox"][0] + 1, box["bbox"][1], box["bbox"][2], box["bbox"][3]]
        last = d["images"].pop()  # its views were the last shard's
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != last["id"]]
        d["categories"][0]["name"] = "renamed"

    edit_json(dataset_copy["train"], edit)
    ds = load_detection_dataset(dataset_copy["train"], dataset_copy["images"])
    touched = ds.image_path(ds.images[4])  # views 8, 9: shard 1
    os.utime(touched, ns=(1, 1))
    with pytest.raises(CachedetError) as e:
        extract(cfg, progress=False)
    line = str(e.value)
    assert "\n" not in line and "another version of" in line
    assert "1 image removed, boxes of 1 image changed, categories 1 renamed" in line
    assert "reusing the 3 of 5 shards" in line and "(2 recomputed)" in line
    assert "ExtractConfig.overwrite to recompute all 5" in line

    result = extract(small_config(dataset_copy, cfg.out, update=True), progress=False)
    assert (result.shards_reused, result.shards_run, result.num_views) == (3, 2, 22)
    fresh = extract(small_config(dataset_copy, str(tmp_path / "fresh.zarr")), progress=False)
    assert_same_store(cfg.out, fresh.store)
    report = FeatureStore(cfg.out).verify()
    assert len(report["complete"]) == 5 and not report["damaged"]
    assert not os.path.exists(cfg.out + ".updating") and not os.path.exists(cfg.out + ".replaced")
