"""model-info: FLOPs counted on fake tensors equal a real step's; the paper's figures only for its model."""

from __future__ import annotations

import pytest

from cachedet.tools.model_info import ALL_STAGES, model_info, paper_reference


def _both(head: str, stages):
    """Tiny ResNet at 64x64; 32 sampled RoIs per image and stage, so the sampling is full in both methods."""
    options = {} if head == "retinanet" else {"rois_per_image": 32}
    kw = dict(num_classes=3, neck_channels=16, options=options, batch=2, adapt_stages=stages)
    return (
        model_info("test_resnet", "fpn", head, 64, method="fake", **kw),
        model_info("test_resnet", "fpn", head, 64, method="real", **kw),
    )


@pytest.mark.parametrize(
    "head",
    [
        "retinanet",
        pytest.param("faster-rcnn", marks=pytest.mark.slow),
        pytest.param("cascade", marks=pytest.mark.slow),
    ],
)
def test_fake_tensor_flops_equal_a_real_step(head):
    fake, real = _both(
        head, (3, 4) if head == "retinanet" else ALL_STAGES
    )  # c3 gets no adapter gradient
    assert set(fake["flops"]) == {"finetune", "online_frozen", "cached", "adapters_online"}
    assert fake["flops"] == real["flops"] and fake["params"] == real["params"]
    assert 0 < fake["flops"]["cached"] < fake["flops"]["online_frozen"] < fake["flops"]["finetune"]


def test_paper_figures_only_for_the_papers_model():
    both = paper_reference("resnetrs101", "nasfpn", "cascade", 1024, 91)
    assert both["trained_params_m"] == 71.3 and both["frozen_flop_ratio"] == pytest.approx(
        2413 / 3960
    )
    assert paper_reference("resnet101.tv_in1k", "fpn", "faster-rcnn", 640, 91) == {
        "trained_params_m": 21.9,
        "frozen_flop_ratio": None,
    }  # Figure 1 is at 1024x1024
    for other in (
        ("efficientnet_lite0", "fpn", "faster-rcnn", 1024, 91),
        ("resnet101", "fpn", "faster-rcnn", 1024, 8),
        ("resnet101", "fpn", "retinanet", 1024, 91),
    ):
        assert paper_reference(*other) == {"trained_params_m": None, "frozen_flop_ratio": None}
    assert paper_reference(
        "resnet101", "nasfpn", "faster-rcnn", 1024, 91, options={"nasfpn_repeats": 7}
    ) == {
        "trained_params_m": None,
        "frozen_flop_ratio": None,
    }


@pytest.mark.slow
def test_cli_default_is_train_heads_default_box_head(cli):
    """Without options model-info counts the head train-heads trains by default (the short recipe's
    2-FC box head); --recipe paper counts the paper's 4conv1fc, which alone matches Table 3's model."""
    import json

    from cachedet.core.recipes import DEFAULT_RECIPE, RECIPES

    common = ("model-info", "--backbone", "test_resnet", "--size", 64, "--num-classes", 3, "--json")
    default, paper = (
        json.loads(cli(*common, *extra).output) for extra in ((), ("--recipe", "paper"))
    )
    want = {
        name: model_info(
            "test_resnet", "fpn", "faster-rcnn", 64, 3, options=RECIPES[name].detector_options
        )["head_params"]
        for name in ("short", "paper")
    }
    assert default["recipe"] == DEFAULT_RECIPE == "short" and paper["recipe"] == "paper"
    assert default["head_params"] == want["short"] != want["paper"] == paper["head_params"]
    assert (
        paper_reference(
            "resnet101", "fpn", "faster-rcnn", 640, 91, options=RECIPES["paper"].detector_options
        )["trained_params_m"]
        == 21.9
    )
    assert (
        paper_reference(
            "resnet101", "fpn", "faster-rcnn", 640, 91, options=RECIPES["short"].detector_options
        )["trained_params_m"]
        is None
    )
