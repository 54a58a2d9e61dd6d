"""Projected stores (ExtractConfig.project): what the projection keeps, how it is stored, and that
every consumer (training, resume, eval from a store or from images, online runs) applies the same
map or refuses another one in one line."""

import json

import numpy as np
import pytest
import torch
from conftest import small_config, train_config

from cachedet.backbones.backbone import BackboneConfig, build_backbone
from cachedet.backbones.projection import Projection, ProjectionFit, kept_channels, parse_request
from cachedet.cache.store import StoreIndex, StoreReader
from cachedet.core.errors import CachedetError, StoreDamaged
from cachedet.core.structures import FeatureSpec
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import dry_run, extract
from cachedet.models.detector import DetectorConfig, build_detector

AUG = AugmentConfig(size=64, seed=1)


def projected(synthetic, out, **kw):
    cfg = dict(augment=AUG, views=1, shard_views=4, project=8, recipe="short")
    return small_config(synthetic, str(out), **{**cfg, **kw})


@pytest.fixture(scope="module")
def projected_store(synthetic, tmp_path_factory):
    cfg = projected(synthetic, tmp_path_factory.mktemp("proj") / "p8.zarr")
    extract(cfg, progress=False)
    return cfg


def test_requests_normalise_and_bad_ones_name_the_field():
    assert [parse_request(v) for v in (None, "none", "auto", "64", 64, "1/4", 0.25)] == [
        None,
        None,
        "auto",
        64,
        64,
        0.25,
        0.25,
    ]
    assert parse_request("c5=16, c4=8") == {"c4": 8, "c5": 16}
    for bad in ("0", -3, "abc", "3/0", 1.5, "c5=x", True):
        with pytest.raises(CachedetError, match=r"^ExtractConfig.project .*expected auto"):
            parse_request(bad)
    specs = [FeatureSpec("c3", 40, 8), FeatureSpec("c4", 112, 16), FeatureSpec("c5", 320, 32)]
    assert kept_channels("auto", specs) == {"c3": 40, "c4": 112, "c5": 256}
    assert kept_channels(0.125, specs) == {"c3": 5, "c4": 14, "c5": 40}
    assert kept_channels({"c5": 64}, specs) == {"c3": 40, "c4": 112, "c5": 64}
    with pytest.raises(CachedetError, match="no level c6 in this backbone"):
        kept_channels({"c6": 4}, specs)


def _correlated_features(seed=0, channels=12, n=2):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(channels, 4, generator=g)
    z = torch.randn(n, 4, 16, 16, generator=g)
    noise = 0.05 * torch.randn(n, channels, 16, 16, generator=g)
    return torch.einsum("ck,nkhw->nchw", basis, z) + noise + 3.0


def test_fit_keeps_the_leading_directions_and_their_energy():
    x = _correlated_features()  # rank 4 plus a little noise
    fit = ProjectionFit({"c3": 4}, {"c3": 12}, {"c3": 8})
    fit.add({"c3": x}, [(128, 128)] * 2)
    p = fit.result()
    assert p.info["energy"]["c3"] > 0.99
    mean, comp = p.arrays()["c3"]
    np.testing.assert_allclose(comp @ comp.T, np.eye(4), atol=1e-5)  # orthonormal rows
    np.testing.assert_allclose(mean, x.mean((0, 2, 3)).numpy(), atol=1e-4)
    y = p({"c3": x})["c3"]
    assert y.shape == (2, 4, 16, 16)
    back = (
        torch.einsum("kc,nkhw->nchw", torch.from_numpy(comp), y)
        + torch.from_numpy(mean)[None, :, None, None]
    )
    assert float((back - x).abs().max()) < 0.3  # what is lost is the noise


def test_with_k_equal_to_c_an_adjusted_fpn_gives_the_raw_outputs():
    """A k = C projection is a rotation: the FPN's lateral 1x1 convs times the projection's
    transpose (and bias + W mean) on projected features give the raw features' outputs."""
    specs = [FeatureSpec("c3", 12, 8), FeatureSpec("c4", 12, 16), FeatureSpec("c5", 12, 32)]
    raw = {
        name: _correlated_features(i, 12)[:, :, : 16 >> i, : 16 >> i]
        for i, name in enumerate(("c3", "c4", "c5"))
    }
    fit = ProjectionFit(
        {s.name: 12 for s in specs}, {s.name: 13 for s in specs}, {"c3": 8, "c4": 16, "c5": 32}
    )
    fit.add(raw, [(128, 128)] * 2)
    projection = fit.result()
    assert projection.levels == ("c3", "c4", "c5")
    cfg = DetectorConfig(num_classes=3, canvas=128, in_specs=tuple(specs), neck_channels=16)
    torch.manual_seed(0)
    det_raw = build_detector(cfg).eval()
    det_proj = build_detector(cfg).eval()
    det_proj.load_state_dict(det_raw.state_dict())
    with torch.no_grad():
        for i, name in enumerate(("c3", "c4", "c5")):
            conv = det_proj.neck.fpn.inner_blocks[i][0]
            mean, comp = (torch.from_numpy(a) for a in projection.arrays()[name])
            w = conv.weight[:, :, 0, 0]
            conv.bias += w @ mean
            conv.weight.copy_((w @ comp.T)[:, :, None, None])
        a = det_raw.neck(raw)
        b = det_proj.neck(projection(raw))
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)
        out_a, out_b = det_raw.predict(raw), det_proj.predict(projection(raw))
    for x, y in zip(out_a, out_b):
        torch.testing.assert_close(y["scores"], x["scores"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y["boxes"], x["boxes"], atol=1e-3, rtol=1e-4)


def test_a_projected_store_holds_k_channels_and_its_map(projected_store):
    store = StoreReader(projected_store.out)
    entry = store.header.projection
    assert entry["request"] == 8 and entry["seed"] == 1 and entry["sample_views"] == 12
    raw = build_backbone(projected_store.backbone, warn=False).specs
    assert {s.name: s.channels for s in store.specs} == {s.name: 8 for s in raw}
    for s in raw:
        level = entry["levels"][s.name]
        assert (level["channels"], level["k"]) == (s.channels, 8)
        assert 0 < level["energy"] <= 1
        mean, comp = store.projection_arrays()[s.name]
        assert mean.shape == (s.channels,) and comp.shape == (8, s.channels)
    assert store.header.fingerprint().projection == {
        "sha256": entry["sha256"],
        "k": {s.name: 8 for s in raw},
    }
    assert store.verify()["damaged"] == []
    # the stored features are the backbone's, projected: recompute view 0 from its image
    backbone = build_backbone(projected_store.backbone, warn=False)
    backbone.set_projection(Projection(store.projection_arrays()))
    plain = StoreReader(projected_store.out).read_level(store.specs[0].name, slice(0, 1))
    assert plain.shape[1] == 8 and np.isfinite(plain).all()


def test_a_rerun_is_byte_identical_and_a_partial_store_resumes_to_it(
    synthetic, projected_store, tmp_path
):
    again = projected(synthetic, tmp_path / "again.zarr")
    extract(again, progress=False)
    a, b = StoreReader(projected_store.out), StoreReader(again.out)
    assert a.header.projection == b.header.projection
    for spec in a.specs:
        np.testing.assert_array_equal(
            a.features_array(spec.name)[...], b.features_array(spec.name)[...]
        )
    # an interrupted extraction: two shard records removed, then the same command resumes
    from cachedet.cache.store import StoreWriter

    writer = StoreWriter(again.out)
    writer.remove_record(0)
    writer.remove_record(2)
    result = extract(again, progress=False)
    assert (result.shards_run, result.shards_skipped_complete) == (2, 1)
    c = StoreReader(again.out)
    for spec in a.specs:
        np.testing.assert_array_equal(
            a.features_array(spec.name)[...], c.features_array(spec.name)[...]
        )


def test_uint8_and_fractions_compose_and_the_store_is_smaller(synthetic, projected_store, tmp_path):
    plain = small_config(
        synthetic, str(tmp_path / "plain.zarr"), augment=AUG, views=1, shard_views=4
    )
    extract(plain, progress=False)
    q = projected(synthetic, tmp_path / "q.zarr", dtype="uint8", project="1/4")
    extract(q, progress=False)
    info = {
        k: StoreReader(c.out).info()
        for k, c in (("plain", plain), ("p8", projected_store), ("q", q))
    }
    assert info["p8"]["bytes_per_view"] < info["plain"]["bytes_per_view"] / 3
    assert info["q"]["projection"]["request"] == 0.25
    store = StoreReader(q.out)
    raw = {s.name: s.channels for s in build_backbone(q.backbone, warn=False).specs}
    assert {s.name: s.channels for s in store.specs} == {n: round(c / 4) for n, c in raw.items()}
    assert store.verify()["damaged"] == [] and store.has_masks


def test_hybrid_caches_cannot_be_projected(synthetic, tmp_path):
    cfg = projected(synthetic, tmp_path / "h.zarr", project="auto", cache_stage=1)
    with pytest.raises(
        CachedetError,
        match="ExtractConfig.project and ExtractConfig.cache_stage exclude each other",
    ):
        extract(cfg, progress=False)
    assert not (tmp_path / "h.zarr").exists()


def test_another_projection_in_the_same_place_is_refused(synthetic, projected_store, tmp_path):
    import shutil

    out = tmp_path / "s.zarr"
    shutil.copytree(projected_store.out, out)
    with pytest.raises(CachedetError, match=r"another configuration.*projection"):
        extract(projected(synthetic, out, project=4), progress=False)
    with pytest.raises(CachedetError, match=r"another configuration.*projection"):
        extract(projected(synthetic, out, project=None), progress=False)
    wider = projected(
        synthetic, out, backbone=BackboneConfig("test_resnet", (1, 2, 3, 4), "random")
    )
    with pytest.raises(CachedetError, match=r"another configuration.*backbone.out_indices"):
        extract(wider, progress=False)


def test_cache_repair_recomputes_a_damaged_projected_shard_bit_for_bit(projected_store, tmp_path):
    import shutil

    from cachedet.extraction.repair import repair

    out = tmp_path / "r.zarr"
    shutil.copytree(projected_store.out, out)
    shard = next((out / "features").iterdir())
    victim = next(p for p in shard.rglob("*") if p.is_file() and p.name != "zarr.json")
    victim.write_bytes(victim.read_bytes()[:-7])  # a truncated shard object
    result = repair(str(out), progress=False)
    assert result.repaired and StoreReader(str(out)).verify()["damaged"] == []
    a, b = StoreReader(projected_store.out), StoreReader(str(out))
    assert a.header.projection == b.header.projection
    for spec in a.specs:
        np.testing.assert_array_equal(
            a.features_array(spec.name)[...], b.features_array(spec.name)[...]
        )


def test_the_map_is_read_without_the_view_rows(projected_store, tmp_path):
    """Users of the map alone (the cache feed's source, shard workers, --projection) open the
    store's index: its header and projection arrays, not every view's metadata and boxes."""
    import shutil

    out = tmp_path / "index.zarr"
    shutil.copytree(projected_store.out, out)
    full = StoreReader(str(out)).projection_arrays()
    shutil.rmtree(out / "meta")
    shutil.rmtree(out / "boxes")
    with pytest.raises(StoreDamaged, match=r"meta/image_id: missing"):
        StoreReader(str(out))
    index = StoreIndex(str(out))
    assert index.specs == StoreReader(projected_store.out).specs
    for name, (mean, comp) in index.projection_arrays().items():
        assert np.array_equal(mean, full[name][0]) and np.array_equal(comp, full[name][1])


def test_a_damaged_projection_is_named(projected_store, tmp_path):
    import shutil

    import zarr

    out = tmp_path / "d.zarr"
    shutil.copytree(projected_store.out, out)
    name = StoreReader(str(out)).specs[0].name
    arr = zarr.open_array(str(out / "projection" / name / "components"), mode="r+")
    arr[0, 0] = arr[0, 0] + 1.0
    with pytest.raises(StoreDamaged, match=r"d.zarr: projection: sha256 differs"):
        StoreReader(str(out)).verify()


def test_dry_run_reports_every_choice(synthetic, tmp_path):
    report = dry_run(projected(synthetic, tmp_path / "x.zarr", project="1/2"))
    rows = {(c["project"], c["dtype"]): c for c in report.choices}
    assert set(rows) == {
        (p, d) for p in ("none", "auto", 0.5) for d in ("float16", "uint8", "uint4")
    }
    assert (
        rows[(0.5, "float16")]["chosen"]
        and report.bytes_per_view == rows[(0.5, "float16")]["bytes_per_view"]
    )
    full = rows[("none", "float16")]["bytes_per_view"]
    assert abs(rows[(0.5, "float16")]["bytes_per_view"] - full / 2) < full * 0.02
    assert rows[("none", "float16")]["coco_bytes"] == full * 118_287
    assert not (tmp_path / "x.zarr").exists()


def test_runs_on_a_projected_store_carry_its_map_everywhere(synthetic, projected_store, tmp_path):
    """Training records the projection in the fingerprint and the checkpoint; eval from the store
    and from images agree; a store with another projection (or none) is refused in one line; an
    online run with source.projection has the cache run's fingerprint."""
    from cachedet.engine.train import train
    from cachedet.evaluation.predictor import Predictor
    from cachedet.runs.record import RunRecord

    run = tmp_path / "run"
    train(train_config(run, projected_store.out, epochs=1, max_steps_per_epoch=2), progress=False)
    record = RunRecord.from_dict(json.loads((run / "config.json").read_text()))
    sha = StoreReader(projected_store.out).header.projection["sha256"]
    assert record.fingerprint["projection"]["sha256"] == sha
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert Projection.from_state(ckpt["state"]["projection"]).sha256 == sha

    # from images: the predictor's backbone applies the saved map, so it gives the stored features
    predictor = Predictor(str(run), device="cpu")
    assert predictor.backbone.projection is not None
    store = StoreReader(projected_store.out)
    view = store.view_params(0)
    from cachedet.data.images import ViewDataset

    image = ViewDataset(
        [view],
        [_image_path(synthetic, view.image_id)],
        predictor.backbone.mean,
        predictor.backbone.std,
    )[0][0]
    with torch.no_grad():
        feats = predictor.backbone(image[None])
    for spec in store.specs:
        np.testing.assert_allclose(
            feats[spec.name].numpy(), store.read_level(spec.name, slice(0, 1)), atol=2e-2, rtol=1e-2
        )

    # another projection of the same backbone, or none: refused by the fingerprint check
    from cachedet.api import evaluate

    plain_view = AugmentConfig(size=64, augment=False)
    val = projected(
        synthetic,
        tmp_path / "val.zarr",
        augment=plain_view,
        project=None,
        projection=projected_store.out,
    )
    extract(val, progress=False)
    assert (
        StoreReader(val.out).header.projection == StoreReader(projected_store.out).header.projection
    )
    from_store, _ = evaluate(
        str(run), synthetic["train"], synthetic["images"], cache=val.out, progress=False
    )
    from_images, _ = evaluate(str(run), synthetic["train"], synthetic["images"], progress=False)
    assert abs(from_store["bbox"]["AP"] - from_images["bbox"]["AP"]) < 1.0
    for project in (4, None):  # fitted anew, or none: refused by the fingerprint check
        other = projected(
            synthetic, tmp_path / f"o{project}.zarr", augment=plain_view, project=project
        )
        extract(other, progress=False)
        with pytest.raises(CachedetError, match=r"does not fit run .*projection"):
            evaluate(
                str(run), synthetic["train"], synthetic["images"], cache=other.out, progress=False
            )

    # online with the store's projection: the same fingerprint as the cache run
    from cachedet.engine.distributed import DistInfo
    from cachedet.engine.train import make_source

    online = train_config(
        tmp_path / "online",
        None,
        online=True,
        annotations=synthetic["train"],
        images=synthetic["images"],
        backbone="test_resnet",
        weights="random",
        size=64,
        scale_range=(0.8, 1.25),
        projection=projected_store.out,
    )
    source = make_source(online, DistInfo(0, 1, 0), torch.device("cpu"))
    assert source.fingerprint == record.fingerprint
    bad = train_config(tmp_path / "o2", projected_store.out, projection=projected_store.out)
    with pytest.raises(CachedetError, match="source.projection applies .* online backbone"):
        bad.validate()


def _image_path(synthetic, image_id):
    data = json.loads(open(synthetic["train"]).read())
    name = next(i["file_name"] for i in data["images"] if i["id"] == image_id)
    return f"{synthetic['images']}/{name}"


def test_uint4_packs_two_channels_per_byte_within_half_a_step():
    from cachedet.cache import schema

    x = _correlated_features(3, channels=7)  # an odd channel count: the last nibble is padding
    stored, quant = schema.encode(x.numpy(), "uint4")
    assert stored.shape == (2, 4, 16, 16) and stored.dtype == np.uint8 and quant.shape == (2, 7, 2)
    back = schema.decode(stored, "uint4", quant)
    span = x.flatten(2).amax(2) - x.flatten(2).amin(2)
    err = np.abs(back - x.numpy()).reshape(2, 7, -1).max(2)
    assert (err <= span.numpy() / 30 + 1e-5).all()
    assert schema.bytes_per_view({"c3": (7, 16, 16)}, "uint4") == 4 * 256 + 7 * 8


def test_a_projected_uint4_store_reads_back_what_float32_stores(
    synthetic, projected_store, tmp_path
):
    exact = projected(synthetic, tmp_path / "f32.zarr", dtype="float32")
    packed = projected(synthetic, tmp_path / "u4.zarr", dtype="uint4", project=8)
    extract(exact, progress=False)
    extract(packed, progress=False)
    a, b = StoreReader(exact.out), StoreReader(packed.out)
    assert b.verify()["damaged"] == [] and a.header.projection == b.header.projection
    for spec in a.specs:
        assert b.features_array(spec.name).shape[1] == 4  # 8 channels, two per byte
        x, y = a.read_level(spec.name, slice(None)), b.read_level(spec.name, slice(None))
        span = (x.max((2, 3)) - x.min((2, 3)))[..., None, None]
        assert (np.abs(y - x) <= span / 30 + 1e-4).all()


def test_the_cli_extracts_a_projected_store_and_names_its_options(synthetic, tmp_path, cli):
    from helpers import extract_args

    out = tmp_path / "cli.zarr"
    args = extract_args(synthetic, out) + [
        "--size",
        "64",
        "--views",
        "1",
        "--backbone",
        "test_resnet",
    ]
    result = cli(*args, "--random-init", "--project", "1/4", "--dtype", "uint4", "--quiet")
    assert result.exit_code == 0, result.output
    info = cli("cache", "info", out)
    assert "projected (PCA on 12 views): c3 12 of 48 channels" in info.output
    bad = cli(*args, "--project", "lots")
    assert bad.exit_code != 0 and "--project 'lots': expected auto" in bad.output
    both = cli(*args, "--project", "4", "--projection", out)
    assert "--project fits a new projection, --projection applies a store's" in both.output
    hybrid = cli(*args, "--project", "auto", "--cache-stage", "1")
    assert "--project and --cache-stage exclude each other" in hybrid.output


def test_a_projected_run_resumes(synthetic, projected_store, tmp_path):
    from cachedet.engine.train import train

    run = tmp_path / "r"
    first = train_config(run, projected_store.out, epochs=1, max_steps_per_epoch=2)
    train(first, progress=False)
    more = train_config(run, projected_store.out, epochs=2, max_steps_per_epoch=2, resume=True)
    assert train(more, progress=False).steps == 4
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    sha = StoreReader(projected_store.out).header.projection["sha256"]
    assert Projection.from_state(ckpt["state"]["projection"]).sha256 == sha


@pytest.mark.slow
def test_dask_workers_write_the_same_projected_copy_paste_store(synthetic, tmp_path):
    kw = dict(augment=AugmentConfig(size=64, seed=1, copy_paste=0.5), project="1/2")
    single = projected(synthetic, tmp_path / "one.zarr", **kw)
    extract(single, progress=False)
    multi = projected(synthetic, tmp_path / "two.zarr", workers=2, **kw)
    assert extract(multi, progress=False).shards_run == 3
    a, b = StoreReader(single.out), StoreReader(multi.out)
    assert a.header.projection == b.header.projection and a.has_masks
    assert (a.meta["paste_image_id"] >= 0).any()
    for spec in a.specs:  # one thread per dask worker: equal up to float16 rounding, as unprojected
        np.testing.assert_allclose(
            a.read_level(spec.name, slice(None)),
            b.read_level(spec.name, slice(None)),
            atol=1e-3,
            rtol=1e-3,
        )


def test_float8_keeps_three_mantissa_bits_of_each_centred_channel():
    from cachedet.cache import schema

    x = _correlated_features(5, channels=6)
    stored, quant = schema.encode(x.numpy(), "float8")
    assert stored.shape == x.shape and stored.dtype == np.uint8 and quant.shape == (2, 6, 2)
    back = schema.decode(stored, "float8", quant)
    centre = quant[..., 0, None, None]
    # e4m3: a relative error of at most 2^-4 around the channel's centre (or below the subnormal step)
    assert (
        np.abs(back - x.numpy())
        <= np.abs(x.numpy() - centre) / 16 + quant[..., 1, None, None] * 2**-9 + 1e-6
    ).all()
    assert schema.bytes_per_view({"c3": (6, 16, 16)}, "float8") == 6 * 256 + 6 * 8
