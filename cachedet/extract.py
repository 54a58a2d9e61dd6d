"""Stage 1: plan views -> shards -> frozen backbone -> zarr store, on dask or in-process.

Planning needs only the annotation file (image sizes and boxes), so every view's boxes and
metadata are written once, up front, by the driver. Shards are the unit of work: each shard
task decodes its images, runs the backbone and writes its features and then its completion
record. A rerun skips complete shards.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from cachedet import __version__
from cachedet.backbones import Backbone, BackboneConfig, build_backbone
from cachedet.cache import schema
from cachedet.cache.store import (
    FeatureStore, create_store, read_shard_records, remove_shard_record, remove_store, shard_range, store_exists,
    verify_store, write_shard_features, write_shard_record,
)
from cachedet.data.coco import DetectionDataset, load_detection_dataset
from cachedet.data.copy_paste import PastePlan, plan_copy_paste
from cachedet.data.images import ViewDataset
from cachedet.data.views import AugmentConfig, plan_view, transform_boxes
from cachedet.errors import CachedetError
from cachedet.structures import ViewParams


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
    device: str = "auto"
    batch_size: int = 8
    loader_workers: int = 0
    overwrite: bool = False
    skip_bad: bool = False
    repair: bool = False  # verify complete shards first and recompute the damaged ones

    def validate(self):
        if self.views < 1:
            raise CachedetError(f"--views: expected a positive integer, got {self.views}")
        if not self.augment.augment and self.views != 1:
            raise CachedetError("--no-augment makes one plain view per image: use --views 1")
        if self.batch_size < 1:
            raise CachedetError(f"--batch-size: expected a positive integer, got {self.batch_size}")
        if self.workers < 0:
            raise CachedetError(f"--workers: expected 0 or more, got {self.workers}")
        if self.loader_workers < 0:
            raise CachedetError(f"--loader-workers: expected 0 or more, got {self.loader_workers}")
        if self.workers and self.scheduler:
            raise CachedetError("--workers and --scheduler exclude each other")
        if not os.path.isdir(self.images):
            raise CachedetError(f"--images {self.images}: not a directory")
        schema.check_storage(self.dtype, self.codec, self.shard_views)
        resolve_device(self.device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CachedetError(f"--device {device}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CachedetError(f"--device {device}: CUDA is not available on this machine")
    return dev


@dataclass
class ViewPlan:
    """Every view of the store, in store order (image-major), with its boxes (ragged)."""

    views: list[ViewParams]
    paths: list[str]
    boxes: dict[str, np.ndarray]  # offsets (V+1,), xyxy (N, 4), labels (N,), ann_ids (N,)
    pastes: list[PastePlan | None]  # Copy-Paste of each view, or None

    def paste_image_ids(self) -> np.ndarray:
        """(V,) int64: the image each view's pasted objects come from, -1 for none."""
        return np.asarray([p.source_image_id if p else -1 for p in self.pastes], dtype=np.int64)


def plan_views(dataset: DetectionDataset, augment: AugmentConfig, views_per_image: int) -> ViewPlan:
    views, paths, pastes, xyxy, labels, ann_ids, offsets = [], [], [], [], [], [], [0]
    for index, rec in enumerate(dataset.images):
        path = dataset.image_path(rec)
        for k in range(views_per_image):
            params = plan_view(augment, rec.id, k, rec.height, rec.width)
            b, lab, ids = transform_boxes(params, rec.boxes, rec.labels, rec.ann_ids)
            paste = None
            if augment.copy_paste:
                paste, b, lab, ids = plan_copy_paste(augment, dataset, index, params, b, lab, ids)
            views.append(params)
            paths.append(path)
            pastes.append(paste)
            xyxy.append(b)
            labels.append(lab)
            ann_ids.append(ids)
            offsets.append(offsets[-1] + len(lab))
    return ViewPlan(
        views=views,
        paths=paths,
        boxes={
            "offsets": np.asarray(offsets, dtype=np.int64),
            "xyxy": np.concatenate(xyxy).astype(np.float32).reshape(-1, 4),
            "labels": np.concatenate(labels).astype(np.int64),
            "ann_ids": np.concatenate(ann_ids).astype(np.int64),
        },
        pastes=pastes,
    )


@dataclass(frozen=True)
class ShardTask:
    """Everything one shard writer needs; picklable, so it can travel to a dask worker."""

    store: str
    shard: int
    start: int
    views: tuple[ViewParams, ...]
    paths: tuple[str, ...]
    pastes: tuple[PastePlan | None, ...]
    backbone: BackboneConfig
    device: str
    dtype: str
    batch_size: int
    loader_workers: int
    skip_bad: bool
    threads: int


@functools.lru_cache(maxsize=2)
def _worker_backbone(cfg: BackboneConfig, device: str) -> Backbone:
    """One backbone per process and config (dask workers keep it between shard tasks)."""
    backbone = build_backbone(cfg, warn=False)
    dev = resolve_device(device)
    backbone = backbone.to(dev)
    if dev.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def compute_features(backbone: Backbone, images: torch.Tensor) -> dict[str, np.ndarray]:
    """images float32 (B, 3, S, S) normalised -> {level: float32 (B, C, H, W)} on the CPU.

    On CUDA the forward pass runs under float16 autocast with channels_last inputs.
    """
    dev = next(backbone.parameters()).device
    with torch.inference_mode():
        x = images.to(dev, non_blocking=True)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                feats = backbone(x)
        else:
            feats = backbone(x)
    return {k: v.float().cpu().numpy() for k, v in feats.items()}


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


@dataclass
class ComputedShard:
    """One shard's encoded features, ready to write: {level: (n, C, H, W)} storage dtype, and for
    uint8 stores {level: (n, C, 2)} quant params."""

    blocks: dict[str, np.ndarray]
    quant: dict[str, np.ndarray] | None
    skipped: list[dict]
    seconds: float


def compute_shard(task: ShardTask, on_views=None) -> ComputedShard:
    """Decode, augment, run the backbone and encode every view of one shard (nothing is written)."""
    if task.threads:
        torch.set_num_threads(task.threads)
    backbone = _worker_backbone(task.backbone, task.device)
    t0 = time.perf_counter()  # the backbone is built once per process, outside the shard's time
    loader = DataLoader(
        ViewDataset(list(task.views), list(task.paths), backbone.mean, backbone.std, skip_bad=True,
                    pastes=list(task.pastes)),
        batch_size=task.batch_size,
        num_workers=task.loader_workers,
        collate_fn=_collate,
    )
    blocks: dict[str, list[np.ndarray]] = {}
    quant: dict[str, list[np.ndarray]] = {}
    skipped, done = [], 0
    for images, errors in loader:
        for i, err in enumerate(errors):
            if err:
                if not task.skip_bad:
                    raise CachedetError(err)
                view = task.start + done + i
                skipped.append({"view": view, "image_id": task.views[done + i].image_id, "error": err})
        for name, feats in compute_features(backbone, images).items():
            stored, params = schema.encode(feats, task.dtype)
            blocks.setdefault(name, []).append(stored)
            if params is not None:
                quant.setdefault(name, []).append(params)
        done += len(errors)
        if on_views:
            on_views(len(errors))
    return ComputedShard(
        blocks={k: np.concatenate(v) for k, v in blocks.items()},
        quant={k: np.concatenate(v) for k, v in quant.items()} if quant else None,
        skipped=skipped, seconds=time.perf_counter() - t0,
    )


def write_shard(task: ShardTask, computed: ComputedShard) -> dict:
    """Write a computed shard's features, then its completion record; return the record."""
    t0 = time.perf_counter()
    try:
        digests = write_shard_features(task.store, task.shard, computed.blocks, task.start, computed.quant)
    except OSError as e:  # no space, no permission, a lost connection: the shard stays incomplete
        raise CachedetError(f"--out {task.store}: writing shard {task.shard} failed: {e.strerror or e}; "
                            "it is not marked complete, rerun the same command to resume") from None
    record = {
        "shard": task.shard,
        "views": [task.start, task.start + len(task.views)],
        "sha256": digests,
        "skipped": computed.skipped,
        "seconds": round(computed.seconds + time.perf_counter() - t0, 3),  # compute + write
    }
    try:
        write_shard_record(task.store, record)
    except OSError as e:
        raise CachedetError(f"--out {task.store}: writing the completion record of shard {task.shard} failed: "
                            f"{e.strerror or e}; rerun the same command to resume") from None
    return record


def run_shard(task: ShardTask, on_views=None) -> dict:
    """Compute and write one shard; return its completion record (also written to the store)."""
    return write_shard(task, compute_shard(task, on_views))


def run_shards_in_process(tasks: list[ShardTask], on_views=None) -> list[dict]:
    """Compute shards one after another while a writer thread stores the previous one (at most
    one shard waits for its write, so memory stays at two shards)."""
    from concurrent.futures import ThreadPoolExecutor

    records, pending = [], None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachedet-writer") as writer:
        for task in tasks:
            computed = compute_shard(task, on_views)
            if pending is not None:
                records.append(pending.result())
            pending = writer.submit(write_shard, task, computed)
        if pending is not None:
            records.append(pending.result())
    return records


@dataclass
class ExtractResult:
    store: str
    num_views: int
    shards_total: int
    shards_run: int
    shards_skipped_complete: int
    skipped_images: list[dict]
    dropped: dict[str, int]
    seconds: float
    views_run: int  # views computed by this run (complete shards are not recomputed)
    shard_seconds: float  # wall time of the shard work alone (no planning, no backbone build)
    repaired: list[dict] = field(default_factory=list)  # damaged shards found by --repair and recomputed

    @property
    def views_per_second(self) -> float:
        """Throughput of this run's shard work: views computed and written per wall second."""
        return self.views_run / self.shard_seconds if self.shard_seconds > 0 else 0.0


def _header(cfg: ExtractConfig, backbone: Backbone, dataset: DetectionDataset, num_views: int) -> dict:
    return schema.make_header(
        backbone=backbone.identity,
        specs=[s.to_dict() for s in backbone.specs],
        shapes=backbone.feature_shapes(cfg.augment.size),
        dataset=dataset.fingerprint(),
        augment=cfg.augment.to_dict(),
        views=cfg.views,
        storage={"dtype": cfg.dtype, "codec": cfg.codec, "shard_views": cfg.shard_views},
        num_views=num_views,
        num_images=len(dataset.images),
        version=__version__,
    )


def prepare_store(cfg: ExtractConfig, header: dict, plan: ViewPlan) -> None:
    """Create the store, or check that an existing one was made with the same configuration."""
    if store_exists(cfg.out) and cfg.overwrite:
        remove_store(cfg.out)
    if store_exists(cfg.out):
        try:
            found = FeatureStore(cfg.out).header
        except CachedetError:
            found = None
        if found is None and not read_shard_records(cfg.out):
            remove_store(cfg.out)  # an interrupted creation, or an empty folder: nothing to lose
        elif found is None:
            raise CachedetError(f"--out {cfg.out}: exists and is not a cachedet store; pass --overwrite to replace it")
        else:
            diff = schema.differences(schema.identity(found), schema.identity(header))
            if diff:
                raise CachedetError(
                    f"--out {cfg.out}: the store was made with another configuration "
                    f"(pass --overwrite to rebuild it): " + "; ".join(diff[:5])
                )
            return
    create_store(cfg.out, header, plan.views, plan.boxes, extra_meta={"paste_image_id": plan.paste_image_ids()})


def extract(cfg: ExtractConfig, progress: bool = True) -> ExtractResult:
    """Run stage 1 (see module docstring). Resumes into an existing compatible store."""
    from cachedet.progress import ViewProgress

    t0 = time.perf_counter()
    cfg.validate()
    dataset = load_detection_dataset(cfg.annotations, cfg.images)
    backbone = build_backbone(cfg.backbone)
    plan = plan_views(dataset, cfg.augment, cfg.views)
    header = _header(cfg, backbone, dataset, len(plan.views))
    prepare_store(cfg, header, plan)
    repaired = repair_store(cfg.out, progress) if cfg.repair else []

    done = read_shard_records(cfg.out)
    total = header["num_shards"]
    tasks = []
    for shard in range(total):
        if shard in done:
            continue
        start, end = shard_range(shard, cfg.shard_views, len(plan.views))
        tasks.append(ShardTask(
            store=cfg.out, shard=shard, start=start, views=tuple(plan.views[start:end]),
            paths=tuple(plan.paths[start:end]), pastes=tuple(plan.pastes[start:end]), backbone=cfg.backbone, device=cfg.device, dtype=cfg.dtype,
            batch_size=cfg.batch_size, loader_workers=cfg.loader_workers, skip_bad=cfg.skip_bad,
            threads=max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers else 0,
        ))
    todo_views = sum(len(t.views) for t in tasks)
    if tasks and not (cfg.workers or cfg.scheduler):
        _worker_backbone(cfg.backbone, cfg.device)  # built before the clock starts, as on a dask worker
    t_shards = time.perf_counter()
    with ViewProgress("extract", todo_views, enabled=progress) as bar:
        if cfg.workers or cfg.scheduler:
            records = _run_on_dask(tasks, cfg, bar)
        else:
            records = run_shards_in_process(tasks, on_views=bar.advance)
    shard_seconds = time.perf_counter() - t_shards
    skipped = [s for r in records for s in r["skipped"]]
    skipped += [s for r in done.values() for s in r.get("skipped", [])]
    return ExtractResult(
        store=cfg.out, num_views=len(plan.views), shards_total=total, shards_run=len(tasks),
        shards_skipped_complete=len(done), skipped_images=skipped, dropped=dataset.dropped,
        seconds=time.perf_counter() - t0, views_run=todo_views, shard_seconds=shard_seconds, repaired=repaired,
    )


def repair_store(url: str, progress: bool = True) -> list[dict]:
    """Verify every complete shard; unmark the damaged ones so this run recomputes them."""
    from cachedet.progress import ViewProgress

    total = FeatureStore(url).num_shards
    with ViewProgress("verify", total, unit="shards", enabled=progress) as bar:
        report = verify_store(url, on_shard=bar.advance)
    for damaged in report["damaged"]:
        remove_shard_record(url, damaged["shard"])
    return report["damaged"]


def _run_on_dask(tasks: list[ShardTask], cfg: ExtractConfig, bar) -> list[dict]:
    from dask.distributed import Client, LocalCluster, as_completed

    if cfg.scheduler:
        client, cluster = Client(cfg.scheduler), None
    else:
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(run_shard, tasks, pure=False)
        records = []
        for fut in as_completed(futures):
            rec = fut.result()
            records.append(rec)
            bar.advance(rec["views"][1] - rec["views"][0])
        return records
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


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

    def to_dict(self) -> dict:
        return asdict(self)


def dry_run(cfg: ExtractConfig, num_images: int | None = None) -> DryRunReport:
    """Estimate the store's size and the extraction time without writing anything.

    ``num_images`` replaces the annotation file's image count (to plan, e.g., COCO train2017).
    """
    if num_images is None:
        num_images = len(load_detection_dataset(cfg.annotations, cfg.images).images)
    schema.check_storage(cfg.dtype, cfg.codec, cfg.shard_views)
    device = resolve_device(cfg.device)
    backbone = build_backbone(cfg.backbone).to(device)
    shapes = backbone.feature_shapes(cfg.augment.size)
    per_view = sum(int(np.prod(s)) for s in shapes.values()) * schema.ITEMSIZE[cfg.dtype]
    views = num_images * cfg.views
    batch = torch.zeros(min(cfg.batch_size, 4), 3, cfg.augment.size, cfg.augment.size)
    compute_features(backbone, batch)  # warm-up
    t = time.perf_counter()
    reps = 2
    for _ in range(reps):
        compute_features(backbone, batch)
    vps = reps * len(batch) / (time.perf_counter() - t)
    return DryRunReport(
        num_images=num_images, views_per_image=cfg.views, num_views=views, feature_shapes=shapes,
        bytes_per_view=per_view, total_bytes=per_view * views, device=str(device),
        views_per_second=vps, estimated_seconds=views / vps,
    )
