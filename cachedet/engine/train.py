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
from torch import nn

from cachedet import __version__
from cachedet.atomic import write_json_atomic
from cachedet.backbones import DEFAULT_BACKBONE, Backbone, BackboneConfig
from cachedet.data.views import AugmentConfig
from cachedet.engine.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic
from cachedet.engine.resume import continue_schedule, resume_changes
from cachedet.engine.distributed import DistInfo, barrier, init_distributed, shutdown
from cachedet.engine.sources import CacheSource, OnlineSource, check_fingerprint
from cachedet.errors import CachedetError
from cachedet.paths import resolve_path
from cachedet.recipes import (DEFAULT_RECIPE, LEGACY_SCALE_RANGE, detector_options_for, get_recipe,
                              warmup_steps_for)
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
    scale_range: tuple[float, float] | None = None  # None: the recipe's
    backbone_trainable: bool = False
    # residual adapters in the frozen backbone (online, or after a hybrid cache's stage)
    adapters: bool = False
    adapt_stages: tuple[int, ...] | None = None  # None: every stage after the stem (or after the cache)
    # detector
    neck: str = "auto"  # auto: the simple pyramid for a plain ViT's taps, FPN otherwise
    head: str = "faster-rcnn"
    neck_channels: int = 256
    detector_options: dict = field(default_factory=dict)  # the recipe fills in the faster-rcnn box head
    masks: bool = False  # Mask R-CNN mask branch, trained on the instance masks (cache or annotations)
    # optimisation
    epochs: int = 12
    batch_size: int = 8
    optimizer: str = "sgd"
    lr: float | None = None  # default: 0.02 x batch/16 for SGD, 1e-4 for AdamW
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int | None = None  # None: min(1000, 5% of the run) (cachedet.recipes.warmup_steps_for)
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
    recipe: str | None = DEFAULT_RECIPE  # cachedet.recipes; None: no recipe (runs recorded before recipes)

    def __post_init__(self):  # paths resolved once (cachedet.paths), so config.json records where things are
        for name in ("out", "cache", "annotations", "images"):
            object.__setattr__(self, name, resolve_path(getattr(self, name)))
        recipe = get_recipe(self.recipe) if self.recipe is not None else None
        if self.scale_range is None:
            object.__setattr__(self, "scale_range", recipe.scale_range if recipe else LEGACY_SCALE_RANGE)
        if recipe:
            options = detector_options_for(recipe, self.head, self.detector_options)
            object.__setattr__(self, "detector_options", options)
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
        d = {"recipe": None, **{k: v for k, v in d.items() if k in known}}  # older runs: no recipe
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


class TrainModel(nn.Module):
    """inputs -> features -> detector losses. Without a backbone the inputs are the features;
    with ``hybrid_stage`` K they are a hybrid cache's levels and the backbone runs stages > K."""

    def __init__(self, detector: nn.Module, backbone: Backbone | None = None, hybrid_stage: int | None = None):
        super().__init__()
        self.detector, self.backbone, self.hybrid_stage = detector, backbone, hybrid_stage

    def features(self, inputs):
        if self.backbone is None:
            return inputs
        if self.hybrid_stage is not None:
            return self.backbone.forward_from(inputs, self.hybrid_stage)
        if self.backbone.trainable or self.backbone.has_adapters:
            return self.backbone(inputs)
        with torch.inference_mode():
            feats = self.backbone(inputs)
        # inference tensors cannot be saved for backward; a clone outside the mode is a normal tensor
        return {k: v.clone() for k, v in feats.items()}

    def forward(self, inputs, targets, image_sizes=None):
        return self.detector(self.features(inputs), targets, image_sizes)


def lr_factor(cfg: TrainConfig, total_steps: int):
    """Multiplier of the base learning rate at a step: linear warm-up (``cfg.warmup_steps``, or
    min(1000, 5% of ``total_steps``)), then step or cosine decay."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else warmup_steps_for(total_steps)
    warmup = min(warmup, max(total_steps - 1, 0))

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


def _to_device(batch: dict, device: torch.device, amp: bool):
    inputs = batch["inputs"]
    if isinstance(inputs, dict):
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        if not amp:
            inputs = {k: v.float() for k, v in inputs.items()}
    else:
        inputs = inputs.to(device, non_blocking=True)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return inputs, targets, batch.get("image_sizes")


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.checkpoint = os.path.join(path, "checkpoints", "last.pt")
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.config = os.path.join(path, "config.json")
        self._lock = None

    def lock(self) -> None:
        """Hold an exclusive lock on the run (``.lock``, ``fcntl.flock``) until ``unlock`` or the process
        ends, so two train-heads with one --out never interleave. A crash releases it by itself."""
        import fcntl

        os.makedirs(self.path, exist_ok=True)
        f = open(os.path.join(self.path, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise CachedetError(f"--out {self.path}: another train-heads is writing this run; wait for it, "
                                "or choose another --out") from None
        self._lock = f

    def resume_history(self, step: int, epoch: int, changes: dict, resumed: bool) -> list[dict]:
        """config.json's list of resumptions so far, with this one (its step and changed settings) added."""
        history = []
        if resumed and os.path.exists(self.config):
            try:
                with open(self.config) as f:
                    history = list(json.load(f).get("resumes", []))
            except (OSError, ValueError):
                history = []
        if resumed:
            history.append({"step": step, "epoch": epoch, "changed": changes})
        return history

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def truncate_metrics(self, last_step: int):
        """Drop metric lines written after the checkpoint we resume from (a killed run's tail)."""
        if not os.path.exists(self.metrics):
            return
        with open(self.metrics) as f:
            lines = [ln for ln in f if ln.strip()]
        kept = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= last_step:
                    kept.append(ln)
            except (ValueError, KeyError):
                break
        with open(self.metrics, "w") as f:
            f.writelines(kept)


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
    from cachedet.progress import ViewProgress

    if not cfg.resume and os.path.exists(run.checkpoint):
        raise CachedetError(f"--out {cfg.out}: holds a run already (pass --resume to continue it, or choose another --out)")
    ckpt = load_checkpoint(run.checkpoint) if cfg.resume else None
    changes = resume_changes(ckpt["config"], cfg) if ckpt is not None else {}

    source = make_source(cfg, info, device)
    det_cfg = DetectorConfig(
        num_classes=len(source.categories), canvas=source.canvas, in_specs=tuple(source.specs),
        neck=resolve_neck(cfg.neck, source.specs), head=cfg.head, neck_channels=cfg.neck_channels,
        options=dict(cfg.detector_options), masks=source.masks,
    )
    if ckpt is not None:
        trained_masks = bool(ckpt["detector_config"].get("masks"))
        if trained_masks != det_cfg.masks:
            raise CachedetError(f"--resume: the run at {cfg.out} was trained {'with' if trained_masks else 'without'} "
                                "a mask branch; resume it with the same --masks setting")
        where = f"--cache {cfg.cache}" if cfg.cache else "the online backbone"
        check_fingerprint(ckpt["fingerprint"], source.fingerprint,
                          f"{where} (checkpoint {run.checkpoint}) does not fit this run", found_label="checkpoint")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        detector = build_detector(det_cfg)
    model = TrainModel(detector, source.backbone, source.hybrid_stage).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable)
    steps_per_epoch = source.steps(0)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    factor = lr_factor(cfg, steps_per_epoch * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    start_epoch, step = 0, 0
    if ckpt is not None:
        model.detector.load_state_dict(ckpt["detector"])
        if ckpt.get("backbone") is not None and model.backbone is not None:
            model.backbone.load_state_dict(ckpt["backbone"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        continue_schedule(optimizer, scheduler, cfg.learning_rate, cfg.weight_decay, factor, step)
        if info.is_main:
            run.truncate_metrics(step)
    if info.is_main:
        write_json_atomic(run.config, {"train": cfg.to_dict(), "detector": det_cfg.to_dict(), "fingerprint": source.fingerprint,
                                       "backbone": source.backbone_identity, "augment": source.augment,
                                       "categories": source.categories, "cachedet_version": __version__,
                                       "resumes": run.resume_history(step, start_epoch, changes, ckpt is not None)},
                          indent=2)
    ddp = model
    if info.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    use_amp = cfg.amp and device.type == "cuda"
    first_loss = last_loss = None
    t_start, views_done = time.perf_counter(), 0
    remaining = steps_per_epoch * (cfg.epochs - start_epoch)
    with ViewProgress("train-heads", remaining, unit="steps", enabled=progress and info.is_main) as bar, \
            open(run.metrics, "a") if info.is_main else _nullfile() as metrics:
        for epoch in range(start_epoch, cfg.epochs):
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # RoI sampling etc.: resume replays it exactly
            model.train()
            for i, batch in enumerate(source.batches(epoch)):
                if i >= steps_per_epoch:
                    break
                t0 = time.perf_counter()
                inputs, targets, image_sizes = _to_device(batch, device, use_amp)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    losses = ddp(inputs, targets, image_sizes)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise CachedetError(f"the loss became {loss.item()} at step {step} (epoch {epoch}); lower --lr or raise --warmup-steps")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
                optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                n = len(targets) * info.world
                dt = time.perf_counter() - t0
                views_done += n
                last_loss = float(loss.detach())
                first_loss = last_loss if first_loss is None else first_loss
                if info.is_main:
                    record = {"epoch": epoch, "step": step, "lr": lr, "loss": last_loss,
                              **{k: float(v.detach()) for k, v in losses.items()},
                              "views_per_s": n / dt, "step_s": dt}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.advance(1, status=f"epoch {epoch + 1}/{cfg.epochs} loss {last_loss:.3f} lr {lr:.2g}")
            if info.is_main:
                save_atomic({
                    "format": CHECKPOINT_FORMAT, "cachedet_version": __version__, "epoch": epoch, "step": step,
                    "config": cfg.to_dict(), "detector_config": det_cfg.to_dict(), "fingerprint": source.fingerprint,
                    "backbone_identity": source.backbone_identity, "categories": source.categories,
                    "augment": source.augment, "detector": model.detector.state_dict(),
                    "backbone": model.backbone.state_dict() if model.backbone is not None
                    and (model.backbone.trainable or model.backbone.has_adapters) else None,
                    "adapters": list(model.backbone.adapter_stages) if model.backbone is not None else None,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                }, run.checkpoint)
            barrier(info)
    seconds = time.perf_counter() - t_start
    shutdown(info)
    return TrainResult(run=cfg.out, steps=step, epochs=cfg.epochs, first_loss=first_loss, last_loss=last_loss,
                       seconds=seconds, views_per_second=views_done / seconds if seconds else 0.0)


class _nullfile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass
