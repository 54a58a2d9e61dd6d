"""``cachedet model-info``: parameters and training-step FLOPs per regime for a configured detector."""

from __future__ import annotations

import json
from typing import Optional

import typer

from cachedet_cli.common import (
    TAPS_HELP,
    backbone_indices,
    detector_options,
    parse_int_list,
    user_errors,
)
from cachedet_cli.common import console as make_console
from cachedet_cli.vocabulary import (
    DEFAULT_BACKBONE,
    DEFAULT_CANVAS,
    SIZE_HELP,
    Head,
    Neck,
    Recipe,
    examples,
)

EXAMPLES = examples(
    "cachedet model-info --backbone resnetrs101 --neck nasfpn --head cascade --size 1024 --masks",
    "cachedet model-info --backbone resnet50 --adapters --adapt-stages 4 --json",
)


@user_errors
def model_info_command(
    backbone: str = typer.Option(
        DEFAULT_BACKBONE,
        "--backbone",
        metavar="TIMM_NAME",
        help="timm model name (built with random weights: nothing is downloaded).",
    ),
    neck: Neck = typer.Option(
        "auto", "--neck", help="auto: simple for a plain ViT's taps, fpn otherwise."
    ),
    out_indices: Optional[str] = typer.Option(
        None,
        "--out-indices",
        metavar="I,J,K",
        help="timm feature indices (default: stride 8/16/32).",
    ),
    taps: Optional[str] = typer.Option(None, "--taps", metavar="I,J,K", help=TAPS_HELP),
    head: Head = typer.Option("faster-rcnn", "--head", help="Detection head."),
    size: int = typer.Option(
        DEFAULT_CANVAS, "--size", help=SIZE_HELP + " The paper's figures are at 1024."
    ),
    num_classes: int = typer.Option(91, "--num-classes", help="Object classes (COCO's ids: 91)."),
    neck_channels: int = typer.Option(
        256, "--neck-channels", help="Channels of every pyramid level."
    ),
    nasfpn_repeats: int = typer.Option(5, "--nasfpn-repeats", help="NAS-FPN cell stacks."),
    cascade_ious: Optional[str] = typer.Option(
        None,
        "--cascade-ious",
        metavar="A,B,C",
        help="Cascade stage IoU thresholds (default 0.5,0.6,0.7).",
    ),
    box_convs: Optional[int] = typer.Option(
        None, "--box-convs", help="Box head 3x3 convs (default: the recipe's; cascade 0)."
    ),
    box_fcs: Optional[int] = typer.Option(
        None, "--box-fcs", help="Box head FC layers (default: the recipe's; cascade 2)."
    ),
    recipe: Optional[Recipe] = typer.Option(
        None,
        "--recipe",
        help="Box head of a faster-rcnn head as train-heads' --recipe: short (2-FC; the default) or "
        "paper (the paper's 4conv1fc).",
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per counted training step."),
    adapters: bool = typer.Option(
        False, "--adapters", help="Also count residual adapters and their online training step."
    ),
    masks: bool = typer.Option(
        False,
        "--masks",
        help="Count the detector with Mask R-CNN's mask head (as the paper's models).",
    ),
    adapt_stages: Optional[str] = typer.Option(
        None,
        "--adapt-stages",
        metavar="I,J",
        help="Stages with adapters (default: all after the stem).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
):
    """Total and trainable parameters, and FLOPs of one training step: fine-tuned, frozen online, cached."""
    from rich.table import Table

    from cachedet.core.recipes import detector_options_for, get_recipe
    from cachedet.tools.model_info import ALL_STAGES, model_info

    stages = parse_int_list(adapt_stages, "--adapt-stages")
    chosen = get_recipe(recipe)  # as train-heads: the recipe fills in the box head not given
    options = detector_options_for(
        chosen, head, detector_options(nasfpn_repeats, cascade_ious, box_convs, box_fcs)
    )
    info = model_info(
        backbone,
        neck,
        head,
        size,
        num_classes,
        neck_channels,
        options,
        batch_size,
        adapt_stages=(stages or ALL_STAGES) if adapters else None,
        masks=masks,
        out_indices=backbone_indices(backbone, out_indices, taps),
    )
    info["recipe"] = chosen.name
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console = make_console()
    p = info["params"]
    levels = ", ".join(
        f"{s['name']} ({s['channels']} ch, stride {s['stride']})" for s in info["levels"]
    )
    console.print(
        f"{backbone} + {info['neck']} + {head} at {size}x{size}, {num_classes} classes; levels {levels}"
    )
    if head == "faster-rcnn":
        from cachedet.models.config import FasterRCNNConfig

        convs = options.get("box_convs", FasterRCNNConfig.box_convs)
        fcs = options.get("box_fcs", FasterRCNNConfig.box_fcs)
        console.print(
            f"box head: {convs} conv + {fcs} FC (--recipe {chosen.name}"
            + (", train-heads' default" if recipe is None else "")
            + ("; --recipe paper: the paper's 4conv1fc)" if chosen.name != "paper" else ")")
        )
    console.print(
        f"backbone: {p['backbone'] / 1e6:.1f} M   neck: {info['neck_params'] / 1e6:.1f} M   "
        f"head: {info['head_params'] / 1e6:.1f} M   total: {p['total'] / 1e6:.1f} M"
    )
    paper = info["paper"]["trained_params_m"]
    note = (
        f"  (paper's Table 3, ResNet-101 frozen: {paper} M, {100 * (p['detector'] / 1e6 / paper - 1):+.1f}%)"
        if paper
        else ""
    )
    console.print(f"trainable: {p['detector'] / 1e6:.1f} M{note}")
    if info["mask_head_params"]:
        console.print(
            f"mask head: {info['mask_head_params'] / 1e6:.2f} M "
            + ("(included)" if masks else "(not included; add --masks)")
        )
    t = Table(title=f"one training step, batch {batch_size} (FLOPs counted on fake tensors)")
    for c in ("regime", "trainable params", "GFLOPs", "vs fine-tuned"):
        t.add_column(c, justify="right" if c != "regime" else "left")
    if p["adapters"]:
        console.print(
            f"adapters (stages {','.join(map(str, p['adapt_stages']))}): {p['adapters'] / 1e6:.2f} M parameters "
            f"({100 * p['adapters'] / p['backbone']:.1f}% of the backbone)"
        )
    for regime in info["flops"]:
        ratio = info["flops"][regime] / info["flops"]["finetune"]
        t.add_row(
            regime,
            f"{p['trainable'][regime] / 1e6:.1f} M",
            f"{info['flops'][regime] / 1e9:.1f}",
            f"{ratio:.2f}",
        )
    console.print(t)
    if info["paper"]["frozen_flop_ratio"]:
        console.print(
            f"paper's Figure 1 (ResNet-101, 1024x1024): frozen / fine-tuned = "
            f"{info['paper']['frozen_flop_ratio']:.2f}"
        )
