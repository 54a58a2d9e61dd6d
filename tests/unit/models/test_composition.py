"""The detector only wires injected parts; names map to typed configs and builders in one place."""

import os

import pytest
import torch

from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec
from cachedet.models.build import HEADS, NECKS, check_head, head_config, head_supports_masks
from cachedet.models.config import CascadeConfig, FasterRCNNConfig, MaskConfig, RetinaNetConfig
from cachedet.models.detector import Detector, DetectorConfig, build_detector
from cachedet.models.heads import BoxHead

SPECS = (FeatureSpec("c3", 8, 8), FeatureSpec("c4", 8, 16), FeatureSpec("c5", 8, 32))
OLD = os.path.join(os.path.dirname(__file__), "data", "old_detector_state_dicts.pt")


def feats(batch=2, size=64, specs=SPECS):
    g = torch.Generator().manual_seed(0)
    return {
        s.name: torch.randn(batch, s.channels, size // s.stride, size // s.stride, generator=g)
        for s in specs
    }


TARGETS = [{"boxes": torch.tensor([[8.0, 10, 40, 50]]), "labels": torch.tensor([1])}] * 2


def test_options_become_typed_configs_with_their_defaults():
    assert head_config("faster-rcnn", {}) == FasterRCNNConfig(4, 1, 1024, 512, 1000, None)
    options = {"cascade_ious": [0.5, 0.65], "box_fcs": "1", "mask_convs": 2}
    cascade = head_config("cascade", options, masks=True)
    assert cascade == CascadeConfig(box_fcs=1, ious=(0.5, 0.65), mask=MaskConfig(convs=2))
    assert (
        head_config("retinanet", {"box_fcs": 3}) == RetinaNetConfig()
    )  # another head's options are ignored
    assert (RetinaNetConfig.extra_levels, FasterRCNNConfig.extra_levels) == ("p6p7", "maxpool")
    assert list(NECKS) == ["fpn", "nasfpn", "simple"]
    assert list(HEADS) == ["faster-rcnn", "cascade", "retinanet"]


def test_the_masks_rule_is_one_check():
    assert head_supports_masks("faster-rcnn") and head_supports_masks("cascade")
    assert not head_supports_masks("retinanet")
    check_head("cascade", masks=True)
    with pytest.raises(CachedetError, match="retinanet head has no RoIs"):
        check_head("retinanet", masks=True)
    with pytest.raises(
        CachedetError, match="detector.head yolo: expected one of faster-rcnn, cascade, retinanet"
    ):
        check_head("yolo")


@pytest.mark.parametrize(
    "head, levels",
    [("faster-rcnn", ["p3", "p4", "p5", "p6"]), ("retinanet", ["p3", "p4", "p5", "p6", "p7"])],
)
def test_the_head_declares_the_extra_levels_of_the_neck(head, levels):
    det = build_detector(
        DetectorConfig(num_classes=2, canvas=64, in_specs=SPECS, head=head, neck_channels=8)
    )
    assert [s.name for s in det.neck.out_specs] == levels


def test_a_detector_wires_parts_it_is_given():
    built = build_detector(
        DetectorConfig(
            num_classes=2,
            canvas=64,
            in_specs=SPECS,
            neck_channels=8,
            options={"box_representation": 16},
        )
    )
    det = Detector(built.neck, built.head)  # no canvas: sizes must be given
    losses = det(feats(), TARGETS, [(64, 64)] * 2)
    assert (
        tuple(losses) == det.loss_names == ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")
    )
    assert det.last_logged == {} and det.logged_names == ()
    assert len(det.predict(feats(), [(64, 64)] * 2)) == 2
    with pytest.raises(ValueError, match="image_sizes"):
        det.predict(feats())


def test_cascade_stage_losses_are_logged_beside_the_weighted_sums():
    torch.manual_seed(0)
    options = {"box_representation": 16, "cascade_ious": [0.5, 0.6]}
    det = build_detector(
        DetectorConfig(
            num_classes=2,
            canvas=64,
            in_specs=SPECS,
            head="cascade",
            neck_channels=8,
            options=options,
        )
    )
    losses = det(feats(), TARGETS)
    assert "stage1/loss_cls" not in losses and set(losses) == set(det.loss_names)
    logged = det.last_logged
    assert (
        tuple(logged)
        == det.logged_names
        == ("stage1/loss_cls", "stage1/loss_box", "stage2/loss_cls", "stage2/loss_box")
    )
    assert not any(v.requires_grad for v in logged.values())
    for name in ("loss_cls", "loss_box"):  # stage weights 1 and 0.5
        expected = logged[f"stage1/{name}"] + 0.5 * logged[f"stage2/{name}"]
        torch.testing.assert_close(losses[name].detach(), expected)


@pytest.mark.parametrize("head", ["faster-rcnn", "cascade"])
def test_one_box_head_follows_the_neck_width_without_fc_layers(head):
    """The cascade once sized its predictor for 256 x 7 x 7 inputs whatever the neck width."""
    specs = (FeatureSpec("c3", 16, 8), FeatureSpec("c4", 16, 16), FeatureSpec("c5", 16, 32))
    options = {"box_fcs": 0, "box_convs": 0, "rois_per_image": 32, "proposals_per_image": 50}
    det = build_detector(
        DetectorConfig(
            num_classes=3, canvas=64, in_specs=specs, head=head, neck_channels=128, options=options
        )
    )
    box_heads = [m for m in det.modules() if isinstance(m, BoxHead)]
    assert box_heads and all(b.out_dim == 128 * 7 * 7 for b in box_heads)
    losses = det(feats(specs=specs), TARGETS)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    out = det.predict(feats(specs=specs))
    assert len(out) == 2 and all(o["boxes"].shape[1] == 4 for o in out)


@pytest.mark.parametrize(
    "name", ["fpn-faster-rcnn-masks", "fpn-cascade-masks", "fpn-retinanet", "nasfpn-faster-rcnn"]
)
def test_checkpoints_of_the_detector_before_the_recomposition_still_load(name):
    """State dicts saved by the detector that plugged the mask head into torchvision's RoIHeads
    load strictly, and a seed still draws the same initial weights (parameter order kept)."""
    old = torch.load(OLD, weights_only=False)[name]
    torch.manual_seed(0)
    det = build_detector(DetectorConfig.from_dict(old["detector_config"]))
    fresh = {k: v.clone() for k, v in det.state_dict().items()}
    det.load_state_dict(old["detector"])
    loaded = det.state_dict()  # the old weights were saved as float16
    assert set(loaded) == set(fresh) and len(old["detector"]) == len(fresh)
    for k, v in loaded.items():
        reference = fresh[k].half() if fresh[k].is_floating_point() else fresh[k]
        assert torch.equal(v.to(reference.dtype), reference), k
