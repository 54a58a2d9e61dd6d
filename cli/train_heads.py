"""``cachedet train-heads``: stage 2, necks and heads from the cache (or online / fine-tuned)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cachedet.backbones import DEFAULT_BACKBONE
from cachedet.errors import CachedetError
from cachedet_cli.common import RECIPE_HELP, TAPS_HELP, backbone_indices, console as make_console, detector_options, parse_int_list, user_errors


DETECTOR_FLAGS = ("nasfpn_repeats", "cascade_ious", "box_convs", "box_fcs", "mask_convs", "mask_channels")
FIELD_OF = {"pretrained": "weights", "random_init": "weights", "taps": "out_indices", "no_amp": "amp", "quiet": None,
            **{name: "detector_options" for name in DETECTOR_FLAGS}}  # option -> TrainConfig field (None: no field)


def given_fields(ctx: typer.Context) -> set[str]:
    """TrainConfig fields set by options typed on the command line (not left at their defaults)."""
    typed = {name for name in ctx.params  # by name: typer may bring its own copy of click's enum
             if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}
    return {FIELD_OF.get(name, name) for name in typed} - {None}


def resumed_config(cfg, ctx: typer.Context):
    """``--resume``: the run's own settings, overridden by the options typed now (then checked by train)."""
    from dataclasses import replace

    from cachedet.engine.train import TrainConfig

    saved = TrainConfig.of_run(cfg.out)
    given = given_fields(ctx) - {"out", "resume"}
    changes = {name: getattr(cfg, name) for name in given if name != "detector_options"}
    if "detector_options" in given:
        changes["detector_options"] = {**saved.detector_options, **cfg.detector_options}
    return replace(saved, **changes, out=cfg.out, resume=True)


@user_errors
def train_heads_command(
    ctx: typer.Context,
    out: str = typer.Option(..., "--out", help="Run directory (config, checkpoints, metrics.jsonl)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Feature store written by cachedet extract."),
    online: bool = typer.Option(False, "--online", help="Run the frozen backbone every step instead of reading a cache."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="With --online: COCO/LVIS annotation JSON."),
    images: Optional[Path] = typer.Option(None, "--images", help="With --online: image folder."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", help="With --online: timm model name."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="With --online: backbone checkpoint."),
    pretrained: bool = typer.Option(False, "--pretrained", help="With --online: timm's pretrained weights."),
    random_init: bool = typer.Option(False, "--random-init", help="With --online: random backbone weights."),
    out_indices: Optional[str] = typer.Option(None, "--out-indices"),
    taps: Optional[str] = typer.Option(None, "--taps", help="With --online: " + TAPS_HELP),
    size: int = typer.Option(640, "--size", help="With --online: canvas size."),
    scale_range: Optional[tuple[float, float]] = typer.Option(None, "--scale-range", help="With --online: LSJ range (default: the recipe's)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help=RECIPE_HELP + " Default: the cache's."),
    backbone_trainable: bool = typer.Option(False, "--backbone-trainable", help="Fine-tune the backbone (BatchNorm stays frozen)."),
    neck: str = typer.Option("auto", "--neck", help="fpn, nasfpn or simple (ViTDet's pyramid); auto: simple for a plain ViT's taps, fpn otherwise."),
    head: str = typer.Option("faster-rcnn", "--head", help="faster-rcnn, cascade or retinanet."),
    neck_channels: int = typer.Option(256, "--neck-channels"),
    nasfpn_repeats: int = typer.Option(5, "--nasfpn-repeats", help="NAS-FPN cell stacks (paper library: 5; 7 also used)."),
    cascade_ious: Optional[str] = typer.Option(None, "--cascade-ious", help="Cascade stage IoU thresholds (default 0.5,0.6,0.7)."),
    box_convs: Optional[int] = typer.Option(None, "--box-convs", help="Box head 3x3 convs (faster-rcnn 4, cascade 0)."),
    box_fcs: Optional[int] = typer.Option(None, "--box-fcs", help="Box head FC layers (faster-rcnn 1, cascade 2)."),
    masks: bool = typer.Option(False, "--masks", help="Add Mask R-CNN's mask head (faster-rcnn, cascade) trained on the instance masks; boxes only, with a notice, when there are none."),
    mask_convs: Optional[int] = typer.Option(None, "--mask-convs", help="Mask head 3x3 convs (default 4)."),
    mask_channels: Optional[int] = typer.Option(None, "--mask-channels", help="Mask head width (default 256)."),
    epochs: int = typer.Option(12, "--epochs"),
    batch_size: int = typer.Option(8, "--batch-size"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adamw."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default: 0.02 x batch/16 (SGD), 1e-4 (AdamW)."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Default: min(1000, 5% of the run)."),
    schedule: str = typer.Option("step", "--schedule", help="step or cosine."),
    clip_grad: float = typer.Option(10.0, "--clip-grad", help="Max gradient norm (0: off)."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    in_memory: bool = typer.Option(False, "--in-memory", help="Load the whole cache into RAM once."),
    views_per_epoch: int = typer.Option(1, "--views-per-epoch", help="Cached views of each image used per epoch."),
    adapters: bool = typer.Option(False, "--adapters", help="Zero-initialised adapters inside the frozen backbone: residual 1x1 convs (CNN), AdaptFormer MLPs (ViT); online, or from a --cache-stage cache."),
    adapt_stages: Optional[str] = typer.Option(None, "--adapt-stages", help="Backbone stages that get adapters, e.g. 3,4; a ViT's stages are its blocks (default: every stage after the stem or the cache; every ViT block)."),
    feature_crop: bool = typer.Option(False, "--feature-crop", help="Random crops of the cached feature maps (aligned to the coarsest stride), boxes shifted and clipped."),
    feature_crop_min: float = typer.Option(0.6, "--feature-crop-min", help="Smallest crop side as a share of the canvas."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    no_amp: bool = typer.Option(False, "--no-amp", help="No bfloat16 autocast on CUDA."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run at --out from its last checkpoint, with its "
                                "own settings; options typed with it override them. Only --epochs (the lr curve then "
                                "follows the new length), --lr, --weight-decay, --clip-grad, --device, --workers and "
                                "--no-amp may differ from the run's; other differences are refused."),
    quiet: bool = typer.Option(False, "--quiet"),
):
    """Train necks and heads from cached features (stage 2); --online / --backbone-trainable for the baselines."""
    from cachedet.engine.train import TrainConfig, train
    from cachedet.recipes import schedule_advice, store_header, train_recipe

    if sum([weights is not None, pretrained, random_init]) > 1:
        raise CachedetError("--weights, --pretrained and --random-init exclude each other")
    header = None if resume else store_header(cache)
    recipe, note = train_recipe(recipe, header)
    cfg = TrainConfig(recipe=recipe,
        out=out, cache=cache, online=online, annotations=str(annotations) if annotations else None,
        images=str(images) if images else None, backbone=backbone,
        weights=str(weights) if weights else "timm" if pretrained else "random" if random_init else "default",
        out_indices=backbone_indices(backbone, out_indices, taps), size=size, scale_range=scale_range and tuple(scale_range),
        backbone_trainable=backbone_trainable, neck=neck, head=head, neck_channels=neck_channels,
        detector_options=detector_options(nasfpn_repeats, cascade_ious, box_convs, box_fcs, mask_convs, mask_channels),
        masks=masks, epochs=epochs,
        batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
        schedule=schedule, clip_grad=clip_grad or None, amp=not no_amp, workers=workers, in_memory=in_memory,
        views_per_epoch=views_per_epoch, feature_crop=feature_crop, feature_crop_min=feature_crop_min,
        adapters=adapters, adapt_stages=parse_int_list(adapt_stages, "--adapt-stages"), seed=seed, device=device, resume=resume,
    )
    if resume:
        cfg = resumed_config(cfg, ctx)
    jitter = header["augment"]["scale_range"] if header and header["augment"]["augment"] else cfg.scale_range if online else None
    for line in (note, jitter and schedule_advice(tuple(jitter), epochs=cfg.epochs)):
        if line:
            make_console().print(line, style="yellow")
    result = train(cfg, progress=not quiet)
    make_console().print(
        f"{result.run}: {result.steps} steps, {result.epochs} epochs, loss {result.first_loss:.3f} -> "
        f"{result.last_loss:.3f}, {result.views_per_second:.1f} views/s, {result.seconds:.1f} s"
        if result.first_loss is not None else f"{result.run}: nothing left to train ({result.steps} steps done)"
    )
