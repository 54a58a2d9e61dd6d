"""Stage 2: train necks and heads from cached features (or online, or fine-tuning the backbone).

After the features, all three regimes run the same code: ``TrainModel`` -> ``Detector`` losses
-> SGD/AdamW with warm-up and step/cosine decay -> atomic checkpoint every epoch.
Run directory: config.json, metrics.jsonl (one JSON object per step), checkpoints/last.pt.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch

from cachedet.atomic import write_json_atomic
from cachedet.backbones import DEFAULT_BACKBONE, BackboneConfig
from cachedet.data.views import AugmentConfig
from cachedet.engine.distributed import DistInfo, init_distributed, shutdown
from cachedet.engine.hooks import CheckpointHook, MetricsHook
from cachedet.engine.resume import continue_schedule, resume_changes
from cachedet.engine.run import RunDir, RunRecord, load_run_checkpoint
from cachedet.engine.sources import CacheSource, OnlineSource
from cachedet.engine.step import TrainModel
from cachedet.engine.trainer import LoopConfig, Trainer, TrainState
from cachedet.errors import CachedetError
from cachedet.paths import resolve_path
from cachedet.extract import resolve_device
from cachedet.models.detector import MASKS_NEED_ROIS, DetectorConfig, build_detector
from cachedet.models.necks import resolve_neck


@dataclass(frozen=True)
class TrainConfig:
    out: str
    cache: str | None = None
    # online / fine-tuning regimes
    online: bool = False
    annotations: str | None = None
    images: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"
    out_indices: tuple[int, ...] | None = None
    size: int = 640
    scale_range: tuple[float, float] = (0.1, 2.0)
    backbone_trainable: bool = False
    # residual adapters in the frozen backbone (online, or after a hybrid cache's stage)
    adapters: bool = False
    adapt_stages: tuple[int, ...] | None = None  # None: every stage after the stem (or after the cache)
    # detector
    neck: str = "auto"  # auto: the simple pyramid for a plain ViT's taps, FPN otherwise
    head: str = "faster-rcnn"
    neck_channels: int = 256
    detector_options: dict = field(default_factory=dict)
    masks: bool = False  # Mask R-CNN mask branch, trained on the instance masks (cache or annotations)
    # optimisation
    epochs: int = 12
    batch_size: int = 8
    optimizer: str = "sgd"
    lr: float | None = None  # default: 0.02 x batch/16 for SGD, 1e-4 for AdamW
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "step"  # step: x0.1 at 2/3 and 8/9 of training; cosine: to 0
    clip_grad: float | None = 10.0
    amp: bool = True  # bfloat16 autocast, CUDA only
    # data
    workers: int = 0
    loader_start: str | None = None  # DataLoader start method (None: platform default, or "spawn")
    in_memory: bool = False
    views_per_epoch: int = 1
    feature_crop: bool = False  # random crops of the cached maps (cachedet.cache.feature_crop)
    feature_crop_min: float = 0.6  # smallest crop side, as a share of the canvas
    shuffle_buffer: int = 256
    max_steps_per_epoch: int | None = None
    seed: int = 0
    device: str = "auto"
    resume: bool = False

    def __post_init__(self):  # paths resolved once (cachedet.paths), so config.json records where things are
        for name in ("out", "cache", "annotations", "images"):
            object.__setattr__(self, name, resolve_path(getattr(self, name)))
        if self.weights not in ("default", "random", "timm"):
            object.__setattr__(self, "weights", resolve_path(self.weights))

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.02 * self.batch_size / 16 if self.optimizer == "sgd" else 1e-4

    def validate(self):
        if self.online == (self.cache is not None):
            raise CachedetError("give either --cache STORE or --online (with --annotations, --images, --backbone)")
        if self.online and (not self.annotations or not self.images):
            raise CachedetError("--online needs --annotations and --images")
        if self.backbone_trainable and not self.online:
            raise CachedetError("--backbone-trainable fine-tunes the backbone, so it needs --online")
        if self.optimizer not in ("sgd", "adamw"):
            raise CachedetError(f"--optimizer {self.optimizer}: expected sgd or adamw")
        if self.schedule not in ("step", "cosine"):
            raise CachedetError(f"--schedule {self.schedule}: expected step or cosine")
        for name, v in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--views-per-epoch", self.views_per_epoch)):
            if v < 1:
                raise CachedetError(f"{name}: expected a positive integer, got {v}")
        if self.learning_rate <= 0:
            raise CachedetError(f"--lr: expected a positive number, got {self.learning_rate}")
        if self.adapters and self.backbone_trainable:
            raise CachedetError("--adapters trains adapters inside a frozen backbone; drop --backbone-trainable")
        if self.adapt_stages is not None and not self.adapters:
            raise CachedetError("--adapt-stages needs --adapters")
        if self.feature_crop and self.online:
            raise CachedetError("--feature-crop crops cached features; online training draws fresh LSJ views instead")
        if self.masks and self.head == "retinanet":
            raise CachedetError(MASKS_NEED_ROIS)
        if not 0 < self.feature_crop_min <= 1:
            raise CachedetError(f"--feature-crop-min: expected a fraction in (0, 1], got {self.feature_crop_min}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The inverse of ``to_dict`` (as read back from config.json: lists become tuples again)."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("out_indices", "scale_range", "adapt_stages"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def of_run(cls, out: str) -> "TrainConfig":
        """The settings a run at ``out`` was last trained with (its config.json), for ``--resume``."""
        path = os.path.join(resolve_path(out), "config.json")
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f)["train"])
        except FileNotFoundError:
            raise CachedetError(f"--out {out}: no run to resume here (no config.json)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CachedetError(f"{path}: unreadable run configuration ({type(e).__name__})") from None


def lr_factor(cfg: TrainConfig, total_steps: int):
    """Multiplier of the base learning rate at a step: linear warm-up, then step or cosine decay."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.001 + (1 - 0.001) * step / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 0.1 ** sum(step >= total_steps * m for m in (2 / 3, 8 / 9))

    return factor


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_source(cfg: TrainConfig, info: DistInfo, device: torch.device):
    if cfg.online:
        source = OnlineSource(
            cfg.annotations, cfg.images, BackboneConfig(cfg.backbone, cfg.out_indices, cfg.weights),
            AugmentConfig(size=cfg.size, scale_range=tuple(cfg.scale_range), seed=cfg.seed),
            cfg.backbone_trainable, cfg.batch_size, cfg.workers, cfg.seed, info, masks=cfg.masks,
        )
    else:
        # under CUDA autocast the features travel as float16 (half the host-to-device bytes)
        source = CacheSource(cfg.cache, cfg.batch_size, cfg.workers, cfg.in_memory, cfg.views_per_epoch, cfg.seed,
                             cfg.shuffle_buffer, info, cfg.loader_start, keep_float16=cfg.amp and device.type == "cuda",
                             feature_crop_min=cfg.feature_crop_min if cfg.feature_crop else None, masks=cfg.masks)
    if cfg.masks and not source.masks:
        warnings.warn(f"--masks: {source.where} cannot train masks, {source.no_masks_reason}; masks are off, "
                      "this run trains boxes only", stacklevel=2)
    if cfg.adapters:
        source.enable_adapters(cfg.adapt_stages)
    elif source.hybrid_stage is not None:
        raise CachedetError(f"--cache {cfg.cache}: a hybrid cache (it stops at stage {source.hybrid_stage}); "
                            "train it with --adapters")
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


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Run stage 2 (see module docstring); with ``cfg.resume`` continue from checkpoints/last.pt.

    The run directory is locked for the whole run. Resuming compares ``cfg`` with the run's
    settings (``cachedet.engine.resume``): a changed schedule length, lr, weight decay or clipping
    applies from the next step and is recorded under ``resumes`` in config.json; other changes
    are refused, naming each. Raises CachedetError for the user's faults.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if device.type == "cuda" and info.world > 1:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    run = RunDir(cfg.out)
    if info.is_main:
        run.lock()
    try:
        return _train_locked(cfg, run, device, info, progress)
    finally:
        run.unlock()


def _train_locked(cfg: TrainConfig, run: RunDir, device: torch.device, info: DistInfo, progress: bool) -> TrainResult:
    if not cfg.resume and os.path.exists(run.checkpoint):
        raise CachedetError(f"--out {cfg.out}: holds a run already (pass --resume to continue it, or choose another --out)")
    ckpt = load_run_checkpoint(run.checkpoint) if cfg.resume else None
    changes = resume_changes(ckpt["run"]["train"], cfg) if ckpt is not None else {}

    source = make_source(cfg, info, device)
    det_cfg = DetectorConfig(
        num_classes=len(source.categories), canvas=source.canvas, in_specs=tuple(source.specs),
        neck=resolve_neck(cfg.neck, source.specs), head=cfg.head, neck_channels=cfg.neck_channels,
        options=dict(cfg.detector_options), masks=source.masks,
    )
    if ckpt is not None:
        _check_resumable(cfg, run, ckpt, det_cfg, source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        detector = build_detector(det_cfg)
    model = TrainModel(detector, source.backbone, source.hybrid_stage).to(device)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    steps_per_epoch = source.steps(0)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    factor = lr_factor(cfg, steps_per_epoch * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    state = TrainState()
    if ckpt is not None:
        state = _restore(ckpt, model, optimizer, scheduler)
        continue_schedule(optimizer, scheduler, cfg.learning_rate, cfg.weight_decay, factor, state.step)
        if info.is_main:
            run.truncate_metrics(state.step)
    record = RunRecord(train=cfg.to_dict(), detector=det_cfg.to_dict(), fingerprint=source.fingerprint,
                       backbone=source.backbone_identity, augment=source.augment, categories=source.categories,
                       adapters=list(model.backbone.adapter_stages) if model.backbone is not None else None)
    hooks = []
    if info.is_main:
        write_json_atomic(run.config, {**record.to_dict(), "resumes": run.resume_history(
            state.step, state.epoch, changes, ckpt is not None)}, indent=2)
        hooks = [MetricsHook(run.metrics, steps_per_epoch * (cfg.epochs - state.epoch), cfg.epochs, progress),
                 CheckpointHook(run.checkpoint, record)]
    ddp = model
    if info.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loop = LoopConfig(epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, seed=cfg.seed, clip_grad=cfg.clip_grad, amp=cfg.amp)
    trainer = Trainer(model, optimizer, scheduler, source, loop, device, info, hooks, forward_model=ddp, state=state)
    t_start = time.perf_counter()
    state = trainer.run()
    seconds = time.perf_counter() - t_start
    shutdown(info)
    return TrainResult(run=cfg.out, steps=state.step, epochs=cfg.epochs, first_loss=state.first_loss,
                       last_loss=state.last_loss, seconds=seconds,
                       views_per_second=state.views / seconds if seconds else 0.0)


def _check_resumable(cfg: TrainConfig, run: RunDir, ckpt: dict, det_cfg: DetectorConfig, source) -> None:
    """Refuse to resume a run whose mask branch or features differ from what is given now."""
    saved = RunRecord.from_dict(ckpt["run"])
    trained_masks = bool(saved.detector.get("masks"))
    if trained_masks != det_cfg.masks:
        raise CachedetError(f"--resume: the run at {cfg.out} was trained {'with' if trained_masks else 'without'} "
                            "a mask branch; resume it with the same --masks setting")
    where = f"--cache {cfg.cache}" if cfg.cache else "the online backbone"
    saved.check_fits(source.fingerprint, f"{where} (checkpoint {run.checkpoint})", found_label="checkpoint")


def _restore(ckpt: dict, model: TrainModel, optimizer, scheduler) -> TrainState:
    """Load a checkpoint's weights, optimiser and scheduler; the state to continue from."""
    weights = ckpt["state"]
    model.detector.load_state_dict(weights["detector"])
    if weights.get("backbone") is not None and model.backbone is not None:
        model.backbone.load_state_dict(weights["backbone"])
    optimizer.load_state_dict(weights["optimizer"])
    scheduler.load_state_dict(weights["scheduler"])
    return TrainState(epoch=ckpt["epoch"] + 1, step=ckpt["step"])
