"""AdaptFormer adapters in a frozen plain ViT, online and from a hybrid cache (--cache-stage K)."""

import json
import os

import pytest
import torch
from conftest import small_config
from test_vit import LIGHT

from cachedet.api import evaluate
from cachedet.backbones.backbone import BackboneConfig, build_backbone
from cachedet.cache.store import FeatureStore
from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.data.images import ViewDataset
from cachedet.data.views import AugmentConfig
from cachedet.engine.train import TrainConfig, train
from cachedet.extraction.run import extract


@pytest.mark.parametrize(
    "name, taps, size", [("test_vit2", (2, 5, 7), 64), ("eva02_tiny_patch14_224", (5, 11), 112)]
)
def test_zero_initialised_adapters_leave_the_frozen_vit_exactly(name, taps, size):
    """test_vit2: a register token and LayerScale 1e-5; EVA-02: RoPE, SwiGLU MLP, a class token."""
    plain = build_backbone(BackboneConfig(name, taps, "random")).eval()
    adapted = build_backbone(BackboneConfig(name, taps, "random")).add_adapters((1, 6)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        a, b = plain(x), adapted(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dim = plain.specs[0].channels
    assert adapted.adapter_parameter_count() == 2 * (
        dim * 64 + 64 + 64 * dim + dim
    )  # AdaptMLP, bottleneck 64


def test_only_the_vit_adapters_get_gradients():
    bb = build_backbone(BackboneConfig("test_vit2", (2, 7), "random")).add_adapters((3, 7))
    feats = bb(torch.randn(2, 3, 64, 64))
    sum(v.square().mean() for v in feats.values()).backward()
    adapters = {n: p for n, p in bb.named_parameters() if ".adapter." in n}
    assert len(adapters) == 8 and all(
        p.requires_grad and p.grad is not None for p in adapters.values()
    )
    assert all(
        p.grad.abs().sum() > 0 for n, p in adapters.items() if ".up." in n
    )  # down follows once up leaves zero
    assert all(
        p.grad is None and not p.requires_grad
        for n, p in bb.named_parameters()
        if n not in adapters
    )
    with pytest.raises(CachedetError, match="source.adapt_stages 8: test_vit2 runs blocks 0..7"):
        bb.add_adapters((8,))


@pytest.fixture(scope="module")
def vit_hybrid(synthetic, tmp_path_factory):
    """test_vit (class token), taps 2 and 5, cached after block 3."""
    cfg = small_config(
        synthetic,
        str(tmp_path_factory.mktemp("vithybrid") / "h.zarr"),
        views=1,
        cache_stage=3,
        backbone=BackboneConfig("test_vit", (2, 5), "random"),
        augment=AugmentConfig(size=64, seed=1),
        dtype="float32",
    )
    extract(cfg, progress=False)
    return cfg


def test_vit_hybrid_cache_resumes_at_block_k_exactly(vit_hybrid):
    fs = FeatureStore(vit_hybrid.out)
    assert [(s.name, s.channels, s.stride) for s in fs.specs] == [
        ("b2", 64, 16),
        ("b3", 64, 16),
        ("b3_prefix", 64, 16),
    ]
    assert (
        fs.header.to_dict()["feature_shapes"]["b3_prefix"] == [64, 1, 1]
        and fs.header.hybrid.cache_stage == 3
    )
    bb = build_backbone(BackboneConfig("test_vit", (2, 5), "random")).add_adapters((4, 5)).eval()
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)  # trained-looking adapters, so the comparison would see them
    data = load_detection_dataset(vit_hybrid.annotations, vit_hybrid.images)
    by_id = {r.id: data.image_path(r) for r in data.images}
    params = [fs.view_params(v) for v in range(4)]
    views = ViewDataset(params, [by_id[p.image_id] for p in params], bb.mean, bb.std)
    images = torch.stack([views[v][0] for v in range(4)])
    cached = {k: torch.from_numpy(v) for k, v in fs.read_features(0, 4).items()}
    with torch.no_grad():
        online, hybrid = bb(images), bb.forward_from(cached, 3)
    assert online.keys() == hybrid.keys() == {"b2", "b5"}
    for k in online:
        torch.testing.assert_close(hybrid[k], online[k], rtol=1e-4, atol=1e-4)


def test_vit_adapters_train_online_and_from_the_hybrid_cache_then_eval(
    vit_hybrid, synthetic, tmp_path, cli
):
    common = dict(
        epochs=1,
        batch_size=6,
        max_steps_per_epoch=1,
        neck_channels=16,
        warmup_steps=1,
        detector_options=LIGHT,
        adapters=True,
        lr=0.05,
    )
    online = train(
        TrainConfig.of(
            out=str(tmp_path / "online"),
            online=True,
            annotations=synthetic["train"],
            images=synthetic["images"],
            backbone="test_vit",
            weights="random",
            out_indices=(2, 5),
            size=64,
            adapt_stages=(4, 5),
            **common,
        ),
        progress=False,
    )
    hybrid = train(
        TrainConfig.of(out=str(tmp_path / "hybrid"), cache=vit_hybrid.out, **common), progress=False
    )
    a, b = (
        torch.load(os.path.join(r.run, "checkpoints", "last.pt"), weights_only=False)
        for r in (online, hybrid)
    )
    assert (
        a["run"]["adapters"] == b["run"]["adapters"] == [4, 5]
    )  # the hybrid default: every block after the cache
    assert a["run"]["fingerprint"] == b["run"]["fingerprint"]
    assert [
        k for k, v in b["state"]["backbone"].items() if ".adapter.up." in k and v.abs().sum() > 0
    ]
    metrics, _ = evaluate(hybrid.run, synthetic["val"], synthetic["images"], progress=False)
    assert 0 <= metrics["bbox"]["AP"] <= 100
    r = cli(
        "train-heads",
        "--cache",
        vit_hybrid.out,
        "--out",
        tmp_path / "inside",
        "--adapters",
        "--adapt-stages",
        "3,4",
    )
    assert r.exit_code == 2 and "stage 3 is inside the cache" in r.stderr
    r = cli(
        "model-info",
        "--backbone",
        "test_vit",
        "--taps",
        "2,5",
        "--size",
        64,
        "--adapters",
        "--json",
        "--num-classes",
        3,
        "--neck-channels",
        16,
        "--box-convs",
        0,
    )
    info = json.loads(r.stdout)
    assert (
        info["params"]["adapt_stages"] == [0, 1, 2, 3, 4, 5]
        and info["params"]["adapters"] == 6 * 8_320
    )
    assert info["neck"] == "simple" and "adapters_online" in info["flops"]
