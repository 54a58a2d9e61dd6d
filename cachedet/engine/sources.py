"""Where a training step's features come from: a cache, RAM, or the backbone run online.

Every source gives the same things: feature specs, canvas size, categories, a fingerprint
(``cache.header.Fingerprint.to_dict()``) that a checkpoint must match, the identity of its data
(``data``, compared on resume), whether targets carry instance masks, the number of steps in an epoch, and batches
dict(inputs, targets, views), where inputs are features {level: (B, C, H, W)} (cache, RAM) or
normalised images (B, 3, S, S) (online; ``backbone`` turns them into features).
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import replace
from itertools import islice

import numpy as np
from torch.utils.data import DataLoader, Subset

from cachedet.backbones.backbone import (
    Backbone,
    BackboneConfig,
    build_backbone,
    config_from_identity,
)
from cachedet.backbones.projection import Projection, store_projection
from cachedet.cache.dataset import CachedViews, InMemoryViews, collate_views
from cachedet.cache.feature_crop import check_alignment, crop_batch
from cachedet.cache.header import Fingerprint, check_weights
from cachedet.cache.store import StoreIndex
from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.data.online import OnlineViews, collate_images, rank_indices
from cachedet.data.scan import scan_images
from cachedet.data.views import AugmentConfig
from cachedet.engine.config import LoaderConfig
from cachedet.engine.distributed import DistInfo


def steps_in_epoch(views_per_rank: list[int], batch_size: int) -> int:
    """Single process: every view (last batch may be short). DDP: the same count on every rank."""
    if len(views_per_rank) == 1:
        return math.ceil(views_per_rank[0] / batch_size)
    return max(1, min(views_per_rank) // batch_size)


def _with_workers(loader: LoaderConfig) -> LoaderConfig:
    """``loader`` with its worker count resolved (None: the main process, as on a CPU)."""
    return loader if loader.workers is not None else replace(loader, workers=0)


def _batched(samples, batch_size: int, collate):
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


class _AdapterMixin:
    """``enable_adapters``: residual adapters in the source's backbone (see ``cachedet.backbones.adapters``)."""

    backbone: Backbone | None = None
    hybrid_stage: int | None = None

    def enable_adapters(self, stages: tuple[int, ...] | None):
        if self.backbone is None:
            raise CachedetError(
                f"source.adapters: {self.where} holds plain frozen features; train adapters with "
                "source.online, or extract a hybrid cache (ExtractConfig.cache_stage)"
            )
        first = (
            self.hybrid_stage + 1
            if self.hybrid_stage is not None
            else self.backbone.first_adaptable_stage
        )
        last = len(self.backbone.stage_names()) - 1
        stages = tuple(stages) if stages else tuple(range(first, last + 1))
        inside = [k for k in stages if k < first]
        if inside:
            raise CachedetError(
                f"source.adapt_stages {','.join(map(str, stages))}: stage {inside[0]} is inside the cache "
                f"(it stops at stage {self.hybrid_stage}); adapt stages {first}..{last} only"
            )
        self.backbone.add_adapters(stages)


class CacheSource(_AdapterMixin):
    """Views read from a feature store: streamed by a DataLoader (``CachedViews``) or held in RAM
    (``loader.in_memory``: ``InMemoryViews``).

    ``loader``: the feed's settings (``LoaderConfig``; workers as resolved for the device, see
    ``LoaderConfig.resolved``); ``keep_float16``: hand out float16 features (CUDA autocast);
    ``masks``: targets carry instance masks when the store has them; ``pin_memory``: page-locked
    batches for non-blocking copies to a GPU. Raises CachedetError naming ``source.cache`` for a
    store that cannot be trained from.
    """

    def __init__(
        self,
        url: str,
        loader: LoaderConfig,
        dist: DistInfo,
        seed: int = 0,
        *,
        masks: bool = False,
        keep_float16: bool = False,
        pin_memory: bool = False,
    ):
        self.loader = _with_workers(loader)
        self.pin_memory = pin_memory
        self.batch_size, self.workers = loader.batch_size, self.loader.workers
        self.in_memory = loader.in_memory
        self.feature_crop_min = loader.feature_crop_min if loader.feature_crop else None
        self._loader = None  # kept across epochs when its workers persist
        self.seed, self.rank = seed, dist.rank
        views = (url, loader.views_per_epoch, seed)
        if loader.in_memory:
            self.dataset = InMemoryViews(
                *views,
                dist.rank,
                dist.world,
                masks,
                keep_float16,
                loader.allow_incomplete,
                loader.verify_reads,
                loader.reader,
            )
        else:
            self.dataset = CachedViews(
                *views,
                loader.shuffle_buffer,
                dist.rank,
                dist.world,
                keep_float16,
                masks,
                loader.allow_incomplete,
                loader.verify_reads,
                loader.reader,
            )
        self.masks = self.dataset.masks  # False when the store holds no masks
        self.no_masks_reason = "it holds no instance masks (no segmentation in its annotations, or extracted without masks)"
        header = self.dataset.header
        self.where = f"source.cache {url}"
        self.specs = list(self.dataset.specs)
        self.canvas = header.canvas
        self.categories = header.dataset[
            "categories"
        ]  # as JSON: saved in the run's config and checkpoints
        self.backbone_identity = header.backbone
        if (
            header.hybrid is not None
        ):  # the cache stops at a stage; the rest of the backbone runs in the model
            self.hybrid_stage = header.hybrid.cache_stage
            self.backbone_identity = header.hybrid.backbone
            self.backbone = build_backbone(config_from_identity(self.backbone_identity), warn=False)
            check_weights(
                self.backbone.identity,
                self.backbone_identity,
                f"{self.where}: its backbone weights ({self.backbone_identity['weights']}) are not "
                "available here, so the stages after the cache cannot be rebuilt",
            )
            self.specs = list(self.backbone.specs)
        self.projection = (
            Projection(StoreIndex(url).projection_arrays()) if header.projection else None
        )
        self.fingerprint = Fingerprint.of(  # a hybrid cache's features are its backbone's levels
            self.specs,
            self.backbone_identity,
            self.canvas,
            header.categories,
            header.projection_fingerprint,
        ).to_dict()
        self.augment = header.augment
        self.data = header.data_identity()  # recorded by the run, compared on resume
        if self.feature_crop_min is not None:
            if self.hybrid_stage is not None:
                raise CachedetError(
                    f"source.feature_crop: {self.where} is a hybrid cache; crops apply to complete pyramids only"
                )
            check_alignment(self.specs, header.shapes)

    def steps(self, epoch: int) -> int:
        return steps_in_epoch(self.dataset.views_per_rank(epoch), self.batch_size)

    def largest_batch(self) -> int:
        """The views of an epoch on the rank with fewest: no batch can be larger."""
        return min(self.dataset.views_per_rank(0))

    def batches(self, epoch: int):
        self.dataset.set_epoch(epoch)
        if self.in_memory:
            batches = _batched(iter(self.dataset), self.batch_size, collate_views)
        else:
            batches = self._loader or self._make_loader()
        if (
            self.feature_crop_min is not None
        ):  # seeded by epoch, so a resumed run replays the same crops
            rng = np.random.default_rng([self.seed, epoch, self.rank, 23])
            batches = (crop_batch(b, self.specs, self.feature_crop_min, rng) for b in batches)
        return islice(batches, self.steps(epoch))

    def _make_loader(self) -> DataLoader:
        persistent = self.loader.persistent_workers and self.workers > 0
        if persistent:  # the workers keep their copy of the dataset: share its epoch with them
            self.dataset.share_epoch(multiprocessing.get_context(self.loader.loader_start))
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            collate_fn=collate_views,
            **self.loader.loader_kwargs(self.pin_memory),
        )
        if persistent:
            self._loader = loader
        return loader


class OnlineSource(_AdapterMixin):
    """Images decoded and augmented every step; the frozen (or trainable) backbone runs in the model."""

    def __init__(
        self,
        annotations: str,
        images: str,
        backbone: BackboneConfig,
        augment: AugmentConfig,
        trainable: bool,
        loader: LoaderConfig,
        dist: DistInfo,
        seed: int = 0,
        *,
        masks: bool = False,
        pin_memory: bool = False,
        projection: str | None = None,
    ):
        self.where = "the online backbone"
        self.loader, self.pin_memory = _with_workers(loader), pin_memory
        self.dataset_info = load_detection_dataset(annotations, images)
        scan_images(
            self.dataset_info, "source.images", progress=dist.rank == 0
        )  # before the backbone
        self.masks = masks and self.dataset_info.has_masks
        self.no_masks_reason = f"source.annotations {annotations} has no segmentation"
        self.backbone = (
            build_backbone(backbone)
            .set_trainable(trainable)
            .check_canvas(augment.size, "source.size")
        )
        self.projection = None
        if projection is not None:
            self.projection = store_projection(
                projection, self.backbone.identity, "source.projection"
            )[0]
            self.backbone.set_projection(self.projection)
        self.specs = list(self.backbone.specs)
        self.canvas = augment.size
        self.categories = self.dataset_info.categories.to_json()
        self.fingerprint = Fingerprint.of(
            self.specs,
            self.backbone.identity,
            self.canvas,
            self.dataset_info.categories,
            self.projection.fingerprint() if self.projection is not None else None,
        ).to_dict()
        self.backbone_identity = self.backbone.identity
        self.augment = augment.to_dict()
        self.data = {  # recorded by the run, compared on resume (the views are in its settings)
            "annotations_sha256": self.dataset_info.sha256,
            "images": len(self.dataset_info.images),
        }
        self.views = OnlineViews(
            self.dataset_info, augment, self.backbone.mean, self.backbone.std, self.masks
        )
        self.batch_size, self.workers = loader.batch_size, self.loader.workers
        self.seed, self.dist = seed, dist
        if dist.world > len(self.views):  # a rank without views would wait for the others forever
            raise CachedetError(
                f"source.annotations {annotations}: {len(self.views)} views per epoch cannot give "
                f"each of {dist.world} ranks a view; train on at most {len(self.views)} ranks"
            )

    def steps(self, epoch: int) -> int:
        n = len(self.views)
        return steps_in_epoch(
            [len(range(r, n, self.dist.world)) for r in range(self.dist.world)], self.batch_size
        )

    def largest_batch(self) -> int:
        """The views of an epoch on the rank with fewest: no batch can be larger."""
        return len(self.views) // self.dist.world

    def batches(self, epoch: int):
        self.views.set_epoch(epoch)
        subset = Subset(
            self.views,
            rank_indices(len(self.views), self.seed, epoch, self.dist.rank, self.dist.world),
        )
        # a new Subset (this epoch's order) each epoch, so its workers never persist
        kwargs = self.loader.loader_kwargs(self.pin_memory)
        kwargs.pop("persistent_workers", None)
        loader = DataLoader(subset, batch_size=self.batch_size, collate_fn=collate_images, **kwargs)
        return islice(loader, self.steps(epoch))
