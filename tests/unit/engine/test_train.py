import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TRAIN_LIGHT, small_config, train_config

from cachedet.backbones.backbone import build_backbone
from cachedet.cache.dataset import CachedViews, InMemoryViews, choose_epoch_views
from cachedet.cache.store import FeatureStore
from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec
from cachedet.data.coco import load_detection_dataset
from cachedet.data.images import read_image
from cachedet.data.views import normalize, transform_image
from cachedet.engine.train import train
from cachedet.extraction.run import extract
from cachedet.models.detector import HEADS, DetectorConfig, build_detector

LIGHT = TRAIN_LIGHT
tiny_train = train_config


@pytest.fixture(scope="module")
def store(synthetic, tmp_path_factory):
    cfg = small_config(synthetic, str(tmp_path_factory.mktemp("cache") / "s.zarr"), views=2)
    extract(cfg, progress=False)
    return cfg


def test_view_policy_uses_one_view_per_image_and_all_over_epochs():
    image_ids = np.repeat(np.arange(10), 4)
    usable = np.arange(40)
    seen = set()
    for epoch in range(12):
        chosen = choose_epoch_views(image_ids, usable, 1, seed=0, epoch=epoch)
        assert sorted(image_ids[chosen].tolist()) == list(range(10))
        seen.update(chosen.tolist())
    assert seen == set(range(40))
    two = choose_epoch_views(image_ids, usable, 2, seed=0, epoch=0)
    assert len(two) == 20 and len(set(two.tolist())) == 20
    assert not np.array_equal(
        choose_epoch_views(image_ids, usable, 1, 0, 0),
        choose_epoch_views(image_ids, usable, 1, 0, 1),
    )


@pytest.fixture(scope="module")
def uint8_store(synthetic, tmp_path_factory):
    cfg = small_config(
        synthetic, str(tmp_path_factory.mktemp("cache") / "q.zarr"), views=2, dtype="uint8"
    )
    extract(cfg, progress=False)
    return cfg


@pytest.mark.parametrize("which", ["store", "uint8_store"])
def test_cached_and_in_memory_feeds_agree(which, request):
    store = request.getfixturevalue(which)
    streamed = CachedViews(store.out, shuffle_buffer=4)
    ram = InMemoryViews(store.out)
    reference = FeatureStore(store.out)
    for epoch in (0, 1):
        streamed.set_epoch(epoch)
        ram.set_epoch(epoch)
        a = {s["view"]: s for s in streamed}
        b = {s["view"]: s for s in ram}
        assert a.keys() == b.keys() and len(a) == 12
        for v in a:
            for name in a[v]["features"]:
                torch.testing.assert_close(a[v]["features"][name], b[v]["features"][name])
                want = torch.from_numpy(reference.read_level(name, slice(v, v + 1))[0])
                torch.testing.assert_close(a[v]["features"][name], want)
            assert torch.equal(a[v]["boxes"], b[v]["boxes"])
    # float16 for autocast: both feeds hand out the same half-precision features
    half_streamed = {s["view"]: s for s in CachedViews(store.out, keep_float16=True)}
    half_ram = {s["view"]: s for s in InMemoryViews(store.out, keep_float16=True)}
    for v, sample in half_ram.items():
        for name, x in sample["features"].items():
            assert x.dtype == torch.float16
            assert torch.equal(x, half_streamed[v]["features"][name])
            want = torch.from_numpy(reference.read_level(name, slice(v, v + 1))[0])
            torch.testing.assert_close(x.float(), want, rtol=1e-3, atol=1e-3)
    shards = [CachedViews(store.out, rank=r, world=2) for r in (0, 1)]
    parts = [{s["view"] for s in ds} for ds in shards]
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 12


@pytest.mark.parametrize("which", ["store", "uint8_store"])
def test_the_default_shuffle_buffer_holds_1_gib_of_views_as_stored(which, request, monkeypatch):
    import cachedet.cache.dataset as dataset_mod

    url = request.getfixturevalue(which).out
    reader = FeatureStore(url)
    per_view = reader.stored_bytes_per_view()
    stored = [reader.read_stored(s.name, slice(0, 1)) for s in reader.specs]
    assert per_view == sum(x.nbytes + (0 if q is None else q.nbytes) for x, q in stored)
    assert CachedViews(url).shuffle_buffer == min(256, (1 << 30) // per_view)
    monkeypatch.setattr(dataset_mod, "SHUFFLE_BUFFER_BYTES", 3 * per_view + 1)
    assert CachedViews(url).shuffle_buffer == 3
    monkeypatch.setattr(dataset_mod, "SHUFFLE_BUFFER_BYTES", per_view // 2)
    assert CachedViews(url).shuffle_buffer == 1  # at least one view
    assert CachedViews(url, shuffle_buffer=5).shuffle_buffer == 5  # given: kept


def test_a_buffered_view_does_not_keep_its_block_alive(uint8_store):
    ds = CachedViews(uint8_store.out)
    block = ds.blocks_for(0)[0]
    assert len(block) > 1
    sample = next(ds._read_block(block))
    for x, q in sample["stored"].values():  # its own bytes, not a view of the block's array
        assert x.shape[0] == 1 and x.base is None
        assert q.shape[0] == 1 and q.base is None


def test_spawned_loader_workers_read_the_store(store):
    from torch.utils.data import DataLoader

    from cachedet.cache.dataset import collate_views

    ds = CachedViews(store.out)
    views = []
    for batch in DataLoader(
        ds, batch_size=3, num_workers=2, collate_fn=collate_views, multiprocessing_context="spawn"
    ):
        views += batch["views"]
        assert batch["inputs"]["c3"].shape[1:] == (48, 12, 12)
    assert sorted(views) == sorted(s["view"] for s in ds)


def test_cached_and_online_features_give_the_same_loss_and_gradients(store):
    fs = FeatureStore(store.out)
    backbone = build_backbone(store.backbone)
    ds = load_detection_dataset(store.annotations, store.images)
    views = [1, 6]
    images = []
    for v in views:
        p = fs.view_params(v)
        rec = next(r for r in ds.images if r.id == p.image_id)
        images.append(
            transform_image(
                p, normalize(read_image(ds.image_path(rec)), backbone.mean, backbone.std)
            )
        )
    with torch.no_grad():
        online = backbone(torch.stack(images))
    cached = {
        k: torch.from_numpy(np.stack([fs.read_features(v, v + 1)[k][0] for v in views]))
        for k in online
    }
    targets = [
        {"boxes": torch.from_numpy(fs.boxes(v)[0]), "labels": torch.from_numpy(fs.boxes(v)[1])}
        for v in views
    ]
    for head in HEADS:
        torch.manual_seed(0)
        det = build_detector(
            DetectorConfig(
                num_classes=8,
                canvas=96,
                in_specs=tuple(backbone.specs),
                head=head,
                neck_channels=32,
                options=LIGHT if head == "faster-rcnn" else {},
            )
        )
        results = []
        for feats in (cached, online):
            det.zero_grad()
            torch.manual_seed(1)  # same RoI / anchor sampling
            losses = det(feats, targets)
            sum(losses.values()).backward()
            results.append(
                (
                    {k: v.item() for k, v in losses.items()},
                    {n: p.grad.clone() for n, p in det.named_parameters() if p.grad is not None},
                )
            )
        (la, ga), (lb, gb) = results
        for k in la:
            assert la[k] == pytest.approx(lb[k], rel=2e-2, abs=2e-3), (head, k)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("head", HEADS)
def test_empty_targets_give_exactly_zero_box_losses(head):
    specs = (FeatureSpec("c3", 8, 8), FeatureSpec("c4", 8, 16), FeatureSpec("c5", 8, 32))
    det = build_detector(
        DetectorConfig(num_classes=3, canvas=64, in_specs=specs, head=head, neck_channels=16)
    )
    feats = {s.name: torch.randn(2, 8, 64 // s.stride, 64 // s.stride) for s in specs}
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = det(feats, empty)
    assert losses["loss_box"].item() == 0.0 and losses["loss_rpn_box"].item() == 0.0
    assert losses["loss_cls"].item() > 0
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}


def test_degenerate_boxes_are_not_fatal():
    specs = (FeatureSpec("c3", 8, 8), FeatureSpec("c4", 8, 16), FeatureSpec("c5", 8, 32))
    det = build_detector(DetectorConfig(num_classes=3, canvas=64, in_specs=specs, neck_channels=16))
    feats = {s.name: torch.randn(1, 8, 64 // s.stride, 64 // s.stride) for s in specs}
    tiny = [{"boxes": torch.tensor([[10.0, 10.0, 11.0, 11.0]]), "labels": torch.tensor([2])}]
    assert torch.isfinite(sum(det(feats, tiny).values()))


def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_from_the_cache_lowers_the_loss(store, tmp_path):
    result = train(
        tiny_train(tmp_path / "run", store.out, epochs=8, in_memory=True), progress=False
    )
    rows = read_metrics(result.run)
    assert len(rows) == result.steps == 8 * 3
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert {"lr", "views_per_s", "loss_cls", "loss_box", "loss_rpn_cls", "loss_rpn_box"} <= rows[
        0
    ].keys()
    assert os.path.exists(os.path.join(result.run, "checkpoints", "last.pt"))
    cfg = json.load(open(os.path.join(result.run, "config.json")))
    assert cfg["fingerprint"]["backbone"]["name"] == "test_resnet"


def test_resume_after_a_kill_gives_the_same_weights(store, tmp_path, monkeypatch):
    full = train(tiny_train(tmp_path / "full", store.out, epochs=3), progress=False)
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # in the second epoch, after the first epoch's checkpoint
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_train(tmp_path / "killed", store.out, epochs=3), progress=False)
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    with pytest.raises(CachedetError, match="holds a run already"):
        train(tiny_train(tmp_path / "killed", store.out, epochs=3), progress=False)
    resumed = train(
        tiny_train(tmp_path / "killed", store.out, epochs=3, resume=True), progress=False
    )
    assert resumed.steps == full.steps == 9
    a = torch.load(os.path.join(full.run, "checkpoints", "last.pt"), weights_only=False)["state"][
        "detector"
    ]
    b = torch.load(os.path.join(resumed.run, "checkpoints", "last.pt"), weights_only=False)[
        "state"
    ]["detector"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_metrics(resumed.run)] == list(range(1, 10))


def test_an_incompatible_cache_is_refused_on_resume(store, synthetic, tmp_path):
    run = train(tiny_train(tmp_path / "run", store.out, epochs=1), progress=False)
    import dataclasses

    from cachedet.backbones.backbone import BackboneConfig

    other = small_config(
        synthetic,
        str(tmp_path / "other.zarr"),
        backbone=BackboneConfig("test_efficientnet", None, "random"),
    )
    extract(other, progress=False)
    with pytest.raises(
        CachedetError, match=r"does not fit this run \(checkpoint .*\): .*feature_specs"
    ):
        train(
            dataclasses.replace(tiny_train(run.run, other.out, epochs=2), resume=True),
            progress=False,
        )


def test_online_and_finetune_regimes_run_the_same_detector(store, tmp_path):
    common = dict(
        annotations=store.annotations,
        images=store.images,
        backbone="test_resnet",
        weights="random",
        size=96,
        epochs=1,
        max_steps_per_epoch=2,
    )
    frozen = train(tiny_train(tmp_path / "online", None, online=True, **common), progress=False)
    tuned = train(
        tiny_train(tmp_path / "ft", None, online=True, backbone_trainable=True, **common),
        progress=False,
    )
    assert frozen.steps == tuned.steps == 2
    ck_frozen = torch.load(os.path.join(frozen.run, "checkpoints", "last.pt"), weights_only=False)
    ck_tuned = torch.load(os.path.join(tuned.run, "checkpoints", "last.pt"), weights_only=False)
    assert ck_frozen["state"]["backbone"] is None and ck_tuned["state"]["backbone"] is not None
    cached_ck = train(
        tiny_train(tmp_path / "cached", store.out, epochs=1, max_steps_per_epoch=1), progress=False
    )
    cached_fp = torch.load(
        os.path.join(cached_ck.run, "checkpoints", "last.pt"), weights_only=False
    )["run"]["fingerprint"]
    assert (
        cached_fp == ck_frozen["run"]["fingerprint"]
    )  # heads trained online fit the cache and vice versa
    with pytest.raises(CachedetError, match="source.backbone_trainable"):
        train(tiny_train(tmp_path / "bad", store.out, backbone_trainable=True), progress=False)


def test_cli_train_heads(cli, store, tmp_path):
    r = cli(
        "train-heads",
        "--cache",
        store.out,
        "--out",
        tmp_path / "run",
        "--epochs",
        1,
        "--batch-size",
        6,
        "--neck-channels",
        32,
        "--head",
        "retinanet",
        "--optimizer",
        "adamw",
        "--schedule",
        "cosine",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert "2 steps, 1 epochs" in r.stdout
    r = cli("train-heads", "--out", tmp_path / "x", "--quiet")
    assert r.exit_code == 2 and "--cache STORE or --online" in r.stderr


@pytest.mark.slow
def test_ddp_two_processes_with_gloo(store, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys\nfrom cachedet.engine.train import TrainConfig, train\n"
        f"cfg = TrainConfig.of(out={str(tmp_path / 'ddp')!r}, cache={store.out!r}, epochs=2, batch_size=2, neck_channels=32,"
        f" lr=0.01, warmup_steps=1, detector_options={LIGHT!r}, device='cpu')\n"
        "import os\nr = train(cfg, progress=False)\n"
        f"open(os.path.join({str(tmp_path)!r}, 'steps_' + os.environ['RANK']), 'w').write(str(r.steps))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = CachedViews(store.out, world=2)
    per_epoch = [
        min(ds.views_per_rank(epoch)) // 2 for epoch in (0, 1)
    ]  # ranks read whole shard blocks
    expected = per_epoch[0] * 2
    # each rank reports in its own file (two ranks' prints interleave on a shared stdout)
    assert [(tmp_path / f"steps_{r}").read_text() for r in (0, 1)] == [
        str(expected)
    ] * 2  # both ranks ran the same steps
    rows = read_metrics(str(tmp_path / "ddp"))
    assert len(rows) == expected and rows[0]["views_per_s"] > 0


def test_nasfpn_cascade_train_from_the_cache_and_evaluate(cli, store, synthetic, tmp_path):
    run = tmp_path / "run"
    r = cli(
        "train-heads",
        "--cache",
        store.out,
        "--out",
        run,
        "--neck",
        "nasfpn",
        "--head",
        "cascade",
        "--nasfpn-repeats",
        1,
        "--cascade-ious",
        "0.5,0.7",
        "--neck-channels",
        32,
        "--box-fcs",
        1,
        "--epochs",
        1,
        "--batch-size",
        6,
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    cfg = json.load(open(run / "config.json"))["detector"]
    assert cfg["neck"] == "nasfpn" and cfg["head"] == "cascade"
    assert cfg["options"] == {"nasfpn_repeats": 1, "cascade_ious": [0.5, 0.7], "box_fcs": 1}
    r = cli(
        "eval",
        "--run",
        run,
        "--annotations",
        synthetic["val"],
        "--images",
        synthetic["images"],
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert "box AP" in r.stdout
    assert json.load(open(run / "metrics.json"))["num_images"] == 4
