"""Typed settings of stage 2, one small frozen dataclass per concern.

``TrainConfig`` = where the features come from (``source``), what is trained (``detector``), how
(``optim``), how batches are fed (``loader``) and what it is validated on (``val``), plus the
run's place, seed and device. Errors name the field by its path from ``TrainConfig`` (``optim.epochs``, ``TrainConfig.out``); the CLI
shows the option that sets it instead (``cachedet_cli.common.FLAG_OF``).

``TrainConfig.of(**settings)`` builds one from flat names (``epochs=3, head="cascade"``), as the
CLI, the demo and the tests do; ``PATH_OF`` maps each flat name to its field path. config.json
stores ``to_dict()`` (the flat names); ``from_dict`` reads that, the nested ``asdict`` layout and cachedet 0.1 runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace

from cachedet.backbones.backbone import DEFAULT_BACKBONE
from cachedet.cache.readers import reader_config
from cachedet.core.errors import CachedetError, check_number
from cachedet.core.paths import resolve_path
from cachedet.core.recipes import (
    DEFAULT_CANVAS,
    LEGACY_SCALE_RANGE,
    detector_options_for,
    get_recipe,
    schedule_advice,
    train_recipe,
)
from cachedet.evaluation.scoring import COCO_STATS
from cachedet.models.build import check_head


@dataclass(frozen=True)
class SourceConfig:
    """Where features come from: a cache, or a backbone run online (frozen, fine-tuned or adapted)."""

    cache: str | None = None
    online: bool = False
    annotations: str | None = None
    images: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"  # default | random | timm | a checkpoint path
    out_indices: tuple[int, ...] | None = None
    size: int = DEFAULT_CANVAS  # online canvas (pixels)
    scale_range: tuple[float, float] | None = None  # online LSJ range; None: the recipe's
    backbone_trainable: bool = False
    adapters: bool = (
        False  # residual adapters in the frozen backbone (online, or after a hybrid cache's stage)
    )
    adapt_stages: tuple[int, ...] | None = (
        None  # None: every stage after the stem (or after the cache)
    )
    # online: apply this projected store's map to the backbone's levels (the features its heads see)
    projection: str | None = None

    def __post_init__(
        self,
    ):  # paths resolved once (cachedet.core.paths), so config.json records where things are
        for name in ("cache", "annotations", "images", "projection"):
            object.__setattr__(self, name, resolve_path(getattr(self, name)))
        if self.weights not in ("default", "random", "timm"):
            object.__setattr__(self, "weights", resolve_path(self.weights))

    def validate(self):
        check_number("source.size", self.size, integer=True, low=32, high=1 << 14)
        if self.online == (self.cache is not None):
            raise CachedetError(
                "give either source.cache STORE or source.online (with source.annotations, "
                "source.images, source.backbone)"
            )
        if self.online and (not self.annotations or not self.images):
            raise CachedetError("source.online needs source.annotations and source.images")
        if self.backbone_trainable and not self.online:
            raise CachedetError(
                "source.backbone_trainable fine-tunes the backbone, so it needs source.online"
            )
        if self.adapters and self.backbone_trainable:
            raise CachedetError(
                "source.adapters trains adapters inside a frozen backbone; drop source.backbone_trainable"
            )
        if self.adapt_stages is not None and not self.adapters:
            raise CachedetError("source.adapt_stages needs source.adapters")
        if self.projection is not None and not self.online:
            raise CachedetError(
                "source.projection applies a projected store's map to an online backbone; a "
                "cache run reads its store's own projection: drop source.projection"
            )
        if self.projection is not None and (self.backbone_trainable or self.adapters):
            raise CachedetError(
                "source.projection: the map was fitted on the frozen backbone's features; drop "
                "source.backbone_trainable and source.adapters, or source.projection"
            )


OPTION_MINIMUM = {  # detector options that are counts: the least value that builds a model
    "box_convs": 0,
    "box_fcs": 0,
    "mask_convs": 0,
    "mask_channels": 1,
    "box_representation": 1,
    "rois_per_image": 1,
    "proposals_per_image": 1,
    "nasfpn_repeats": 1,
}


@dataclass(frozen=True)
class HeadsConfig:
    """What is trained after the backbone: neck, head and their options (``DetectorConfig.options``)."""

    neck: str = "auto"  # auto: the simple pyramid for a plain ViT's taps, FPN otherwise
    head: str = "faster-rcnn"
    neck_channels: int = 256
    options: dict = field(default_factory=dict)
    masks: bool = (
        False  # Mask R-CNN mask branch, trained on the instance masks (cache or annotations)
    )

    def validate(self):
        check_number(
            "detector.neck_channels", self.neck_channels, integer=True, low=1, high=1 << 14
        )
        for name, least in OPTION_MINIMUM.items():  # the CLI's flags and Python's dicts alike
            if name in self.options:
                value = self.options[name]
                check_number(f"detector.options.{name}", value, integer=True, low=least)
        check_head(self.head, self.masks)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule: linear warm-up, then step (x0.1 at 2/3 and 8/9) or cosine decay."""

    epochs: int = 12
    optimizer: str = "sgd"
    lr: float | None = None  # default: 0.02 x batch/16 for SGD, 1e-4 for AdamW
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int | None = (
        None  # None: min(1000, 5% of the run) (cachedet.core.recipes.warmup_steps_for)
    )
    schedule: str = "step"
    clip_grad: float | None = 10.0
    amp: bool = True  # bfloat16 autocast, CUDA only
    checkpoint_every: int | None = (
        None  # steps between checkpoints inside an epoch (None: per epoch)
    )

    def validate(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise CachedetError(f"optim.optimizer {self.optimizer}: expected sgd or adamw")
        if self.schedule not in ("step", "cosine"):
            raise CachedetError(f"optim.schedule {self.schedule}: expected step or cosine")
        check_number("optim.epochs", self.epochs, integer=True, low=1, high=1 << 20)
        check_number("optim.lr", self.lr, low=0, low_open=True, optional=True)
        check_number("optim.momentum", self.momentum, low=0, high=1)
        check_number("optim.weight_decay", self.weight_decay, low=0)
        check_number("optim.warmup_steps", self.warmup_steps, integer=True, low=0, optional=True)
        check_number("optim.clip_grad", self.clip_grad, low=0, low_open=True, optional=True)
        check_number(
            "optim.checkpoint_every", self.checkpoint_every, integer=True, low=1, optional=True
        )


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are fed: size, workers, RAM, views per epoch, feature crops, metrics lines.

    On CUDA the loader pins host memory; with workers it prefetches ``prefetch_factor`` batches
    per worker and (``persistent_workers``) keeps its workers alive across epochs. Each worker (or
    the main process) keeps a shuffle buffer of ``shuffle_buffer`` views as stored; None holds
    1 GiB of them (at most 256 views; ``cachedet.cache.dataset.CachedViews``).
    """

    batch_size: int = 8
    workers: int | None = None  # None: min(8, cores - 1) on CUDA, 0 (the main process) otherwise
    loader_start: str | None = None  # DataLoader start method (None: platform default, or "spawn")
    in_memory: bool = False
    views_per_epoch: int = 1
    feature_crop: bool = False  # random crops of the cached maps (cachedet.cache.feature_crop)
    feature_crop_min: float = 0.6  # smallest crop side, as a share of the canvas
    shuffle_buffer: int | None = None  # views mixed per worker (None: 1 GiB of them as stored)
    max_steps_per_epoch: int | None = None
    prefetch_factor: int = 4  # batches each worker prepares ahead
    persistent_workers: bool = True
    log_every: int | None = None  # steps per metrics line (None: 50 on CUDA, 1 otherwise)
    allow_incomplete: bool = False  # train on the finished shards of an unfinished store
    verify_reads: bool = True  # check each shard block read against its completion record
    # codec pipeline of the shard reads: auto (zarrs when installed), zarrs or zarr (its own)
    reader: str = "auto"

    def resolved(self, device) -> "LoaderConfig":
        """This config with ``workers`` and ``log_every`` set for ``device`` (a torch.device)."""
        cuda = device.type == "cuda"
        workers = self.workers
        if workers is None:
            workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
        log_every = self.log_every if self.log_every is not None else (50 if cuda else 1)
        return replace(self, workers=workers, log_every=log_every)

    def loader_kwargs(self, pin_memory: bool = False) -> dict:
        """torch DataLoader arguments for this feed (``workers`` resolved): with workers, each
        prepares ``prefetch_factor`` batches ahead, persists across epochs when
        ``persistent_workers``, and starts by ``loader_start``; ``pin_memory`` for GPU copies."""
        kwargs = {"num_workers": self.workers or 0, "pin_memory": pin_memory}
        if self.workers:
            kwargs.update(
                prefetch_factor=self.prefetch_factor,
                persistent_workers=self.persistent_workers,
                multiprocessing_context=self.loader_start,
            )
        return kwargs

    def validate(self, online: bool):
        check_number("loader.workers", self.workers, integer=True, low=0, high=1024, optional=True)
        for name in (
            "batch_size",
            "views_per_epoch",
            "shuffle_buffer",
            "prefetch_factor",
            "log_every",
            "max_steps_per_epoch",
        ):  # a batch larger than the data is cut to it by train (cachedet.engine.train)
            check_number(f"loader.{name}", getattr(self, name), integer=True, low=1, optional=True)
        if self.feature_crop and online:
            raise CachedetError(
                "loader.feature_crop crops cached features; online training draws fresh LSJ views instead"
            )
        reader_config(self.reader)  # an unknown reader, or zarrs asked for and not installed
        check_number("loader.feature_crop_min", self.feature_crop_min)
        if not 0 < self.feature_crop_min <= 1:
            raise CachedetError(
                f"loader.feature_crop_min: expected a fraction in (0, 1], got {self.feature_crop_min}"
            )


VAL_PARTS = ("bbox", "segm")  # DetectionEvaluator's summaries that best_metric may name
VAL_STATS = COCO_STATS  # the summary numbers best_metric may name


@dataclass(frozen=True)
class ValConfig:
    """Validation during training: from images (``annotations`` + ``images``) or from a ``--no-augment
    --views 1`` store of the validation set (``annotations`` optional: the store's own file is used),
    every ``every`` epochs (None: 1 when validation is given); ``best_metric`` ("bbox.AP", "segm.AP50"...)
    chooses checkpoints/best.pt."""

    annotations: str | None = None
    images: str | None = None
    cache: str | None = None
    every: int | None = None
    best_metric: str = "bbox.AP"

    def __post_init__(self):
        for name in ("annotations", "images", "cache"):
            object.__setattr__(self, name, resolve_path(getattr(self, name)))

    @property
    def enabled(self) -> bool:
        return self.images is not None or self.cache is not None

    @property
    def period(self) -> int:
        """Epochs between validations (0: no validation)."""
        return (self.every or 1) if self.enabled else 0

    def validate(self):
        if self.images is not None and self.cache is not None:
            raise CachedetError(
                "val.images and val.cache exclude each other: validate from images or from a store"
            )
        if self.images is not None and self.annotations is None:
            raise CachedetError("val.images needs val.annotations (the validation COCO/LVIS file)")
        if self.cache is not None and self.annotations is None:
            raise CachedetError(
                "val.cache needs val.annotations (the file the store was extracted from)"
            )
        if self.annotations is not None and not self.enabled:
            raise CachedetError("val.annotations needs val.images DIR or val.cache STORE")
        check_number("val.every", self.every, integer=True, low=1, optional=True)
        part, _, stat = self.best_metric.partition(".")
        if part not in VAL_PARTS or stat not in VAL_STATS:
            raise CachedetError(
                f"val.best_metric {self.best_metric}: expected PART.STAT with PART one of "
                f"{', '.join(VAL_PARTS)} and STAT one of {', '.join(VAL_STATS)} (e.g. bbox.AP)"
            )


AUTO_RECIPE = "auto"

SECTIONS = {
    "source": SourceConfig,
    "detector": HeadsConfig,
    "optim": OptimConfig,
    "loader": LoaderConfig,
    "val": ValConfig,
}
TOP = ("out", "seed", "device", "resume", "recipe")
FLAT_NAME = {
    ("detector", "options"): "detector_options",  # (section, field) -> flat name, where they differ
    ("val", "annotations"): "val_annotations",
    ("val", "images"): "val_images",
    ("val", "cache"): "val_cache",
    ("val", "every"): "eval_every",
}
PATH_OF = {
    **{name: f"TrainConfig.{name}" for name in TOP},
    **{
        FLAT_NAME.get((section, f.name), f.name): f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in fields(cls)
    },
}
TUPLES = ("out_indices", "scale_range", "adapt_stages")


@dataclass(frozen=True)
class TrainConfig:
    out: str
    source: SourceConfig = field(default_factory=SourceConfig)
    detector: HeadsConfig = field(default_factory=HeadsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    val: ValConfig = field(default_factory=ValConfig)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    # cachedet.core.recipes name; "auto": the store's recipe for a cache run, else the default
    # (resolved by ``resolve_recipe`` at the front door); None: no recipe (runs before recipes)
    recipe: str | None = AUTO_RECIPE

    def __post_init__(self):
        object.__setattr__(self, "out", resolve_path(self.out))
        if self.recipe == AUTO_RECIPE:  # settings the recipe fills in wait for its resolution
            return
        recipe = get_recipe(self.recipe) if self.recipe is not None else None
        if self.source.scale_range is None:  # the recipe fills in what was not given
            scale_range = recipe.scale_range if recipe else LEGACY_SCALE_RANGE
            object.__setattr__(self, "source", replace(self.source, scale_range=tuple(scale_range)))
        if recipe is not None:
            options = detector_options_for(recipe, self.detector.head, self.detector.options)
            object.__setattr__(self, "detector", replace(self.detector, options=options))

    @classmethod
    def of(cls, **settings) -> "TrainConfig":
        """A TrainConfig from flat names (``PATH_OF``'s keys); raises CachedetError for an unknown name."""
        unknown = sorted(set(settings) - set(PATH_OF))
        if unknown:
            raise CachedetError(f"TrainConfig: unknown setting(s) {', '.join(unknown)}")
        parts = {section: {} for section in SECTIONS}
        top = {}
        for flat, value in settings.items():
            section, name = PATH_OF[flat].split(".")
            (top if section == "TrainConfig" else parts[section])[name] = value
        return cls(**top, **{section: SECTIONS[section](**kw) for section, kw in parts.items()})

    def flat(self) -> dict:
        """{flat name: value} for every setting (the inverse of ``of``)."""
        out = {}
        for flat, path in PATH_OF.items():
            section, name = path.split(".")
            out[flat] = getattr(self if section == "TrainConfig" else getattr(self, section), name)
        return out

    def with_settings(self, **settings) -> "TrainConfig":
        """A copy with some flat settings replaced."""
        return TrainConfig.of(**{**self.flat(), **settings})

    @property
    def learning_rate(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return 0.02 * self.loader.batch_size / 16 if self.optim.optimizer == "sgd" else 1e-4

    def validate(self):
        """Raise CachedetError naming the first field (by its path) whose value cannot work: each
        number is checked for its type and range (``cachedet.core.errors.check_number``)."""
        check_number("TrainConfig.seed", self.seed, integer=True, low=0)
        self.source.validate()
        self.detector.validate()
        self.optim.validate()
        self.loader.validate(self.source.online)
        self.val.validate()
        if self.learning_rate <= 0:
            raise CachedetError(f"optim.lr: expected a positive number, got {self.learning_rate}")

    def to_dict(self) -> dict:
        """The flat settings (``flat``), as config.json keeps them: the names of cachedet 0.1's
        config.json and of the train-heads options, so scripts that read it keep working."""
        return self.flat()

    @classmethod
    def from_dict(cls, d: dict, where: str = "TrainConfig") -> "TrainConfig":
        """The inverse of ``to_dict``; also reads the flat dict of cachedet 0.1's config.json and
        the nested ``asdict`` layout.

        Raises CachedetError (prefixed ``where``) for settings this version does not know: a
        config written by a newer cachedet is refused rather than run without them."""
        from cachedet import __version__

        flat, unknown = {}, []
        for key, value in d.items():
            if key in SECTIONS and isinstance(value, dict):
                names = {FLAT_NAME.get((key, name), name): v for name, v in value.items()}
                unknown += [
                    f"{key}.{n}" for n in value if FLAT_NAME.get((key, n), n) not in PATH_OF
                ]
                flat.update({k: v for k, v in names.items() if k in PATH_OF})
            elif key in PATH_OF:
                flat[key] = value
            else:
                unknown.append(str(key))
        if unknown:
            raise CachedetError(
                f"{where}: settings this cachedet ({__version__}) does not know: "
                f"{', '.join(sorted(unknown))} (written by a newer cachedet?); run it with the "
                "version that wrote it, or remove those settings"
            )
        flat = {
            "recipe": None,
            **{k: v for k, v in flat.items() if k in PATH_OF},
        }  # older runs: no recipe
        for key in TUPLES:
            if flat.get(key) is not None:
                flat[key] = tuple(flat[key])
        return cls.of(**flat)

    @classmethod
    def of_file(cls, path: str, where: str, out: str | None = None) -> "TrainConfig":
        """The settings a run's config.json at ``path`` records (``out``: the run directory to use
        instead of the recorded one). ``where`` names the field or option in errors. Raises
        CachedetError when the file is missing, is not a train-heads config.json, or holds settings
        this cachedet does not know (a newer version's)."""
        try:
            with open(path) as f:
                saved = json.load(f)["train"]
            if out is not None:
                saved = {**saved, "out": out}
            return cls.from_dict(saved, where=f"{where} {path}")
        except CachedetError:
            raise
        except FileNotFoundError:
            raise CachedetError(f"{where} {path}: no such file") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CachedetError(
                f"{where} {path}: not a train-heads config.json ({type(e).__name__})"
            ) from None

    @classmethod
    def of_run(cls, out: str) -> "TrainConfig":
        """The settings a run at ``out`` was last trained with (its config.json), for resuming."""
        path = os.path.join(resolve_path(out), "config.json")
        if not os.path.exists(path):
            raise CachedetError(f"TrainConfig.out {out}: no run to resume here (no config.json)")
        return cls.of_file(path, "TrainConfig.out")


def resolve_recipe(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """``cfg`` with its recipe resolved, and one-line notes for the user: a given recipe that differs
    from the store's, a jitter range wide for the schedule (``schedule_advice``).

    ``recipe="auto"`` takes the recipe recorded in the header of the store a cache run trains from
    (``source.cache``), else the default; a named recipe stays. ``train`` (the CLI and
    ``cachedet.train_heads`` alike) comes through here, so one store gives one detector either way.
    A resumed run keeps its own recipe (its config.json's). A cache run's canvas is its store's: a
    ``source.size`` that differs from it (and from the default) is refused naming the field."""
    from cachedet.cache.store import store_header

    if cfg.recipe is None:  # a run recorded before recipes
        return cfg, []
    cached = cfg.source.cache is not None and not cfg.source.online
    header = store_header(cfg.source.cache) if cached else None
    if header is not None and cfg.source.size not in (DEFAULT_CANVAS, header.canvas):
        raise CachedetError(
            f"source.size {cfg.source.size}: a cache run uses the canvas its store was made with "
            f"({header.canvas}); source.size is for source.online"
        )
    given = None if cfg.recipe == AUTO_RECIPE else cfg.recipe
    if cfg.resume and given is None:  # the run's own recipe (as --resume takes its settings)
        resolved = replace(cfg, recipe=_recorded_recipe(cfg.out, header))
        note = None
    else:
        name, note = train_recipe(given, None if cfg.resume else header)
        resolved = cfg if name == cfg.recipe else replace(cfg, recipe=name)
    if header is not None and header.augmented:
        jitter = header.augment["scale_range"]
    else:
        jitter = resolved.source.scale_range if resolved.source.online else None
    advice = jitter and schedule_advice(
        tuple(jitter), epochs=resolved.optim.epochs, field="TrainConfig.recipe"
    )
    return resolved, [line for line in (note, advice) if line]


def _recorded_recipe(out: str, header) -> str | None:
    """The recipe of the run at ``out`` (its config.json); the store's or the default if it has none
    to read (``train`` then reports the missing run in its own words)."""
    try:
        return TrainConfig.of_run(out).recipe
    except CachedetError:
        return train_recipe(None, header)[0]
