"""``cachedet train-heads``: stage 2, necks and heads from the cache (or online / fine-tuned)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cachedet.core.errors import CachedetError
from cachedet_cli.common import (
    RECIPE_HELP,
    backbone_indices,
    backbone_option,
    check_inputs,
    detector_options,
    out_indices_option,
    parse_int_list,
    pretrained_option,
    random_init_option,
    taps_option,
    user_errors,
    weight_source,
    weights_option,
)
from cachedet_cli.common import console as make_console
from cachedet_cli.vocabulary import (
    BATCH_HELP,
    DEFAULT_CANVAS,
    DEVICE_HELP,
    LOADER_WORKERS_HELP,
    QUIET_HELP,
    SEED_HELP,
    Head,
    Neck,
    Optimizer,
    Recipe,
    Schedule,
    examples,
)
from cachedet_cli.vocabulary import (
    TRAIN_FIELD_OF as FIELD_OF,
)

DATA, MODEL, OPTIM, ONLINE, ADAPTERS, VAL, RUN = (
    "Data",
    "Model",
    "Optimisation",
    "Online (no cache)",
    "Adapters",
    "Validation",
    "Run",
)
EXAMPLES = examples(
    "cachedet train-heads --cache coco-r101.zarr --out runs/nasfpn-cascade --neck nasfpn --head cascade "
    "--epochs 12 --batch-size 8",
    "cachedet train-heads --online --annotations train.json --images train/ --backbone resnet50 --pretrained "
    "--size 640 --out runs/online",
)


def given_fields(ctx: typer.Context) -> set[str]:
    """TrainConfig fields set by options typed on the command line (not left at their defaults)."""
    typed = {
        name
        for name in ctx.params  # by name: typer may bring its own copy of click's enum
        if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }
    return {FIELD_OF.get(name, name) for name in typed} - {None}


def typed_changes(saved, cfg, ctx: typer.Context) -> dict:
    """{flat setting: value} for the options typed now (detector options merged into the saved ones)."""
    given, now = given_fields(ctx) - {"out", "resume"}, cfg.flat()
    changes = {name: now[name] for name in given if name != "detector_options"}
    if "detector_options" in given:
        changes["detector_options"] = {**saved.detector.options, **cfg.detector.options}
    return changes


def resumed_config(cfg, ctx: typer.Context):
    """``--resume``: the run's own settings, overridden by the options typed now (then checked by train)."""
    from cachedet.engine.train import TrainConfig

    saved = TrainConfig.of_run(cfg.out)
    return saved.with_settings(**typed_changes(saved, cfg, ctx), out=cfg.out, resume=True)


def replayed_config(cfg, ctx: typer.Context, path: str):
    """``--config RUN/config.json``: (that run's settings with the typed options over them, the origin
    {"replayed_from", "overrides"} recorded in the new run's config.json)."""
    import json

    from cachedet.core.paths import resolve_path
    from cachedet.engine.train import TrainConfig

    path = resolve_path(path)
    saved = TrainConfig.of_file(path, "--config", out=cfg.out)
    changes = typed_changes(saved, cfg, ctx)
    replay = saved.with_settings(**changes, out=cfg.out, resume=False)
    return replay, {"replayed_from": path, "overrides": json.loads(json.dumps(changes))}


@user_errors
def train_heads_command(
    ctx: typer.Context,
    cache: Optional[str] = typer.Option(
        None,
        "--cache",
        metavar="STORE",
        rich_help_panel=DATA,
        help="Feature store written by cachedet extract (path or fsspec URL).",
    ),
    in_memory: bool = typer.Option(
        False, "--in-memory", help="Load the whole cache into RAM once.", rich_help_panel=DATA
    ),
    views_per_epoch: int = typer.Option(
        1,
        "--views-per-epoch",
        help="Cached views of each image used per epoch.",
        rich_help_panel=DATA,
    ),
    allow_incomplete: bool = typer.Option(
        False,
        "--allow-incomplete",
        rich_help_panel=DATA,
        help="Train on the finished shards of a store whose extraction has not finished (says so).",
    ),
    no_verify_reads: bool = typer.Option(
        False,
        "--no-verify-reads",
        rich_help_panel=DATA,
        help="Do not check each shard block read against its completion record (CRC-32C; on by default).",
    ),
    reader: str = typer.Option(
        "auto",
        "--reader",
        rich_help_panel=DATA,
        help=(
            "Codec pipeline of the cache reads: auto (zarrs when installed), zarrs (Rust, "
            "1.06-1.25x zarr's views per CPU second) or zarr (zarr-python's own); same arrays."
        ),
    ),
    feature_crop: bool = typer.Option(
        False,
        "--feature-crop",
        rich_help_panel=DATA,
        help=(
            "Random crops of the cached feature maps (aligned to the coarsest stride), boxes shifted and clipped."
        ),
    ),
    feature_crop_min: float = typer.Option(
        0.6,
        "--feature-crop-min",
        rich_help_panel=DATA,
        help="Smallest crop side as a share of the canvas.",
    ),
    neck: Neck = typer.Option(
        "auto",
        "--neck",
        rich_help_panel=MODEL,
        help=("simple is ViTDet's pyramid; auto: simple for a plain ViT's taps, fpn otherwise."),
    ),
    head: Head = typer.Option(
        "faster-rcnn", "--head", help="Detection head.", rich_help_panel=MODEL
    ),
    neck_channels: int = typer.Option(
        256, "--neck-channels", help="Channels of every pyramid level.", rich_help_panel=MODEL
    ),
    nasfpn_repeats: int = typer.Option(
        5,
        "--nasfpn-repeats",
        help="NAS-FPN cell stacks (paper library: 5; 7 also used).",
        rich_help_panel=MODEL,
    ),
    cascade_ious: Optional[str] = typer.Option(
        None,
        "--cascade-ious",
        metavar="A,B,C",
        rich_help_panel=MODEL,
        help="Cascade stage IoU thresholds (default 0.5,0.6,0.7).",
    ),
    box_convs: Optional[int] = typer.Option(
        None,
        "--box-convs",
        help="Box head 3x3 convs (faster-rcnn: the recipe's, short 0 / paper 4; cascade 0).",
        rich_help_panel=MODEL,
    ),
    box_fcs: Optional[int] = typer.Option(
        None,
        "--box-fcs",
        help="Box head FC layers (faster-rcnn: the recipe's, short 2 / paper 1; cascade 2).",
        rich_help_panel=MODEL,
    ),
    box_representation: Optional[int] = typer.Option(
        None,
        "--box-representation",
        rich_help_panel=MODEL,
        help="Width of the box head's FC layers (default 1024).",
    ),
    rois_per_image: Optional[int] = typer.Option(
        None,
        "--rois-per-image",
        rich_help_panel=MODEL,
        help="RoIs sampled per image for the box head's loss (default 512).",
    ),
    proposals_per_image: Optional[int] = typer.Option(
        None,
        "--proposals-per-image",
        rich_help_panel=MODEL,
        help="RPN proposals kept per image after NMS (default 1000).",
    ),
    masks: bool = typer.Option(
        False,
        "--masks",
        rich_help_panel=MODEL,
        help=(
            "Add Mask R-CNN's mask head (faster-rcnn, cascade) trained on the instance masks; boxes only, with a "
            "notice, when there are none."
        ),
    ),
    mask_convs: Optional[int] = typer.Option(
        None, "--mask-convs", help="Mask head 3x3 convs (default 4).", rich_help_panel=MODEL
    ),
    mask_channels: Optional[int] = typer.Option(
        None, "--mask-channels", help="Mask head width (default 256).", rich_help_panel=MODEL
    ),
    epochs: int = typer.Option(
        12,
        "--epochs",
        help="Passes over the images (each with --views-per-epoch views).",
        rich_help_panel=OPTIM,
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", help=BATCH_HELP + " With DDP: per process.", rich_help_panel=OPTIM
    ),
    optimizer: Optimizer = typer.Option(
        "sgd", "--optimizer", help="SGD with momentum 0.9, or AdamW.", rich_help_panel=OPTIM
    ),
    lr: Optional[float] = typer.Option(
        None, "--lr", help="Default: 0.02 x batch/16 (SGD), 1e-4 (AdamW).", rich_help_panel=OPTIM
    ),
    weight_decay: float = typer.Option(
        1e-4, "--weight-decay", help="Weight decay.", rich_help_panel=OPTIM
    ),
    warmup_steps: Optional[int] = typer.Option(
        None,
        "--warmup-steps",
        show_default=False,
        rich_help_panel=OPTIM,
        help="Linear learning-rate warm-up steps (default: min(1000, 5% of the run)).",
    ),
    recipe: Optional[Recipe] = typer.Option(
        None, "--recipe", rich_help_panel=OPTIM, help=RECIPE_HELP + " Default: the cache's."
    ),
    schedule: Schedule = typer.Option(
        "step",
        "--schedule",
        rich_help_panel=OPTIM,
        help="step: x0.1 at 2/3 and 8/9 of the steps; cosine: cosine decay to 0.",
    ),
    clip_grad: float = typer.Option(
        10.0, "--clip-grad", help="Max gradient norm (0: off).", rich_help_panel=OPTIM
    ),
    seed: int = typer.Option(0, "--seed", help=SEED_HELP, rich_help_panel=OPTIM),
    online: bool = typer.Option(
        False,
        "--online",
        rich_help_panel=ONLINE,
        help="Run the frozen backbone every step on fresh views instead of reading a cache.",
    ),
    annotations: Optional[Path] = typer.Option(
        None,
        "--annotations",
        metavar="JSON",
        rich_help_panel=ONLINE,
        help="COCO/LVIS annotation file.",
    ),
    images: Optional[Path] = typer.Option(
        None, "--images", metavar="DIR", help="Image folder.", rich_help_panel=ONLINE
    ),
    backbone: str = backbone_option(ONLINE),
    weights: Optional[Path] = weights_option(ONLINE),
    pretrained: bool = pretrained_option(ONLINE),
    random_init: bool = random_init_option(ONLINE),
    out_indices: Optional[str] = out_indices_option(ONLINE),
    taps: Optional[str] = taps_option(ONLINE),
    size: Optional[int] = typer.Option(
        None,
        "--size",
        show_default=False,
        rich_help_panel=ONLINE,
        help=(
            f"Side of the square canvas in pixels (default {DEFAULT_CANVAS}, as extract). A cache run uses the "
            "canvas its store was made with; --resume, the run's."
        ),
    ),
    scale_range: Optional[tuple[float, float]] = typer.Option(
        None,
        "--scale-range",
        metavar="MIN MAX",
        rich_help_panel=ONLINE,
        help="Large-Scale-Jittering range (default: the recipe's).",
    ),
    projection: Optional[str] = typer.Option(
        None,
        "--projection",
        metavar="STORE",
        rich_help_panel=ONLINE,
        help=(
            "With --online: apply this projected store's map (extract --project) to the backbone's "
            "levels, so the heads see the features a run on that store sees."
        ),
    ),
    backbone_trainable: bool = typer.Option(
        False,
        "--backbone-trainable",
        rich_help_panel=ONLINE,
        help="Fine-tune the backbone (BatchNorm stays frozen).",
    ),
    adapters: bool = typer.Option(
        False,
        "--adapters",
        rich_help_panel=ADAPTERS,
        help=(
            "Zero-initialised adapters inside the frozen backbone: residual 1x1 convs (CNN), AdaptFormer MLPs (ViT); "
            "online, or from a --cache-stage cache."
        ),
    ),
    adapt_stages: Optional[str] = typer.Option(
        None,
        "--adapt-stages",
        metavar="I,J",
        rich_help_panel=ADAPTERS,
        help=(
            "Backbone stages that get adapters, e.g. 3,4; a ViT's stages are its blocks (default: every stage after "
            "the stem or the cache; every ViT block)."
        ),
    ),
    val_annotations: Optional[Path] = typer.Option(
        None,
        "--val-annotations",
        metavar="JSON",
        rich_help_panel=VAL,
        help="Validation COCO/LVIS file, scored during training.",
    ),
    val_images: Optional[Path] = typer.Option(
        None,
        "--val-images",
        metavar="DIR",
        rich_help_panel=VAL,
        help="Validation image folder (backbone + heads, as cachedet eval).",
    ),
    val_cache: Optional[str] = typer.Option(
        None,
        "--val-cache",
        metavar="STORE",
        rich_help_panel=VAL,
        help="Or: a --no-augment --views 1 store of the validation set.",
    ),
    eval_every: Optional[int] = typer.Option(
        None,
        "--eval-every",
        metavar="N",
        rich_help_panel=VAL,
        help=("Validate every N epochs and after the last (default 1 when validation is given)."),
    ),
    best_metric: str = typer.Option(
        "bbox.AP",
        "--best-metric",
        metavar="PART.STAT",
        rich_help_panel=VAL,
        help=("Metric that chooses checkpoints/best.pt: bbox.AP, bbox.AP50, segm.AP..."),
    ),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        metavar="RUN/config.json",
        rich_help_panel=RUN,
        help=(
            "Replay the run this config.json describes; options typed with it override its settings (recorded "
            "in the new run's config.json)."
        ),
    ),
    out: str = typer.Option(
        ...,
        "--out",
        metavar="RUN",
        help="Run directory (config, checkpoints, metrics.jsonl).",
        rich_help_panel=RUN,
    ),
    device: str = typer.Option(
        "auto", "--device", metavar="DEVICE", help=DEVICE_HELP, rich_help_panel=RUN
    ),
    loader_workers: int | None = typer.Option(
        None,
        "--loader-workers",
        help=LOADER_WORKERS_HELP + " Default: min(8, cores - 1) on CUDA, 0 otherwise.",
        rich_help_panel=RUN,
    ),
    no_amp: bool = typer.Option(
        False, "--no-amp", help="No bfloat16 autocast on CUDA.", rich_help_panel=RUN
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        rich_help_panel=RUN,
        help=(
            "Continue the run at --out from its last checkpoint, with its own settings; options typed with it "
            "override them. Only --epochs (the lr curve then follows the new length), --lr, --weight-decay, "
            "--clip-grad, --device, --loader-workers and --no-amp may differ from the run's; other differences "
            "are refused."
        ),
    ),
    checkpoint_every: Optional[int] = typer.Option(
        None,
        "--checkpoint-every",
        metavar="N",
        rich_help_panel=RUN,
        help="Also write checkpoints/last.pt every N steps inside an epoch (--resume goes on from that step).",
    ),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP, rich_help_panel=RUN),
):
    """Train necks and heads from cached features (stage 2); --online / --backbone-trainable for the baselines."""
    if size is not None and cache and not online:
        raise CachedetError(
            f"--size {size}: a cache run uses the canvas its store was made with; --size is for --online"
        )
    check_inputs(
        (cache, "--cache", "store"),
        (projection, "--projection", "store"),
        (annotations, "--annotations", "file"),
        (images, "--images", "folder"),
        (weights, "--weights", "file"),
        (val_annotations, "--val-annotations", "file"),
        (val_images, "--val-images", "folder"),
        (val_cache, "--val-cache", "store"),
        (config, "--config", "file"),
    )
    from cachedet.api import train_heads
    from cachedet.engine.config import AUTO_RECIPE, TrainConfig

    weights_from = weight_source(weights, pretrained, random_init)
    cfg = TrainConfig.of(
        recipe=recipe or AUTO_RECIPE,  # auto: the store's (resolved by train, as from Python)
        out=out,
        cache=cache,
        online=online,
        annotations=str(annotations) if annotations else None,
        images=str(images) if images else None,
        backbone=backbone,
        weights=weights_from,
        out_indices=backbone_indices(backbone, out_indices, taps),
        size=DEFAULT_CANVAS if size is None else size,
        scale_range=scale_range and tuple(scale_range),
        backbone_trainable=backbone_trainable,
        projection=projection,
        neck=neck,
        head=head,
        neck_channels=neck_channels,
        detector_options=detector_options(
            nasfpn_repeats,
            cascade_ious,
            box_convs,
            box_fcs,
            mask_convs,
            mask_channels,
            box_representation,
            rois_per_image,
            proposals_per_image,
        ),
        masks=masks,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        schedule=schedule,
        clip_grad=clip_grad or None,
        checkpoint_every=checkpoint_every,
        amp=not no_amp,
        workers=loader_workers,
        in_memory=in_memory,
        allow_incomplete=allow_incomplete,
        verify_reads=not no_verify_reads,
        reader=reader,
        views_per_epoch=views_per_epoch,
        feature_crop=feature_crop,
        feature_crop_min=feature_crop_min,
        adapters=adapters,
        adapt_stages=parse_int_list(adapt_stages, "--adapt-stages"),
        seed=seed,
        device=device,
        resume=resume,
        val_annotations=str(val_annotations) if val_annotations else None,
        val_images=str(val_images) if val_images else None,
        val_cache=val_cache,
        eval_every=eval_every,
        best_metric=best_metric,
    )
    origin = None
    if config is not None and resume:
        raise CachedetError(
            "--config and --resume exclude each other: --resume alone continues the run at --out"
        )
    if config is not None:
        cfg, origin = replayed_config(cfg, ctx, str(config))
    elif resume:
        cfg = resumed_config(cfg, ctx)
    result = train_heads(cfg, progress=not quiet, origin=origin)
    make_console().print(
        f"{result.run}: {result.steps} steps, {result.epochs} epochs, loss {result.first_loss:.3f} -> "
        f"{result.last_loss:.3f}, {result.views_per_second:.1f} views/s, {result.seconds:.1f} s"
        if result.first_loss is not None
        else f"{result.run}: nothing left to train ({result.steps} steps done)"
    )
    if result.val_per_class:
        from cachedet_cli.eval_predict import per_class_table

        masks = any("mask_AP" in row for row in result.val_per_class)
        title = "per-class AP of the last validation (metrics.jsonl has every pass's summary)"
        make_console().print(per_class_table(result.val_per_class, masks, title))
