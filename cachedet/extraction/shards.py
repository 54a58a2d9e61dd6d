"""Shards, the unit of extraction work: decode + augment + Copy-Paste -> frozen backbone -> encode
(on the backbone's device) -> write features (and the views' instance masks) -> write the
completion record. In-process (one ``ShardRunner``: a DataLoader over every shard's views, and a
thread pool that compresses and writes finished shards, one thread per shard) or on dask workers
(one shard per task, one runner per worker).
"""

from __future__ import annotations

import gc
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from cachedet.backbones.backbone import Backbone, BackboneConfig, build_backbone
from cachedet.backbones.projection import Projection
from cachedet.cache import schema
from cachedet.cache.store import CHECKSUM, StoreIndex, StoreWriter
from cachedet.core.errors import CachedetError, NonFiniteFeatures
from cachedet.core.runtime import resolve_device
from cachedet.core.structures import ViewParams
from cachedet.data.copy_paste import PastePlan
from cachedet.data.images import ViewDataset
from cachedet.data.masks import MaskSource
from cachedet.data.scan import image_stamps


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
    masks: tuple[tuple[MaskSource, ...], ...] | None = (
        None  # per view, its objects in box-row order
    )
    rows: dict[str, str] | None = (
        None  # checksums of its box and metadata rows (``rows_checksums``)
    )
    projection: str | None = None  # sha256 of the store's projection, applied before encoding


def load_backbone(cfg: BackboneConfig, device: str) -> Backbone:
    """The frozen backbone of ``cfg`` on ``device`` (channels_last on CUDA)."""
    backbone = build_backbone(cfg, warn=False)
    dev = resolve_device(device)
    backbone = backbone.to(dev)
    if dev.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def default_loader_workers(device: str) -> int:
    """Decode workers when ``--loader-workers`` is not given: on CUDA the host only decodes,
    augments, compresses and writes, so min(8, cores - 1) processes; on a CPU the backbone wants
    the cores, so none up to 2 cores, then a quarter of them (at most 4)."""
    cores = os.cpu_count() or 1
    if resolve_device(device).type == "cuda":
        return max(0, min(8, cores - 1))
    return 0 if cores <= 2 else min(4, cores // 4)


def forward(backbone: Backbone, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """images float32 (B, 3, S, S) normalised (pinned on CUDA) -> {level: (B, C, H, W)} on the
    backbone's device (float16 on CUDA: autocast, channels_last inputs; float32 on the CPU)."""
    dev = next(backbone.parameters()).device
    with torch.inference_mode():
        x = images.to(dev, non_blocking=True)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16):
                return backbone(x)
        return backbone(x)


def compute_features(backbone: Backbone, images: torch.Tensor) -> dict[str, np.ndarray]:
    """images float32 (B, 3, S, S) normalised -> {level: float32 (B, C, H, W)} on the CPU."""
    return {k: v.float().cpu().numpy() for k, v in forward(backbone, images).items()}


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]


class _ItemViews(torch.utils.data.Dataset):
    """A ``ViewDataset`` whose items come with their index: item (view, path, paste, masks) ->
    (normalised view float32 (3, S, S), error or '', masks as RLE bytes or None). Holds only the
    backbone's normalisation, so a DataLoader worker gets nothing that grows with the run."""

    def __init__(self, mean, std, masks: bool):
        self.mean, self.std, self.masks = tuple(mean), tuple(std), masks

    def __getitem__(self, item):
        view, path, paste, masks = item
        views = ViewDataset(
            [view], [path], self.mean, self.std, skip_bad=True, pastes=[paste],
            masks=[masks] if self.masks else None,
        )  # fmt: skip
        return views[0]


class _ShardBatches:
    """The batch sampler of ``ShardRunner.loader``: each task's views in batches of its
    ``batch_size`` (the last one of a shard shorter), each batch a list of its items (view, path,
    paste, masks), made when the loader draws it."""

    def __init__(self, tasks: list[ShardTask]):
        self.tasks = tasks

    def __iter__(self):
        for task in self.tasks:
            n, b = len(task.views), task.batch_size
            masks = task.masks if task.masks is not None else (None,) * n
            items = list(zip(task.views, task.paths, task.pastes, masks))
            for i in range(0, n, b):
                yield items[i : i + b]

    def __len__(self) -> int:
        return sum(-(-len(t.views) // t.batch_size) for t in self.tasks)


@dataclass
class ComputedShard:
    """One shard's encoded features, ready to write: {level: (n, C, H, W)} storage dtype, for
    uint8 stores {level: (n, C, 2)} quant params, and the views' masks (RLE bytes per object)."""

    blocks: dict[str, np.ndarray]
    quant: dict[str, np.ndarray] | None
    skipped: list[dict]
    seconds: float
    masks: list[list[bytes]] | None = None


class _Assembler:
    """Encodes one shard's batches straight into the shard's host arrays (allocated once, at the
    first batch) and hands them out as a ``ComputedShard``."""

    def __init__(self, task: ShardTask):
        self.task, self.done, self.t0 = task, 0, time.perf_counter()
        self.blocks: dict[str, np.ndarray] = {}
        self.quant: dict[str, list[np.ndarray]] = {}
        self.skipped, self.masks = [], []

    def add(self, errors: list[str], view_masks: list, feats: dict[str, torch.Tensor]):
        """One batch: its per-view errors ("" when fine), masks and features {level: (B, C, H, W)}
        on the device."""
        task = self.task
        for i, err in enumerate(errors):
            if err and not task.skip_bad:
                raise CachedetError(err)
            if err:
                view = self.done + i
                self.skipped.append(
                    {"view": task.start + view, "image_id": task.views[view].image_id, "error": err}
                )
        self.masks += view_masks
        a, b = self.done, self.done + len(errors)
        with torch.inference_mode():
            self._check_finite(feats, a, errors)
            for name, x in feats.items():
                if name not in self.blocks:
                    c, h, w = x.shape[1:]
                    shape = (len(task.views), schema.stored_channels(c, task.dtype), h, w)
                    self.blocks[name] = np.empty(shape, dtype=schema.zarr_dtype(task.dtype))
                params = schema.encode_into(x, task.dtype, self.blocks[name][a:b])
                if params is not None:
                    self.quant.setdefault(name, []).append(params)
        self.done = b

    def _check_finite(self, feats: dict[str, torch.Tensor], first: int, errors: list[str]):
        """Refuse features the store's dtype cannot hold (NaN, inf, or beyond float16's 65504),
        naming the first such image, view and level: stored, they would become inf silently."""
        limit = schema.FINITE_LIMIT.get(self.task.dtype, float("inf"))
        for name, x in feats.items():
            bad = (~torch.isfinite(x) | (x.abs() > limit)).flatten(1).any(1)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                if errors[i]:  # an unreadable image skipped with skip_bad: its zeros are fine
                    continue
                view = self.task.views[first + i]
                top = (
                    float(x[i][torch.isfinite(x[i])].abs().max())
                    if torch.isfinite(x[i]).any()
                    else float("nan")
                )
                raise NonFiniteFeatures(
                    f"{self.task.paths[first + i]}: image {view.image_id}, view {view.view_index}, "
                    f"level {name}: features beyond {self.task.dtype}'s range (largest finite "
                    f"|x| {top:.4g}, non-finite or > {limit:g} present) would be stored as inf; "
                    "extract with ExtractConfig.dtype float32 (or bfloat16), or check the backbone's weights"
                )

    def full(self) -> bool:
        return self.done == len(self.task.views)

    def result(self) -> ComputedShard:
        return ComputedShard(
            blocks=self.blocks,
            quant={k: np.concatenate(v) for k, v in self.quant.items()} if self.quant else None,
            skipped=self.skipped,
            seconds=time.perf_counter() - self.t0,
            masks=self.masks if self.task.masks is not None else None,
        )


class ShardRunner:
    """Owns one frozen backbone on one device and computes shards with it: one DataLoader over all
    the shards' views (its decode workers live for the whole run), batches never span two shards
    (so a shard's bytes do not depend on which other shards run), pinned host memory and
    non-blocking copies on CUDA, encoding on the device. Writes are not its business."""

    def __init__(self, cfg: BackboneConfig, device: str, backbone: Backbone | None = None):
        self.cfg, self.device = cfg, device
        self.backbone = backbone if backbone is not None else load_backbone(cfg, device)
        self.pin = resolve_device(device).type == "cuda"
        self._projections: dict[tuple[str, str], Projection] = {}

    def projection(self, task: ShardTask) -> Projection | None:
        """The projection ``task`` applies, read once from its store and checked against the
        task's sha256 (a store re-made with another map while tasks were queued is refused)."""
        if task.projection is None:
            return None
        key = (task.store, task.projection)
        if key not in self._projections:
            arrays = StoreIndex(task.store).projection_arrays()
            projection = Projection(arrays or {})
            if arrays is None or projection.sha256 != task.projection:
                raise CachedetError(
                    f"ExtractConfig.out {task.store}: its projection is not the one this "
                    "extraction fitted (the store was replaced meanwhile); rerun the command"
                )
            dev = next(self.backbone.parameters()).device
            self._projections = {key: projection.to(dev)}  # one store at a time
        return self._projections[key]

    def loader(self, tasks: list[ShardTask]) -> DataLoader:
        """The DataLoader of ``tasks``' views, batch by batch, never a batch across two shards.
        Its workers hold no view: each batch's own items (view, path, paste, masks) travel to a
        worker with the batch, drawn from the tasks as the loader asks for them, so a worker's
        memory does not grow with the run (nor does a spawned worker's start-up payload)."""
        first = tasks[0]
        dataset = _ItemViews(self.backbone.mean, self.backbone.std, first.masks is not None)
        return DataLoader(
            dataset,
            batch_sampler=_ShardBatches(tasks),
            num_workers=first.loader_workers,
            collate_fn=_collate,
            pin_memory=self.pin,
        )

    def computed(self, tasks: list[ShardTask], on_views=None):
        """Yield (task, ComputedShard) for each task, in order (nothing is written)."""
        if not tasks:
            return
        first = tasks[0]
        if first.threads:
            torch.set_num_threads(first.threads)
        loader = self.loader(tasks)
        queue = iter(tasks)
        shard = _Assembler(next(queue))
        projection = self.projection(first)
        # forked loader workers' garbage collector then leaves the parent's objects (the whole
        # plan) alone, so their pages stay shared instead of being copied into every worker
        frozen = bool(first.loader_workers) and gc.get_freeze_count() == 0
        if frozen:
            gc.freeze()
        try:
            for images, errors, view_masks in loader:
                feats = forward(self.backbone, images)
                if projection is not None:  # on the device, before encoding
                    with torch.inference_mode():
                        feats = projection(feats)
                shard.add(errors, view_masks, feats)
                if on_views:
                    on_views(len(errors))
                if shard.full():
                    yield shard.task, shard.result()
                    task = next(queue, None)
                    shard = _Assembler(task) if task is not None else None
        finally:
            if frozen:  # collectable again once the run ends (or stops)
                gc.unfreeze()


def worker_runner(cfg: BackboneConfig, device: str) -> ShardRunner:
    """On a dask worker, the worker's own runner for (cfg, device), kept between shard tasks (an
    attribute of the ``distributed.Worker``, which owns it); elsewhere a new runner."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return ShardRunner(cfg, device)
    runners = worker.__dict__.setdefault("_cachedet_runners", {})
    if (cfg, device) not in runners:
        runners.clear()  # one backbone per worker: a new config replaces the old one
        runners[(cfg, device)] = ShardRunner(cfg, device)
    return runners[(cfg, device)]


def compute_shard(
    task: ShardTask, on_views=None, runner: ShardRunner | None = None
) -> ComputedShard:
    """Decode, augment, run the backbone and encode every view of one shard (nothing is written)."""
    runner = runner or worker_runner(task.backbone, task.device)
    return next(runner.computed([task], on_views))[1]


def write_shard(task: ShardTask, computed: ComputedShard) -> dict:
    """Write a computed shard's features, then its completion record; return the record."""
    t0 = time.perf_counter()
    try:
        writer = StoreWriter(task.store)
        writer.clear_shard(task.shard)  # what a killed or damaged earlier write left behind
        digests = writer.write_features(task.shard, computed.blocks, task.start, computed.quant)
        if computed.masks is not None:
            digests["masks"] = writer.write_masks(task.shard, computed.masks)
        digests.update(task.rows or {})
    except OSError as e:  # no space, no permission, a lost connection: the shard stays incomplete
        raise CachedetError(
            f"ExtractConfig.out {task.store}: writing shard {task.shard} failed: {e.strerror or e}; "
            "it is not marked complete, rerun the same command to resume"
        ) from None
    record = {
        "shard": task.shard,
        "views": [task.start, task.start + len(task.views)],
        CHECKSUM: digests,
        "skipped": computed.skipped,
        "seconds": round(computed.seconds + time.perf_counter() - t0, 3),  # compute + write
        # the image files the features came from, for reuse after an edit of the annotations
        "images": image_stamps([v.image_id for v in task.views], task.paths),
    }
    try:
        writer.write_record(record)
    except OSError as e:
        raise CachedetError(
            f"ExtractConfig.out {task.store}: writing the completion record of shard {task.shard} failed: "
            f"{e.strerror or e}; rerun the same command to resume"
        ) from None
    return record


def run_shard(task: ShardTask, on_views=None) -> dict:
    """Compute and write one shard; return its completion record (also written to the store)."""
    return write_shard(task, compute_shard(task, on_views))


def default_write_threads() -> int:
    """Threads that compress and write shards (Blosc and the file writes release the GIL)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def run_shards_in_process(
    tasks: list[ShardTask],
    on_views=None,
    runner: ShardRunner | None = None,
    write_threads: int | None = None,
) -> list[dict]:
    """Compute shards one after another while a pool of ``write_threads`` threads compresses and
    writes finished ones, each shard by exactly one thread. At most ``write_threads`` shards wait
    for their write, so memory stays at ``write_threads + 1`` shards. Records in shard order."""
    from concurrent.futures import ThreadPoolExecutor

    if not tasks:
        return []
    runner = runner or ShardRunner(tasks[0].backbone, tasks[0].device)
    threads = write_threads or default_write_threads()
    records, pending = [], deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cachedet-writer") as pool:
        try:
            for task, computed in runner.computed(tasks, on_views):
                while len(pending) >= threads:
                    records.append(pending.popleft().result())
                pending.append(pool.submit(write_shard, task, computed))
            while pending:
                records.append(pending.popleft().result())
        finally:
            for fut in pending:  # an error: let queued writes go, never half-wait on them
                fut.cancel()
    return records


def run_shards_on_dask(
    tasks: list[ShardTask],
    workers: int,
    scheduler: str | None,
    bar,
    worker_timeout: float = 300.0,
    poll: float = 2.0,
) -> list[dict]:
    """Run shard tasks on an existing cluster (``scheduler``) or a LocalCluster of ``workers`` processes.

    Raises CachedetError when the scheduler cannot be reached, or when the cluster has had no
    worker for ``worker_timeout`` seconds while shards remain (workers died or never came): the
    shards finished so far are kept, and rerunning the command resumes after them."""
    from dask.distributed import Client, LocalCluster, wait

    if scheduler:
        try:
            client, cluster = Client(scheduler, timeout=min(worker_timeout, 60)), None
        except (OSError, TimeoutError) as e:
            raise CachedetError(
                f"ExtractConfig.scheduler {scheduler}: no dask scheduler answers there "
                f"({type(e).__name__}); start it, or run without ExtractConfig.scheduler"
            ) from None
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        pending, records = set(client.map(run_shard, tasks, pure=False)), []
        seen = time.monotonic()  # when the cluster last had a worker
        while pending:
            try:
                done, _ = wait(list(pending), timeout=poll, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for fut in done:
                rec = fut.result()
                records.append(rec)
                pending.discard(fut)
                bar.advance(rec["views"][1] - rec["views"][0])
            if done or client.scheduler_info().get("workers"):
                seen = time.monotonic()
            elif time.monotonic() - seen > worker_timeout:
                raise CachedetError(
                    f"ExtractConfig.scheduler {scheduler or 'local cluster'}: no dask worker for "
                    f"{worker_timeout:.0f} s with {len(pending)} shard(s) left ({len(records)} "
                    "finished and kept); start workers, then rerun the same command to resume "
                    "(ExtractConfig.worker_timeout sets the wait)"
                )
        return records
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
