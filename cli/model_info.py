"""``cachedet model-info``: parameters and training-step FLOPs per regime for a configured detector."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from cachedet.backbones import DEFAULT_BACKBONE
from cachedet_cli.common import TAPS_HELP, backbone_indices, console as make_console, detector_options, parse_int_list, user_errors


@user_errors
def model_info_command(
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", help="timm model name (random init for counting)."),
    neck: str = typer.Option("auto", "--neck", help="fpn, nasfpn or simple; auto: simple for a plain ViT's taps, fpn otherwise."),
    out_indices: Optional[str] = typer.Option(None, "--out-indices", help="timm feature indices (default: stride 8/16/32)."),
    taps: Optional[str] = typer.Option(None, "--taps", help=TAPS_HELP),
    head: str = typer.Option("faster-rcnn", "--head", help="faster-rcnn, cascade or retinanet."),
    size: int = typer.Option(1024, "--size"),
    num_classes: int = typer.Option(91, "--num-classes"),
    neck_channels: int = typer.Option(256, "--neck-channels"),
    nasfpn_repeats: int = typer.Option(5, "--nasfpn-repeats"),
    cascade_ious: Optional[str] = typer.Option(None, "--cascade-ious", help="e.g. 0.5,0.6,0.7"),
    box_convs: Optional[int] = typer.Option(None, "--box-convs"),
    box_fcs: Optional[int] = typer.Option(None, "--box-fcs"),
    batch: int = typer.Option(1, "--batch", help="Images per counted training step."),
    adapters: bool = typer.Option(False, "--adapters", help="Also count residual adapters and their online training step."),
    masks: bool = typer.Option(False, "--masks", help="Count the detector with Mask R-CNN's mask head (as the paper's models)."),
    adapt_stages: Optional[str] = typer.Option(None, "--adapt-stages", help="Stages with adapters (default: all after the stem)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Total and trainable parameters, and FLOPs of one training step: fine-tuned, frozen online, cached."""
    from cachedet.model_info import model_info

    stages = parse_int_list(adapt_stages, "--adapt-stages")
    indices = backbone_indices(backbone, out_indices, taps)
    if adapters and stages is None:
        from cachedet.backbones import BackboneConfig, build_backbone

        bb = build_backbone(BackboneConfig(backbone, indices, "random"), warn=False)
        stages = tuple(range(bb.first_adaptable_stage, len(bb.stage_names())))
    info = model_info(backbone, neck, head, size, num_classes, neck_channels,
                      detector_options(nasfpn_repeats, cascade_ious, box_convs, box_fcs), batch,
                      adapt_stages=stages if adapters else None, masks=masks, out_indices=indices)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    console = make_console()
    p = info["params"]
    levels = ", ".join(f"{s['name']} ({s['channels']} ch, stride {s['stride']})" for s in info["levels"])
    console.print(f"{backbone} + {info['neck']} + {head} at {size}x{size}, {num_classes} classes; levels {levels}")
    console.print(f"backbone: {p['backbone'] / 1e6:.1f} M   neck: {info['neck_params'] / 1e6:.1f} M   "
                  f"head: {info['head_params'] / 1e6:.1f} M   total: {p['total'] / 1e6:.1f} M")
    paper = info["paper"]["trained_params_m"]
    note = f"  (paper, ResNet-101 frozen: {paper} M, {100 * (p['detector'] / 1e6 / paper - 1):+.1f}%)" if paper else ""
    console.print(f"trainable: {p['detector'] / 1e6:.1f} M{note}")
    if info["mask_head_params"]:
        console.print(f"mask head: {info['mask_head_params'] / 1e6:.2f} M " + ("(included)" if masks else "(not included; add --masks)"))
    t = Table(title=f"one training step, batch {batch}")
    for c in ("regime", "trainable params", "GFLOPs", "vs fine-tuned"):
        t.add_column(c, justify="right" if c != "regime" else "left")
    if p["adapters"]:
        console.print(f"adapters (stages {','.join(map(str, p['adapt_stages']))}): {p['adapters'] / 1e6:.2f} M parameters "
                      f"({100 * p['adapters'] / p['backbone']:.1f}% of the backbone)")
    for regime in info["flops"]:
        ratio = info["flops"][regime] / info["flops"]["finetune"]
        t.add_row(regime, f"{p['trainable'][regime] / 1e6:.1f} M", f"{info['flops'][regime] / 1e9:.1f}", f"{ratio:.2f}")
    console.print(t)
    if info["paper"]["frozen_flop_ratio"]:
        console.print(f"paper (Figure 1, ResNet-101): frozen / fine-tuned = {info['paper']['frozen_flop_ratio']:.2f}")
