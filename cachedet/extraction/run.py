"""Stage 1: plan views -> shards -> frozen backbone -> zarr store, on dask or in-process.

Planning needs only the annotation file (image sizes, boxes, masks), so every view's boxes,
Copy-Paste and metadata are decided and written once, up front, by the driver. Shards are the
unit of work (``cachedet.extraction.shards``): each shard task decodes its images, runs the backbone,
rasterises its views' instance masks (when the annotations have segmentation) and writes its
features and masks and then its completion record. A rerun skips complete shards.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from cachedet import __version__
from cachedet.backbones.backbone import Backbone, BackboneConfig, build_backbone
from cachedet.backbones.projection import kept_channels, parse_request
from cachedet.cache import schema
from cachedet.cache.header import Hybrid, MaskInfo, Storage, StoreHeader
from cachedet.cache.layout import (
    create_store,
    interrupted_creation,
    meta_arrays,
    remove_store,
    row_arrays,
    store_exists,
)
from cachedet.cache.store import (
    StoreIndex,
    StoreReader,
    StoreWriter,
    open_header,
    rows_checksums,
    shard_range,
)
from cachedet.core.errors import CachedetError, NonFiniteFeatures, StoreDamaged, check_number
from cachedet.core.paths import resolve_path
from cachedet.core.recipes import DEFAULT_RECIPE, get_recipe, schedule_advice
from cachedet.core.runtime import resolve_device
from cachedet.core.structures import ViewParams
from cachedet.data.coco import (
    PLAN_DROP_REASONS,
    DetectionDataset,
    gc_paused,
    load_detection_dataset,
)
from cachedet.data.copy_paste import PastePlan, plan_copy_paste
from cachedet.data.masks import mask_source, mask_sources
from cachedet.data.scan import ScanReport, scan_images
from cachedet.data.views import AugmentConfig, plan_views_many, transform_boxes_many
from cachedet.extraction.projection import projection_for
from cachedet.extraction.reuse import refuse_or_rebuild
from cachedet.extraction.shards import (
    ShardRunner,
    ShardTask,
    compute_features,
    default_loader_workers,
    run_shards_in_process,
    run_shards_on_dask,
)


@dataclass(frozen=True)
class ExtractConfig:
    annotations: str
    images: str
    out: str
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    views: int = 4
    dtype: str = "float16"
    codec: str = "zstd"
    shard_views: int = 64
    workers: int = 0  # 0: in this process; N: a dask LocalCluster of N worker processes
    scheduler: str | None = None  # address of an existing dask.distributed scheduler
    worker_timeout: float = 300.0  # dask: stop when the cluster has had no worker this long (s)
    device: str = "auto"
    batch_size: int = 8
    loader_workers: int | None = None  # decode processes; None: default_loader_workers(device)
    overwrite: bool = False
    update: bool = (
        False  # a store from an earlier version of the annotations: reuse its unchanged shards
    )
    skip_bad: bool = False
    repair: bool = False  # verify complete shards first and recompute the damaged ones
    cache_stage: int | None = (
        None  # hybrid cache: store up to this backbone stage (adapters train after it)
    )
    masks: bool = True  # store instance masks when the annotations carry segmentation
    recipe: str | None = DEFAULT_RECIPE  # cachedet.core.recipes; recorded in the header
    # store each level projected onto its leading principal directions (PCA fitted on a sample of
    # the store's views): None, "auto" (min(C, 256)), K, a fraction (0.25, "1/4") or {level: k};
    # see cachedet.backbones.projection.parse_request
    project: str | int | float | dict | None = None
    # or apply the map of this projected store (a validation store for heads trained on it)
    projection: str | None = None

    def __post_init__(self):
        # paths resolved once (cachedet.core.paths), as every later reader sees them
        for name in ("annotations", "images", "out"):
            object.__setattr__(self, name, resolve_path(getattr(self, name)))
        object.__setattr__(self, "project", parse_request(self.project))  # its normal form
        object.__setattr__(self, "projection", resolve_path(self.projection))
        # the recipe fills in the jitter the user did not give, as train-heads' recipe does
        if self.recipe is not None and not self.augment.range_given:
            jitter = tuple(get_recipe(self.recipe).scale_range)
            object.__setattr__(self, "augment", replace(self.augment, scale_range=jitter))

    def validate(self):
        for name, low in (("views", 1), ("shard_views", 1), ("batch_size", 1), ("workers", 0)):
            check_number(f"ExtractConfig.{name}", getattr(self, name), integer=True, low=low)
        check_number(
            "ExtractConfig.loader_workers", self.loader_workers, integer=True, low=0, optional=True
        )
        check_number(
            "ExtractConfig.cache_stage", self.cache_stage, integer=True, low=0, optional=True
        )
        check_number("ExtractConfig.worker_timeout", self.worker_timeout, low=0, low_open=True)
        if not self.augment.augment and self.views != 1:
            raise CachedetError(
                f"ExtractConfig.views {self.views}: a store without augmentation (augment.augment) has "
                "one plain view per image; use 1"
            )
        if self.batch_size < 1:
            raise CachedetError(
                f"ExtractConfig.batch_size: expected a positive integer, got {self.batch_size}"
            )
        if self.workers < 0:
            raise CachedetError(f"ExtractConfig.workers: expected 0 or more, got {self.workers}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise CachedetError(
                f"ExtractConfig.loader_workers: expected 0 or more, got {self.loader_workers}"
            )
        if self.overwrite and self.update:
            raise CachedetError(
                "ExtractConfig.overwrite and ExtractConfig.update exclude each other (update keeps "
                "the shards whose images did not change; overwrite recomputes all)"
            )
        if self.workers and self.scheduler:
            raise CachedetError(
                "ExtractConfig.workers and ExtractConfig.scheduler exclude each other"
            )
        if not os.path.isdir(self.images):
            raise CachedetError(f"ExtractConfig.images {self.images}: not a directory")
        if self.project is not None and self.projection is not None:
            raise CachedetError(
                "ExtractConfig.project fits a new projection, ExtractConfig.projection applies a "
                "store's: give one of them"
            )
        if (self.project or self.projection) is not None and self.cache_stage is not None:
            option = "project" if self.project is not None else "projection"
            raise CachedetError(
                f"ExtractConfig.{option} and ExtractConfig.cache_stage exclude each other: a hybrid "
                "cache keeps a stage's output for the later stages (and adapters) to run on, which "
                "a projection would change; drop one of them"
            )
        schema.check_storage(self.dtype, self.codec, self.shard_views)
        resolve_device(self.device)


@dataclass
class ViewPlan:
    """Every view of the store, in store order (image-major), with its boxes (ragged)."""

    views: list[ViewParams]
    paths: list[str]
    boxes: dict[str, np.ndarray]  # offsets (V+1,), xyxy (N, 4), labels (N,), ann_ids (N,)
    pastes: list[PastePlan | None]  # Copy-Paste of each view, or None
    dropped: dict[str, int] = field(default_factory=dict)  # PLAN_DROP_REASONS -> annotations

    def paste_image_ids(self) -> np.ndarray:
        """(V,) int64: the image each view's pasted objects come from, -1 for none."""
        return np.asarray([p.source_image_id if p else -1 for p in self.pastes], dtype=np.int64)

    def meta(self) -> dict[str, np.ndarray]:
        """Every ``meta/*`` array of the store, as ``create_store`` writes them."""
        return {**meta_arrays(self.views), "paste_image_id": self.paste_image_ids()}


def masks_header(dataset: DetectionDataset, plan: ViewPlan) -> MaskInfo:
    """The header's masks: the format, and how many stored objects fall back to their box (no segmentation)."""
    where = dataset.annotation_rows()
    from_boxes = sum(
        mask_source(*where[a]).segmentation is None for a in plan.boxes["ann_ids"].tolist()
    )
    return MaskInfo(
        format=schema.MASK_FORMAT,
        objects=int(len(plan.boxes["ann_ids"])),
        objects_from_boxes=from_boxes,
    )


def _plan_drops(
    dataset: DetectionDataset, views: list[ViewParams], per_image: int, kept: np.ndarray
) -> dict:
    """Count the annotations that reach no view (``PLAN_DROP_REASONS``): too small at every
    view's scale, or else cut out of every view by its crop. ``views``: ``per_image`` per image,
    image-major; ``kept``: the annotation ids some view holds. One numpy pass over all boxes."""
    dropped = dict.fromkeys(PLAN_DROP_REASONS, 0)
    counts = np.fromiter((len(r.ann_ids) for r in dataset.images), np.int64, len(dataset.images))
    if not counts.sum():
        return dropped
    boxes = np.concatenate([r.boxes for r in dataset.images]).astype(np.float32).reshape(-1, 4)
    ids = np.concatenate([r.ann_ids for r in dataset.images]).astype(np.int64)
    lost = ~np.isin(ids, kept)
    if not lost.any():
        return dropped
    # (images, per_image) scales of each image's views, as ViewParams.scale computes them
    sizes = np.asarray([(*v.orig_size, *v.resized_size) for v in views], np.int64).reshape(-1, 4)
    sy = (sizes[:, 2] / sizes[:, 0]).reshape(len(dataset.images), per_image)
    sx = (sizes[:, 3] / sizes[:, 1]).reshape(len(dataset.images), per_image)
    image = np.repeat(np.arange(len(dataset.images)), counts)[lost]
    w = (boxes[lost, 2] - boxes[lost, 0]).astype(np.float64)[:, None]
    h = (boxes[lost, 3] - boxes[lost, 1]).astype(np.float64)[:, None]
    small = (np.minimum(w * sx[image], h * sy[image]) < 1).all(axis=1)
    dropped["degenerate_at_canvas"] = int(small.sum())
    dropped["outside_views"] = int(len(small) - small.sum())
    return dropped


def plan_views(dataset: DetectionDataset, augment: AugmentConfig, views_per_image: int) -> ViewPlan:
    """Every view of every image (``views_per_image`` each, image-major) with its boxes, and the
    count of annotations that reach none of them (``ViewPlan.dropped``). The boxes of all views are
    moved in one batch (``transform_boxes_many``); Copy-Paste, when on, then edits each view."""
    with gc_paused():  # a view per image: no cycles among them, nothing for the GC to find
        return _plan_views(dataset, augment, views_per_image)


def _plan_views(
    dataset: DetectionDataset, augment: AugmentConfig, views_per_image: int
) -> ViewPlan:
    images = dataset.images
    sizes = np.asarray([(r.id, r.height, r.width) for r in images], dtype=np.int64).reshape(-1, 3)
    ids, heights, widths = np.repeat(sizes, views_per_image, axis=0).T
    index = np.tile(np.arange(views_per_image, dtype=np.int64), len(images))
    views = plan_views_many(augment, ids, index, heights, widths)
    paths = [p for r in images for p in [dataset.image_path(r)] * views_per_image]
    n = np.fromiter((len(r.labels) for r in images), np.int64, len(images))
    first = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    # the source rows of every view's boxes: its image's rows, once per view
    per_view = np.repeat(n, views_per_image)
    rows = np.arange(int(per_view.sum()), dtype=np.int64) + np.repeat(
        np.repeat(first, views_per_image) - (np.cumsum(per_view) - per_view), per_view
    )
    if len(images):
        all_boxes = np.concatenate([r.boxes for r in images]).astype(np.float32).reshape(-1, 4)
        all_labels = np.concatenate([r.labels for r in images]).astype(np.int64)
        all_ids = np.concatenate([r.ann_ids for r in images]).astype(np.int64)
    else:
        all_boxes, all_labels, all_ids = (
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )
    xyxy, keep = transform_boxes_many(views, all_boxes[rows], per_view)
    labels, ann_ids = all_labels[rows][keep], all_ids[rows][keep]
    view_of = np.repeat(np.arange(len(views)), per_view)
    offsets = np.zeros(len(views) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(view_of[keep], minlength=len(views)))
    pastes = [None] * len(views)
    if augment.copy_paste:
        parts = []
        for v, params in enumerate(views):
            s, e = offsets[v], offsets[v + 1]
            paste, b, lab, ids = plan_copy_paste(
                augment, dataset, v // views_per_image, params, xyxy[s:e], labels[s:e], ann_ids[s:e]
            )
            pastes[v] = paste
            parts.append((b, lab, ids))
        xyxy = np.concatenate([p[0] for p in parts]) if parts else xyxy
        labels = np.concatenate([p[1] for p in parts]) if parts else labels
        ann_ids = np.concatenate([p[2] for p in parts]) if parts else ann_ids
        offsets[1:] = np.cumsum([len(p[1]) for p in parts])
    boxes = {
        "offsets": offsets,
        "xyxy": np.asarray(xyxy, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "ann_ids": np.asarray(ann_ids, dtype=np.int64),
    }
    return ViewPlan(
        views=views,
        paths=paths,
        boxes=boxes,
        pastes=pastes,
        dropped=_plan_drops(dataset, views, views_per_image, np.unique(boxes["ann_ids"])),
    )


@dataclass
class ExtractResult:
    store: str
    num_views: int
    shards_total: int
    shards_run: int
    shards_skipped_complete: int
    skipped_images: list[dict]
    dropped: dict[str, int]  # annotations by reason (DROP_REASONS, PLAN_DROP_REASONS)
    dropped_images: dict[str, int]  # images: duplicate, missing (skip_bad), unreadable (skipped)
    seconds: float
    views_run: int  # views computed by this run (complete shards are not recomputed)
    shard_seconds: float  # wall time of the shard work alone (no planning, no backbone build)
    repaired: list[dict] = field(
        default_factory=list
    )  # damaged shards found by --repair and recomputed
    masks: dict | None = None  # the header's "masks" entry: stored instance masks, or None
    scan: ScanReport | None = None  # the scan of the images' headers before work
    shards_reused: int = 0  # ExtractConfig.update: complete shards taken from the earlier store
    mended: list[dict] = field(
        default_factory=list
    )  # per-view arrays that --repair rewrote from the plan: {"array", "error"}

    @property
    def views_per_second(self) -> float:
        """Throughput of this run's shard work: views computed and written per wall second."""
        return self.views_run / self.shard_seconds if self.shard_seconds > 0 else 0.0


def hybrid_backbone(cfg: ExtractConfig) -> tuple[BackboneConfig, Hybrid | None]:
    """The backbone that extraction runs, and the header's ``hybrid`` entry for ``--cache-stage K``.

    A hybrid cache keeps the pyramid levels of stages <= K plus stage K's output (the input of
    the adapted stages); timm builds the backbone only up to stage K, so extraction stops there.
    """
    if cfg.cache_stage is None:
        return cfg.backbone, None
    full = build_backbone(cfg.backbone, warn=False)
    out = full.identity["out_indices"]
    k = cfg.cache_stage
    if not 0 <= k < max(out):
        raise CachedetError(
            f"ExtractConfig.cache_stage {k}: expected 0..{max(out) - 1} for {cfg.backbone.name} (its pyramid "
            f"ends at stage {max(out)}; a later cache stage leaves nothing to adapt)"
        )
    stages = tuple(sorted({i for i in out if i <= k} | {k}))
    hybrid = Hybrid(cache_stage=k, backbone=full.identity, specs=tuple(full.specs))
    # a ViT's later blocks also attend to the prefix tokens (class, registers) of block K: store them too
    return BackboneConfig(
        cfg.backbone.name, stages, cfg.backbone.weights, prefix_tokens=full.patch is not None
    ), hybrid


def dataset_entry(dataset: DetectionDataset, plan: ViewPlan) -> dict:
    """The header's ``dataset``: the annotation file's fingerprint, with the annotations the plan
    drops (``plan.dropped``) and the image files missing up front (``dropped_images.missing``,
    left out by ``skip_bad``) counted beside the file's own drops."""
    d = dataset.fingerprint()
    d["dropped"] = {**d["dropped"], **plan.dropped}
    d["dropped_images"] = {**d["dropped_images"], "missing": len(missing_images(dataset))}
    return d


def _header(
    cfg: ExtractConfig,
    backbone: Backbone,
    dataset: DetectionDataset,
    plan: ViewPlan,
    hybrid: Hybrid | None,
    masks: bool,
    projection: dict | None = None,
) -> StoreHeader:
    """The new store's header; ``backbone`` carries the projection, if any (its specs and shapes
    are the stored ones), and ``projection`` is its header entry."""
    return StoreHeader(
        backbone=backbone.identity,
        specs=tuple(backbone.specs),
        shapes={k: tuple(v) for k, v in backbone.feature_shapes(cfg.augment.size).items()},
        dataset=dataset_entry(dataset, plan),
        augment=cfg.augment.to_dict(),
        views=cfg.views,
        storage=Storage(dtype=cfg.dtype, codec=cfg.codec, shard_views=cfg.shard_views),
        num_views=len(plan.views),
        num_images=len(dataset.images),
        cachedet_version=__version__,
        hybrid=hybrid,
        masks=masks_header(dataset, plan) if masks else None,
        recipe=cfg.recipe,
        projection=projection,
    )


def prepare_store(
    cfg: ExtractConfig, header: StoreHeader, plan: ViewPlan, projection: dict | None = None
) -> None:
    """Create the store, or check that an existing one was made with the same configuration.

    Safe against a second extraction starting on the same new store: creation is atomic
    (``create_store``), and whoever loses the race checks the winner's header and resumes into it.
    """
    if store_exists(cfg.out) and cfg.overwrite:
        remove_store(cfg.out)
    for _ in range(3):
        if store_exists(cfg.out) and _check_existing(cfg, header):
            return
        if create_store(
            cfg.out,
            header,
            plan.views,
            plan.boxes,
            extra_meta={"paste_image_id": plan.paste_image_ids()},
            projection=projection,
        ):
            return
    raise CachedetError(
        f"ExtractConfig.out {cfg.out}: another process keeps replacing this store; run one extraction at a time"
    )


def _check_existing(cfg: ExtractConfig, header: StoreHeader) -> bool:
    """True when ``cfg.out`` holds a compatible store; False after removing an interrupted creation.
    Raises CachedetError for a foreign folder or a store made with another configuration."""
    try:
        found = open_header(cfg.out)
    except StoreDamaged:
        if not interrupted_creation(cfg.out):
            raise  # a store whose header is lost: its own line says it must be rebuilt
        found = None  # laid out without its header (an object store's interrupted creation)
    except CachedetError:
        found = None
    if found is None and not interrupted_creation(cfg.out):
        raise CachedetError(
            f"ExtractConfig.out {cfg.out}: exists and is not a cachedet store; "
            "set ExtractConfig.overwrite to replace it"
        )
    if found is None:
        remove_store(
            cfg.out
        )  # an interrupted creation on an object store, or an empty folder: nothing to lose
        return False
    diff = found.diff(header)
    if diff:
        raise CachedetError(
            f"ExtractConfig.out {cfg.out}: the store was made with another configuration "
            f"(set ExtractConfig.overwrite to rebuild it): " + "; ".join(diff[:5])
        )
    return True


def loader_workers(cfg: ExtractConfig) -> int:
    """Decode processes per shard runner: ``--loader-workers``, else none on dask (its worker
    processes already run shards side by side), else ``default_loader_workers``."""
    if cfg.loader_workers is not None:
        return cfg.loader_workers
    return 0 if cfg.workers or cfg.scheduler else default_loader_workers(cfg.device)


def shard_tasks(
    cfg: ExtractConfig,
    backbone: BackboneConfig,
    masks_of: DetectionDataset | None,
    plan: ViewPlan,
    skip: set[int] = frozenset(),
    projection: str | None = None,
) -> list[ShardTask]:
    """One ``ShardTask`` per shard of ``plan`` not in ``skip`` (complete shards), in shard order.
    ``masks_of``: the dataset whose instance masks the tasks rasterise, or None for boxes only;
    ``projection``: the sha256 of the store's projection, which the tasks apply (or None)."""
    tasks, meta = [], plan.meta()
    for shard in range(-(-len(plan.views) // cfg.shard_views)):
        if shard in skip:
            continue
        start, end = shard_range(shard, cfg.shard_views, len(plan.views))
        tasks.append(
            ShardTask(
                store=cfg.out,
                shard=shard,
                start=start,
                views=tuple(plan.views[start:end]),
                paths=tuple(plan.paths[start:end]),
                pastes=tuple(plan.pastes[start:end]),
                backbone=backbone,
                device=cfg.device,
                dtype=cfg.dtype,
                batch_size=cfg.batch_size,
                loader_workers=loader_workers(cfg),
                skip_bad=cfg.skip_bad,
                threads=max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers else 0,
                masks=mask_sources(masks_of, plan, start, end) if masks_of is not None else None,
                rows=rows_checksums(plan.boxes, meta, start, end),
                projection=projection,
            )
        )
    return tasks


def extract(cfg: ExtractConfig, progress: bool = True) -> ExtractResult:
    """Run stage 1 (see module docstring). Resumes into an existing compatible store."""
    from cachedet.core.progress import ViewProgress

    t0 = time.perf_counter()
    cfg.validate()
    warn_schedule(cfg)
    dataset = load_detection_dataset(cfg.annotations, cfg.images)
    scan = scan_dataset(cfg, dataset, progress)  # before any store exists or backbone is built
    backbone_cfg, hybrid = hybrid_backbone(cfg)
    backbone = build_backbone(backbone_cfg)
    plan = plan_views(dataset, cfg.augment, cfg.views)
    with_masks = cfg.masks and dataset.has_masks
    projection, entry, fitted_on = projection_for(
        cfg, backbone_cfg, backbone, plan, progress, loader_workers(cfg)
    )
    header = _header(cfg, backbone, dataset, plan, hybrid, with_masks, entry)
    created = cfg.overwrite or not store_exists(cfg.out)
    reused = []
    if not created:  # made from another version of the annotations: say what changed, or update
        masks_of = dataset if with_masks else None
        reused = refuse_or_rebuild(cfg.out, header, plan, dataset, cfg.update, masks_of) or []
    prepare_store(cfg, header, plan, projection.arrays() if projection is not None else None)
    mended = (
        StoreWriter(cfg.out).mend_rows(row_arrays(plan.boxes, plan.meta())) if cfg.repair else []
    )
    repaired = repair_store(cfg.out, progress) if cfg.repair else []

    store = StoreWriter(cfg.out)
    store.remove_stale_temps()  # left by writes of a killed run
    done = store.shard_records()
    total = header.num_shards
    tasks = shard_tasks(
        cfg,
        backbone_cfg,
        dataset if with_masks else None,
        plan,
        skip=set(done),
        projection=entry["sha256"] if entry is not None else None,
    )
    todo_views = sum(len(t.views) for t in tasks)
    runner = None
    if tasks and not (cfg.workers or cfg.scheduler):  # built before the clock starts, as on dask
        runner = ShardRunner(backbone_cfg, cfg.device, backbone=fitted_on)
        if runner.pin:  # first-call kernel selection, outside the measured shard work
            compute_features(runner.backbone, torch.zeros(1, 3, cfg.augment.size, cfg.augment.size))
    t_shards = time.perf_counter()
    with ViewProgress("extract", todo_views, enabled=progress) as bar:
        if cfg.workers or cfg.scheduler:
            records = run_shards_on_dask(
                tasks, cfg.workers, cfg.scheduler, bar, worker_timeout=cfg.worker_timeout
            )
        else:
            try:
                records = run_shards_in_process(tasks, on_views=bar.advance, runner=runner)
            except NonFiniteFeatures:
                if created and not store.shard_records():  # made by this run, holding nothing
                    remove_store(cfg.out)
                raise
    shard_seconds = time.perf_counter() - t_shards
    skipped = [s for r in records for s in r["skipped"]]
    skipped += [s for r in done.values() for s in r.get("skipped", [])]
    return ExtractResult(
        store=cfg.out,
        num_views=len(plan.views),
        shards_total=total,
        shards_run=len(tasks),
        shards_skipped_complete=len(done),
        shards_reused=len(reused),
        skipped_images=skipped,
        dropped=header.dataset["dropped"],
        dropped_images={
            **header.dataset["dropped_images"],
            "unreadable": len({s["image_id"] for s in skipped}),
        },
        seconds=time.perf_counter() - t0,
        views_run=todo_views,
        shard_seconds=shard_seconds,
        repaired=repaired,
        mended=mended,
        masks=header.masks.to_dict() if header.masks is not None else None,
        scan=scan,
    )


def repair_store(url: str, progress: bool = True) -> list[dict]:
    """Verify every complete shard; unmark the damaged ones so this run recomputes them."""
    from cachedet.core.progress import ViewProgress

    reader = StoreReader(url)
    with ViewProgress("verify", reader.num_shards, unit="shards", enabled=progress) as bar:
        report = reader.verify(on_shard=bar.advance)
    writer = StoreWriter(url)
    for damaged in report["damaged"]:
        writer.remove_record(damaged["shard"])
    return report["damaged"]


def scan_dataset(cfg: ExtractConfig, dataset: DetectionDataset, progress: bool) -> ScanReport:
    """The header scan of ``cachedet.data.scan`` for extraction: a bad image stops it in one line
    unless ``cfg.skip_bad`` (then its views are skipped and recorded in the store)."""
    return scan_images(
        dataset, "ExtractConfig.images", "ExtractConfig.skip_bad", cfg.skip_bad, progress
    )


@dataclass
class DryRunReport:
    num_images: int
    views_per_image: int
    num_views: int
    feature_shapes: dict[str, tuple[int, int, int]]
    bytes_per_view: int
    total_bytes: int
    device: str
    views_per_second: float
    estimated_seconds: float
    scan: ScanReport | None = None  # None with num_images (no file to scan)
    # bytes per view (before compression) of each storage choice: {"project", "dtype",
    # "bytes_per_view", "total_bytes", "coco_bytes"} (COCO: 118,287 images x views per image)
    choices: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def warn_schedule(cfg: ExtractConfig) -> None:
    """A warning when the views' jitter is the paper's wide range on few views per image
    (``cachedet.core.recipes.schedule_advice``)."""
    advice = cfg.augment.augment and schedule_advice(
        cfg.augment.scale_range, views=cfg.views, field="ExtractConfig.recipe"
    )
    if advice:
        warnings.warn(advice, stacklevel=3)


def missing_images(dataset: DetectionDataset) -> list[str]:
    """The local image files the annotations name that are not there (remote, fsspec URL, image
    folders are not scanned: none)."""
    if "://" in dataset.images_dir:
        return []
    paths = [dataset.image_path(r) for r in dataset.images]
    return [p for p in paths if not os.path.isfile(p)]


def dry_run(cfg: ExtractConfig, num_images: int | None = None) -> DryRunReport:
    """Estimate the store's size and the extraction time without writing anything.

    ``num_images`` replaces the annotation file's image count (to plan, e.g., COCO train2017).
    """
    warn_schedule(cfg)
    scan = None
    if num_images is None:
        dataset = load_detection_dataset(cfg.annotations, cfg.images)
        scan = scan_dataset(cfg, dataset, progress=True)
        num_images = len(dataset.images)
    schema.check_storage(cfg.dtype, cfg.codec, cfg.shard_views)
    device = resolve_device(cfg.device)
    backbone = build_backbone(hybrid_backbone(cfg)[0]).to(
        device
    )  # a hybrid cache stores (and runs) less
    shapes = backbone.feature_shapes(cfg.augment.size)
    specs = backbone.specs
    raw_shapes = {s.name: (s.channels, *shapes[s.name][1:]) for s in specs}
    views = num_images * cfg.views
    choices = storage_choices(cfg, specs, raw_shapes, views)
    per_view = next(c for c in choices if c["chosen"])["bytes_per_view"]
    batch = torch.zeros(min(cfg.batch_size, 4), 3, cfg.augment.size, cfg.augment.size)
    compute_features(backbone, batch)  # warm-up
    t = time.perf_counter()
    reps = 2
    for _ in range(reps):
        compute_features(backbone, batch)
    vps = reps * len(batch) / (time.perf_counter() - t)
    return DryRunReport(
        num_images=num_images,
        views_per_image=cfg.views,
        num_views=views,
        feature_shapes=shapes,
        bytes_per_view=per_view,
        total_bytes=per_view * views,
        device=str(device),
        views_per_second=vps,
        estimated_seconds=views / vps,
        scan=scan,
        choices=choices,
    )


COCO_TRAIN_IMAGES = 118_287


def storage_choices(cfg: ExtractConfig, specs, shapes: dict, views: int) -> list[dict]:
    """Bytes per view before compression (``schema.bytes_per_view``) and totals for no
    projection, ``auto`` and ``cfg.project``, each in ``cfg.dtype``, uint8 and uint4. ``shapes``:
    the backbone's (C, H, W) per level; ``chosen`` marks ``cfg``'s own choice."""
    own = cfg.project
    if cfg.projection is not None:  # another store's map: its kept directions per level
        levels = StoreIndex(cfg.projection).header.projection["levels"]
        own = {n: v["k"] for n, v in levels.items()}
    requests = [None, "auto"] + ([own] if own not in (None, "auto") else [])
    out = []
    for request in requests:
        keep = kept_channels(request, specs)
        projected = {n: (keep[n], h, w) for n, (_, h, w) in shapes.items()}
        for dtype in dict.fromkeys((cfg.dtype, "uint8", "uint4")):
            per_view = schema.bytes_per_view(projected, dtype)
            out.append(
                {
                    "project": "none" if request is None else request,
                    "dtype": dtype,
                    "bytes_per_view": per_view,
                    "total_bytes": per_view * views,
                    "coco_bytes": per_view * COCO_TRAIN_IMAGES * cfg.views,
                    "chosen": request == own and dtype == cfg.dtype,
                }
            )
    return out
