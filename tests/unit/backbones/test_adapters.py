"""Residual adapters in the frozen backbone, online and from a hybrid cache."""

import json
import os

import pytest
import torch
from conftest import TRAIN_LIGHT as LIGHT
from conftest import small_config
from conftest import train_config as tiny_train

from cachedet.api import evaluate
from cachedet.backbones.backbone import BackboneConfig, build_backbone
from cachedet.cache.store import FeatureStore
from cachedet.core.errors import CachedetError
from cachedet.data.images import ViewDataset
from cachedet.engine.train import train
from cachedet.extraction.run import extract
from cachedet.models.detector import DetectorConfig, build_detector


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """test_resnet weights without timm's zero-initialised last BatchNorm of each block (a random
    init that zeroes every residual branch would also zero the adapters' gradients)."""
    import timm

    torch.manual_seed(0)
    sd = timm.create_model("test_resnet", pretrained=False).state_dict()
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 1:  # BatchNorm scales
            v.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(sd, path)
    return str(path)


def detector_for(backbone, canvas=96):
    torch.manual_seed(0)
    return build_detector(
        DetectorConfig(
            num_classes=8,
            canvas=canvas,
            in_specs=tuple(backbone.specs),
            neck_channels=32,
            options=LIGHT,
        )
    ).eval()


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_zero_initialised_adapters_leave_the_frozen_model_exactly(name):
    plain = build_backbone(BackboneConfig(name, None, "random"), warn=False).eval()
    adapted = (
        build_backbone(BackboneConfig(name, None, "random"), warn=False)
        .add_adapters((2, 3, 4))
        .eval()
    )
    assert adapted.adapter_parameter_count() > 0
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        a, b = plain(x), adapted(x)
        for k in a:
            assert torch.equal(a[k], b[k]), k
        det = detector_for(plain)
        pa, pb = det.predict(a), det.predict(b)
    for u, v in zip(pa, pb):
        assert torch.equal(u["boxes"], v["boxes"]) and torch.equal(u["scores"], v["scores"])


def test_only_the_adapters_get_gradients(weights):
    bb = build_backbone(BackboneConfig("test_resnet", None, weights), warn=False).add_adapters(
        (3, 4)
    )
    feats = bb(torch.randn(2, 3, 96, 96))
    sum(v.square().mean() for v in feats.values()).backward()
    adapters = {n: p for n, p in bb.named_parameters() if ".adapter." in n}
    assert adapters and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.values()
    )
    assert all(
        p.grad is None and not p.requires_grad
        for n, p in bb.named_parameters()
        if n not in adapters
    )
    with pytest.raises(CachedetError, match="source.adapt_stages 7"):
        bb.add_adapters((7,))


@pytest.fixture(scope="module")
def hybrid(synthetic, tmp_path_factory, weights):
    cfg = small_config(
        synthetic,
        str(tmp_path_factory.mktemp("hybrid") / "h.zarr"),
        views=1,
        cache_stage=3,
        backbone=BackboneConfig("test_resnet", None, weights),
    )
    extract(cfg, progress=False)
    return cfg


def test_hybrid_cache_stores_the_stages_up_to_k(hybrid, cli):
    fs = FeatureStore(hybrid.out)
    assert [s.name for s in fs.specs] == [
        "c3",
        "c4",
    ]  # the pyramid levels of stages <= 3 (c4 feeds stage 4)
    assert fs.header.hybrid.cache_stage == 3
    assert [s.name for s in fs.header.hybrid.specs] == ["c3", "c4", "c5"]
    assert "hybrid cache" in cli("cache", "info", hybrid.out).stdout


def test_hybrid_path_gives_the_online_loss(hybrid, weights):
    """Same view: cached stages <= 3 + adapted stage 4 vs the whole adapted backbone on the image."""
    fs = FeatureStore(hybrid.out)
    bb = (
        build_backbone(BackboneConfig("test_resnet", None, weights), warn=False)
        .add_adapters((4,))
        .eval()
    )
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # trained-looking adapters, so the test would see them
    det = detector_for(bb).train()
    ds = ViewDataset([fs.view_params(v) for v in range(4)], [None] * 4, bb.mean, bb.std)
    from cachedet.data.coco import load_detection_dataset

    data = load_detection_dataset(hybrid.annotations, hybrid.images)
    by_id = {r.id: data.image_path(r) for r in data.images}
    ds.paths = [by_id[fs.view_params(v).image_id] for v in range(4)]
    images = torch.stack([ds[v][0] for v in range(4)])
    targets = [
        {
            "boxes": torch.from_numpy(fs.boxes(v)[0].copy()),
            "labels": torch.from_numpy(fs.boxes(v)[1].copy()),
        }
        for v in range(4)
    ]
    cached = {k: torch.from_numpy(v) for k, v in fs.read_features(0, 4).items()}
    online_feats, hybrid_feats = bb(images), bb.forward_from(cached, 3)
    for k in online_feats:
        torch.testing.assert_close(hybrid_feats[k], online_feats[k], rtol=2e-2, atol=2e-2)
    torch.manual_seed(1)
    online = det(online_feats, targets)
    torch.manual_seed(1)
    from_cache = det(hybrid_feats, targets)
    for k in online:
        torch.testing.assert_close(from_cache[k], online[k], rtol=2e-2, atol=2e-3)


def test_train_online_and_hybrid_with_adapters_then_eval(hybrid, weights, synthetic, tmp_path, cli):
    online = train(
        tiny_train(
            tmp_path / "online",
            None,
            online=True,
            annotations=synthetic["train"],
            images=synthetic["images"],
            backbone="test_resnet",
            weights=weights,
            size=96,
            adapters=True,
            adapt_stages=(4,),
            epochs=1,
        ),
        progress=False,
    )
    from_cache = train(
        tiny_train(tmp_path / "hybrid", hybrid.out, adapters=True, epochs=1), progress=False
    )
    a = torch.load(os.path.join(online.run, "checkpoints", "last.pt"), weights_only=False)
    b = torch.load(os.path.join(from_cache.run, "checkpoints", "last.pt"), weights_only=False)
    assert a["run"]["adapters"] == b["run"]["adapters"] == [4]
    assert (
        a["run"]["fingerprint"] == b["run"]["fingerprint"]
    )  # the same model, whichever way its features came
    changed = [
        k for k, v in b["state"]["backbone"].items() if ".adapter." in k and v.abs().sum() > 0
    ]
    assert changed  # the adapters moved away from zero
    metrics, _ = evaluate(from_cache.run, synthetic["val"], synthetic["images"], progress=False)
    assert 0 <= metrics["bbox"]["AP"] <= 100
    r = cli("train-heads", "--cache", hybrid.out, "--out", tmp_path / "no-adapters", "--epochs", 1)
    assert r.exit_code == 2 and "train it with --adapters" in r.stderr
    r = cli(
        "train-heads",
        "--cache",
        hybrid.out,
        "--out",
        tmp_path / "inside",
        "--adapters",
        "--adapt-stages",
        "3,4",
    )
    assert r.exit_code == 2 and "stage 3 is inside the cache" in r.stderr


def test_adapters_need_a_backbone(synthetic, tmp_path):
    cfg = small_config(synthetic, str(tmp_path / "plain.zarr"), views=1)
    extract(cfg, progress=False)
    with pytest.raises(CachedetError, match="plain frozen features"):
        train(tiny_train(tmp_path / "run", cfg.out, adapters=True), progress=False)
    with pytest.raises(CachedetError, match="ExtractConfig.cache_stage 4"):
        extract(
            small_config(synthetic, str(tmp_path / "h.zarr"), views=1, cache_stage=4),
            progress=False,
        )


def test_model_info_counts_adapters(cli):
    r = cli(
        "model-info",
        "--backbone",
        "test_resnet",
        "--size",
        64,
        "--adapters",
        "--adapt-stages",
        "3,4",
        "--json",
    )
    info = json.loads(r.stdout)
    bb = build_backbone(BackboneConfig("test_resnet", None, "random"), warn=False).add_adapters(
        (3, 4)
    )
    assert info["params"]["adapters"] == bb.adapter_parameter_count() > 0
    assert (
        info["params"]["trainable"]["adapters_online"]
        == info["params"]["detector"] + info["params"]["adapters"]
    )
    assert "adapters_online" in info["flops"]
