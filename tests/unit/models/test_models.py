import pytest
import torch
from torchvision.ops import box_iou

from cachedet.core.structures import FeatureSpec
from cachedet.models.build import build_neck
from cachedet.models.cascade import CascadeRoIHeads
from cachedet.models.detector import HEADS, DetectorConfig, build_detector
from cachedet.models.nasfpn import NASFPN_CELLS

SPECS = (FeatureSpec("c3", 48, 8), FeatureSpec("c4", 192, 16), FeatureSpec("c5", 96, 32))


def features(batch=2, size=128, specs=SPECS):
    g = torch.Generator().manual_seed(0)
    return {
        s.name: torch.randn(batch, s.channels, size // s.stride, size // s.stride, generator=g)
        for s in specs
    }


@pytest.mark.parametrize(
    "name, extra, repeats, channels, levels",
    [
        ("fpn", "maxpool", 5, 64, ["p3", "p4", "p5", "p6"]),
        ("fpn", "p6p7", 5, 64, ["p3", "p4", "p5", "p6", "p7"]),
        ("nasfpn", "maxpool", 5, 64, ["p3", "p4", "p5", "p6", "p7"]),
        ("nasfpn", "maxpool", 7, 96, ["p3", "p4", "p5", "p6", "p7"]),
    ],
)
def test_neck_output_shapes_and_strides(name, extra, repeats, channels, levels):
    neck = build_neck(name, list(SPECS), channels, extra, repeats)
    out = neck(features(size=256))
    assert list(out) == levels == [s.name for s in neck.out_specs]
    for spec, t in zip(neck.out_specs, out.values()):
        assert spec.stride == 2 ** int(spec.name[1:])
        assert tuple(t.shape) == (2, channels, 256 // spec.stride, 256 // spec.stride)
    if name == "nasfpn":
        assert len(neck.repeats) == repeats and all(
            len(r) == len(NASFPN_CELLS) for r in neck.repeats
        )


def test_nasfpn_cells_are_the_published_architecture():
    assert [c[0] for c in NASFPN_CELLS] == [4, 4, 3, 4, 5, 7, 6]
    assert [c[1] for c in NASFPN_CELLS].count("attention") == 4
    assert sorted(c[0] for c in NASFPN_CELLS if c[3]) == [3, 4, 5, 6, 7]  # one output per level


def test_cascade_empty_targets_give_zero_box_loss_at_every_stage():
    heads = CascadeRoIHeads(["p3", "p4", "p5"], 16, num_classes=3, rois_per_image=32)
    feats = {f"p{lvl}": torch.randn(2, 16, 128 // 2**lvl, 128 // 2**lvl) for lvl in (3, 4, 5)}
    proposals = [torch.tensor([[10.0, 10, 60, 60], [30, 20, 90, 100]])] * 2
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    _, losses = heads.train()(feats, proposals, [(128, 128)] * 2, empty)
    for t in range(1, 4):
        assert losses[f"stage{t}/loss_box"].item() == 0.0
        assert losses[f"stage{t}/loss_cls"].item() > 0
    det = build_detector(
        DetectorConfig(
            num_classes=3,
            canvas=128,
            in_specs=SPECS,
            neck="nasfpn",
            head="cascade",
            neck_channels=16,
        )
    )
    out = det(features(), [empty[0], empty[1]])
    assert out["loss_box"].item() == 0.0 and out["loss_rpn_box"].item() == 0.0


def test_cascade_stages_refine_boxes_towards_the_target():
    torch.manual_seed(0)
    size = 128
    heads = CascadeRoIHeads(["p3", "p4", "p5"], 16, num_classes=1, rois_per_image=64, fc_dim=128)
    feats = {f"p{lvl}": torch.randn(1, 16, size // 2**lvl, size // 2**lvl) for lvl in (3, 4, 5)}
    gt = torch.tensor([[32.0, 40.0, 96.0, 100.0]])
    targets = [{"boxes": gt, "labels": torch.tensor([1])}]
    g = torch.Generator().manual_seed(1)

    def jittered(n):
        wh = gt[:, 2:] - gt[:, :2]
        return (gt + torch.randn(n, 4, generator=g) * wh.repeat(1, 2) * 0.12).clamp(0, size)

    opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
    heads.train()
    for _ in range(150):
        _, losses = heads(feats, [jittered(48)], [(size, size)], targets)
        opt.zero_grad()
        (losses["loss_cls"] + losses["loss_box"]).backward()
        opt.step()
    heads.eval()
    proposals = [jittered(64)]
    with torch.no_grad():
        stages = heads.stage_outputs(feats, proposals, [(size, size)])
    ious = [box_iou(proposals[0], gt).mean().item()] + [
        box_iou(refined[0], gt).mean().item() for _, _, _, refined in stages
    ]
    assert all(b >= a - 1e-3 for a, b in zip(ious, ious[1:])), ious
    assert ious[-1] > ious[0] + 0.05, ious


# Parameter counts of small configurations, pinned so that an accidental change is seen.
PINNED = {  # fpn + faster-rcnn checked by hand: FPN 38,592 + RPN 9,743 + 4conv1fc 237,952 + predictor 3,870
    ("fpn", "faster-rcnn"): 290_157,
    ("fpn", "cascade"): 704_237,
    ("fpn", "retinanet"): 172_913,
    (
        "nasfpn",
        "faster-rcnn",
    ): 395_565,  # NAS-FPN (2 repeats): laterals 10,944 + P6 3,136 + 14 cells x 9,280
    ("nasfpn", "cascade"): 809_645,
    ("nasfpn", "retinanet"): 241_393,
}


@pytest.mark.parametrize("neck, head", sorted(PINNED))
def test_parameter_counts_are_pinned(neck, head):
    det = build_detector(
        DetectorConfig(
            num_classes=5,
            canvas=128,
            in_specs=SPECS,
            neck=neck,
            head=head,
            neck_channels=32,
            options={
                "box_representation": 128,
                **({"nasfpn_repeats": 2} if neck == "nasfpn" else {}),
            },
        )
    )
    assert sum(p.numel() for p in det.parameters()) == PINNED[(neck, head)]


@pytest.mark.parametrize("head", HEADS)
def test_every_head_trains_and_predicts_on_nasfpn(head):
    det = build_detector(
        DetectorConfig(
            num_classes=4,
            canvas=128,
            in_specs=SPECS,
            neck="nasfpn",
            head=head,
            neck_channels=32,
            options={"nasfpn_repeats": 1},
        )
    )
    targets = [{"boxes": torch.tensor([[10.0, 12, 70, 90]]), "labels": torch.tensor([3])}] * 2
    losses = det(features(), targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    out = det.predict(features())
    assert len(out) == 2 and all(set(o) == {"boxes", "scores", "labels"} for o in out)
    assert all(((o["labels"] >= 0) & (o["labels"] < 4)).all() for o in out)


def test_bad_detector_settings_are_clear_errors():
    from cachedet.core.errors import CachedetError

    with pytest.raises(CachedetError, match="detector.neck bifpn"):
        build_detector(DetectorConfig(num_classes=2, canvas=64, in_specs=SPECS, neck="bifpn"))
    with pytest.raises(CachedetError, match="detector.options.cascade_ious"):
        build_detector(
            DetectorConfig(
                num_classes=2,
                canvas=64,
                in_specs=SPECS,
                head="cascade",
                options={"cascade_ious": [0.5, 1.5]},
            )
        )
    with pytest.raises(CachedetError, match="unknown detector option"):
        build_detector(
            DetectorConfig(num_classes=2, canvas=64, in_specs=SPECS, options={"box_cnovs": 2})
        )
    with pytest.raises(CachedetError, match="strides 8, 16, 32"):
        build_detector(DetectorConfig(num_classes=2, canvas=64, in_specs=SPECS[1:], neck="nasfpn"))


def test_model_info_counts_and_flop_regimes(cli):
    r = cli(
        "model-info",
        "--backbone",
        "test_resnet",
        "--neck",
        "fpn",
        "--head",
        "faster-rcnn",
        "--size",
        96,
        "--num-classes",
        5,
        "--neck-channels",
        32,
    )
    assert r.exit_code == 0, r.output
    assert "trainable: " in r.stdout and "online_frozen" in r.stdout and "cached" in r.stdout
    import json

    info = json.loads(
        cli(
            "model-info",
            "--backbone",
            "test_resnet",
            "--size",
            96,
            "--num-classes",
            5,
            "--neck-channels",
            32,
            "--json",
        ).stdout
    )
    f = info["flops"]
    assert f["finetune"] > f["online_frozen"] > f["cached"] > 0
    assert info["params"]["trainable"]["finetune"] == info["params"]["total"]
    assert info["params"]["trainable"]["cached"] == info["params"]["detector"]


def test_model_info_with_the_mask_head(cli):
    import json

    args = (
        "model-info",
        "--backbone",
        "test_resnet",
        "--size",
        96,
        "--num-classes",
        5,
        "--neck-channels",
        32,
        "--json",
    )
    boxes, masks = (json.loads(cli(*args, *extra).stdout) for extra in ((), ("--masks",)))
    # Mask R-CNN's head: 4 3x3 convs (32 -> 256, then 256 -> 256), a 2x2 deconvolution, a 1x1 logit per class + background
    analytic = (
        (32 * 256 * 9 + 256) + 3 * (256 * 256 * 9 + 256) + (256 * 256 * 4 + 256) + (256 * 6 + 6)
    )
    assert boxes["mask_head_params"] == masks["mask_head_params"] == analytic
    assert masks["params"]["detector"] == boxes["params"]["detector"] + analytic
    assert masks["flops"]["cached"] > boxes["flops"]["cached"]
    r = cli(*args[:-1], "--masks")
    assert "mask head: 2.11 M (included)" in r.stdout
