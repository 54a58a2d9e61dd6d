"""Stage 2: train necks and heads from cached features (or online, or fine-tuning the backbone).

After the features, all three regimes run the same code: ``TrainModel`` -> ``Detector`` losses
-> SGD/AdamW with warm-up and step/cosine decay -> atomic checkpoint every epoch.
Run directory: config.json, metrics.jsonl (one JSON object per step and per validation),
checkpoints/last.pt (and best.pt with validation), tensorboard/, curves.png (``cachedet.runs.record``).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, replace

import torch

from cachedet.backbones.backbone import BackboneConfig, build_backbone, config_from_identity
from cachedet.cache.header import check_fingerprint
from cachedet.core.atomic import write_json_atomic
from cachedet.core.errors import CachedetError, Interrupted, WriteError
from cachedet.core.recipes import warmup_steps_for
from cachedet.core.runtime import resolve_device, retain_freed_memory
from cachedet.data.views import AugmentConfig
from cachedet.engine.config import TrainConfig, resolve_recipe
from cachedet.engine.distributed import DistInfo, all_ranks_ready, init_distributed, shutdown
from cachedet.engine.hooks import CheckpointHook, MetricsHook
from cachedet.engine.monitor import CurvesHook, TensorBoardHook
from cachedet.engine.resume import continue_schedule, resolved_settings, resume_changes
from cachedet.engine.sources import CacheSource, OnlineSource
from cachedet.engine.step import TrainModel
from cachedet.engine.trainer import LoopConfig, Trainer, TrainState
from cachedet.engine.validation import EvalHook, ValidationSet
from cachedet.models.detector import DetectorConfig, build_detector
from cachedet.models.necks import resolve_neck
from cachedet.runs.record import RunDir, RunRecord, load_run_checkpoint


def lr_factor(cfg: TrainConfig, total_steps: int):
    """Multiplier of the base learning rate at a step: linear warm-up (``optim.warmup_steps``, or
    min(1000, 5% of ``total_steps``)), then step or cosine decay."""
    warmup = (
        cfg.optim.warmup_steps
        if cfg.optim.warmup_steps is not None
        else warmup_steps_for(total_steps)
    )
    warmup = min(warmup, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.001 + (1 - 0.001) * step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 0.1 ** sum(step >= total_steps * m for m in (2 / 3, 8 / 9))

    return factor


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.learning_rate,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.optim.weight_decay)


def make_source(cfg: TrainConfig, info: DistInfo, device: torch.device):
    loader = cfg.loader.resolved(device)  # the one resolved feed config both sources read
    pin_memory = device.type == "cuda"
    if cfg.source.online:
        source = OnlineSource(
            cfg.source.annotations,
            cfg.source.images,
            BackboneConfig(cfg.source.backbone, cfg.source.out_indices, cfg.source.weights),
            AugmentConfig(
                size=cfg.source.size, scale_range=tuple(cfg.source.scale_range), seed=cfg.seed
            ),
            cfg.source.backbone_trainable,
            loader,
            info,
            cfg.seed,
            masks=cfg.detector.masks,
            pin_memory=pin_memory,
            projection=cfg.source.projection,
        )
    else:
        # under CUDA autocast the features travel as float16 (half the host-to-device bytes)
        source = CacheSource(
            cfg.source.cache,
            loader,
            info,
            cfg.seed,
            masks=cfg.detector.masks,
            keep_float16=cfg.optim.amp and device.type == "cuda",
            pin_memory=pin_memory,
        )
    if cfg.detector.masks and not source.masks:
        warnings.warn(
            f"detector.masks: {source.where} cannot train masks, {source.no_masks_reason}; masks are off, "
            "this run trains boxes only",
            stacklevel=2,
        )
    if cfg.source.adapters:
        source.enable_adapters(cfg.source.adapt_stages)
    elif source.hybrid_stage is not None:
        raise CachedetError(
            f"source.cache {cfg.source.cache}: a hybrid cache (it stops at stage {source.hybrid_stage}); "
            "train it with source.adapters"
        )
    return source


@dataclass
class TrainResult:
    run: str
    steps: int
    epochs: int
    first_loss: float | None
    last_loss: float | None
    seconds: float
    views_per_second: float
    # the last validation's per-class AP rows ({category_id, name, AP[, mask_AP]}), None without one
    val_per_class: list[dict] | None = None


def train(cfg: TrainConfig, progress: bool = True, origin: dict | None = None) -> TrainResult:
    """Run stage 2 (see module docstring); with ``cfg.resume`` continue from checkpoints/last.pt.

    With ``cfg.val`` the validation set is loaded before the first step and scored every
    ``val.every`` epochs (``cachedet.engine.validation``). ``origin``: where the settings came from
    (e.g. {"replayed_from": path, "overrides": {...}}), recorded in config.json and kept on resume.

    The run directory is locked for the whole run. Resuming compares ``cfg`` with the run's
    settings (``cachedet.engine.resume``): a changed schedule length, lr, weight decay or clipping
    applies from the next step and is recorded under ``resumes`` in config.json; other changes
    are refused, naming each. The recipe is resolved first (``resolve_recipe``: "auto" takes the
    store's); its notes are Python warnings. Raises CachedetError for the user's faults.
    """
    cfg, notes = resolve_recipe(cfg)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    cfg.validate()
    if not cfg.source.online:  # before zarr starts its threads, so they share the main heap
        retain_freed_memory()  # the feed's blocks reuse freed pages (its DataLoader workers too)
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if device.type == "cuda" and info.world > 1:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    run = RunDir(cfg.out)
    try:
        return _train_locked(cfg, run, device, info, progress, origin)
    except WriteError as e:  # disk full, read-only: what to run once there is space
        raise e.with_next_step(_how_to_continue(run, "free space, then ")) from None
    except Interrupted:
        raise
    except KeyboardInterrupt:  # Ctrl-C: one line with where the run stands
        raise Interrupted(f"interrupted; {_how_to_continue(run)}") from None
    finally:
        run.unlock()


def _fit_batch(cfg: TrainConfig, source) -> TrainConfig:
    """``cfg`` with ``loader.batch_size`` cut to the views an epoch has per rank (with a warning),
    so that an oversized batch never allocates for views that do not exist."""
    largest = source.largest_batch()
    if cfg.loader.batch_size <= largest:
        return cfg
    warnings.warn(
        f"loader.batch_size {cfg.loader.batch_size}: an epoch has {largest} views per rank, so "
        f"batches hold {largest}",
        stacklevel=3,
    )
    source.batch_size = largest
    return replace(cfg, loader=replace(cfg.loader, batch_size=largest))


def _position(ckpt: dict, epochs: int | None = None) -> str:
    """Where a checkpoint stands: ``after epoch 2 of 3, step 6``, or mid-epoch
    ``in epoch 3, after its step 2, step 8``."""
    of = f" of {epochs}" if epochs else ""
    if ckpt.get("epoch_step"):
        return (
            f"in epoch {ckpt['epoch'] + 1}{of}, after its step {ckpt['epoch_step']}, "
            f"step {ckpt['step']}"
        )
    return f"after epoch {ckpt['epoch']}{of}, step {ckpt['step']}"


def _how_to_continue(run: RunDir, first: str = "") -> str:
    """Where a stopped run stands and how to go on: resume from its checkpoint, or start again."""
    try:
        done = load_run_checkpoint(run.checkpoint) if os.path.isfile(run.checkpoint) else None
    except CachedetError:
        done = None
    if done is None:
        return f"no checkpoint in {run.path} yet; {first}run the same command again"
    return (
        f"{run.checkpoint} ({_position(done)}) is intact; {first}"
        f"continue with TrainConfig.out {run.path} TrainConfig.resume"
    )


def _train_locked(
    cfg: TrainConfig,
    run: RunDir,
    device: torch.device,
    info: DistInfo,
    progress: bool,
    origin: dict | None,
) -> TrainResult:
    with all_ranks_ready(info):  # a rank that cannot start stops every rank, with its message
        if info.is_main:
            run.lock()
        if not cfg.resume and os.path.exists(run.checkpoint):
            raise CachedetError(
                f"TrainConfig.out {cfg.out}: holds a run already (set TrainConfig.resume to continue it, "
                "or choose another TrainConfig.out)"
            )
        ckpt = load_run_checkpoint(run.checkpoint) if cfg.resume else None
        changes = resume_changes(ckpt["run"]["train"], cfg) if ckpt is not None else {}

        source = make_source(cfg, info, device)
        cfg = _fit_batch(cfg, source)
        det_cfg = DetectorConfig(
            num_classes=len(source.categories),
            canvas=source.canvas,
            in_specs=tuple(source.specs),
            neck=resolve_neck(cfg.detector.neck, source.specs),
            head=cfg.detector.head,
            neck_channels=cfg.detector.neck_channels,
            options=dict(cfg.detector.options),
            masks=source.masks,
        )
        if ckpt is not None:
            _check_resumable(cfg, run, ckpt, det_cfg, source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            detector = build_detector(det_cfg)
        model = TrainModel(detector, source.backbone, source.hybrid_stage).to(device)
        optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
        steps_per_epoch = source.steps(0)
        if cfg.loader.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.loader.max_steps_per_epoch)
        factor = lr_factor(cfg, steps_per_epoch * cfg.optim.epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        state = TrainState()
        if ckpt is not None:
            state = _restore(ckpt, model, optimizer, scheduler)
            continue_schedule(
                optimizer, scheduler, cfg.learning_rate, cfg.optim.weight_decay, factor, state.step
            )
        if info.is_main:  # a fresh start (step 0) after a kill before the first checkpoint too
            run.truncate_metrics(state.step)
        if ckpt is not None and info.is_main:
            print(f"resuming {run.path} {_position(ckpt, cfg.optim.epochs)}", flush=True)
        record = RunRecord(
            train=resolved_settings(cfg, source.canvas),  # what runs, not "default"
            detector=det_cfg.to_dict(),
            fingerprint=source.fingerprint,
            backbone=source.backbone_identity,
            augment=source.augment,
            categories=source.categories,
            adapters=list(model.backbone.adapter_stages) if model.backbone is not None else None,
            data=source.data,
        )
        hooks = []
        if info.is_main:
            validation = _validation(
                cfg, source, det_cfg, model, device
            )  # before any training: fail early
            history = run.resume_history(
                state.step, state.epoch, changes, ckpt is not None, state.epoch < cfg.optim.epochs
            )
            write_json_atomic(
                run.config,
                {**record.to_dict(), **run.origin(origin, ckpt is not None), "resumes": history},
                indent=2,
            )
            metrics = MetricsHook(
                run.metrics,
                steps_per_epoch * (cfg.optim.epochs - state.epoch),
                cfg.optim.epochs,
                progress,
            )
            checkpoint = CheckpointHook(run.checkpoint, record)
            hooks = [metrics]
            if validation is not None:
                hooks.append(
                    EvalHook(
                        *validation,
                        cfg.val.period,
                        cfg.val.best_metric,
                        run.best,
                        record,
                        metrics,
                        checkpoint,
                    )
                )
            hooks += [
                checkpoint,
                TensorBoardHook(run.tensorboard),
                CurvesHook(run.metrics, run.curves),
            ]
        loop = LoopConfig(
            epochs=cfg.optim.epochs,
            steps_per_epoch=steps_per_epoch,
            seed=cfg.seed,
            clip_grad=cfg.optim.clip_grad,
            amp=cfg.optim.amp,
            log_every=cfg.loader.resolved(device).log_every,
            checkpoint_every=cfg.optim.checkpoint_every,
        )
        trainer = Trainer(
            model,
            optimizer,
            scheduler,
            source,
            loop,
            device,
            info,
            hooks,
            state=state,
        )
    if info.world > 1:  # after the ranks agree: DDP's first broadcast is a collective
        trainer.forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    t_start = time.perf_counter()
    state = trainer.run()
    seconds = time.perf_counter() - t_start
    shutdown(info)
    return TrainResult(
        run=cfg.out,
        steps=state.step,
        epochs=cfg.optim.epochs,
        first_loss=state.first_loss,
        last_loss=state.last_loss,
        seconds=seconds,
        views_per_second=state.views / seconds if seconds else 0.0,
        val_per_class=next(
            (getattr(h, "per_class", None) for h in trainer.hooks if isinstance(h, EvalHook)), None
        ),
    )


def _validation(
    cfg: TrainConfig, source, det_cfg: DetectorConfig, model: TrainModel, device: torch.device
):
    """(ValidationSet, Predictor on the model in training) for ``cfg.val``, or None without validation.
    A cache run validated on images gets its own frozen backbone (the store's)."""
    if not cfg.val.enabled:
        return None
    from cachedet.evaluation.predictor import Predictor

    validation = ValidationSet(
        cfg.val, source.categories, det_cfg.masks, batch_size=cfg.loader.batch_size
    )
    backbone = model.backbone
    if backbone is None and cfg.val.images is not None:
        backbone = build_backbone(config_from_identity(source.backbone_identity), warn=False)
        if source.projection is not None:  # the store's map, as its features were made
            backbone.set_projection(source.projection)
        backbone = backbone.to(device).eval()
    adapters = list(model.backbone.adapter_stages) if model.backbone is not None else ()
    predictor = Predictor.from_model(
        det_cfg,
        model.detector,
        source.categories,
        source.fingerprint,
        backbone=backbone,
        adapters=adapters,
        device=device,
    )
    validation.check(predictor)
    return validation, predictor


def _check_resumable(
    cfg: TrainConfig, run: RunDir, ckpt: dict, det_cfg: DetectorConfig, source
) -> None:
    """Refuse to resume a run whose mask branch or features differ from what is given now."""
    saved = RunRecord.from_dict(ckpt["run"])
    trained_masks = bool(saved.detector.get("masks"))
    if trained_masks != det_cfg.masks:
        raise CachedetError(
            f"TrainConfig.resume: the run at {cfg.out} was trained {'with' if trained_masks else 'without'} "
            "a mask branch; resume it with the same detector.masks setting"
        )
    where = f"source.cache {cfg.source.cache}" if cfg.source.cache else "the online backbone"
    # the checkpoint's side first: "checkpoint has OLD, asked for NEW"
    check_fingerprint(
        saved.fingerprint,
        source.fingerprint,
        f"TrainConfig.resume: {where} does not fit this run (checkpoint {run.checkpoint})",
        found_label="checkpoint",
    )
    data_where = where if cfg.source.cache else f"source.annotations {cfg.source.annotations}"
    saved.check_same_data(source.data, data_where, cfg.out)


def _restore(ckpt: dict, model: TrainModel, optimizer, scheduler) -> TrainState:
    """Load a checkpoint's weights, optimiser and scheduler; the state to continue from."""
    weights = ckpt["state"]
    model.detector.load_state_dict(weights["detector"])
    if weights.get("backbone") is not None and model.backbone is not None:
        model.backbone.load_state_dict(weights["backbone"])
    optimizer.load_state_dict(weights["optimizer"])
    scheduler.load_state_dict(weights["scheduler"])
    # ckpt["epoch"]: epochs finished (counted from 1), so the loop's next index
    return TrainState(
        epoch=ckpt["epoch"],
        step=ckpt["step"],
        epoch_step=ckpt.get("epoch_step") or 0,
        rng=ckpt.get("rng"),
        extra={"best": ckpt.get("best")},
    )
