"""Shards, the unit of extraction work: decode + augment + Copy-Paste -> frozen backbone -> encode
-> write features (and the views' instance masks) -> write the completion record. In-process (a
writer thread overlaps a shard's write with the next shard's compute) or on dask workers (one
shard per task).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from cachedet.backbones import Backbone, BackboneConfig, build_backbone
from cachedet.cache import schema
from cachedet.cache.store import StoreWriter
from cachedet.data.copy_paste import PastePlan
from cachedet.data.images import ViewDataset
from cachedet.data.masks import MaskSource
from cachedet.errors import CachedetError
from cachedet.runtime import resolve_device
from cachedet.structures import ViewParams


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


@functools.lru_cache(maxsize=2)
def worker_backbone(cfg: BackboneConfig, device: str) -> Backbone:
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
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]


@dataclass
class ComputedShard:
    """One shard's encoded features, ready to write: {level: (n, C, H, W)} storage dtype, for
    uint8 stores {level: (n, C, 2)} quant params, and the views' masks (RLE bytes per object)."""

    blocks: dict[str, np.ndarray]
    quant: dict[str, np.ndarray] | None
    skipped: list[dict]
    seconds: float
    masks: list[list[bytes]] | None = None


def compute_shard(task: ShardTask, on_views=None) -> ComputedShard:
    """Decode, augment, run the backbone and encode every view of one shard (nothing is written)."""
    if task.threads:
        torch.set_num_threads(task.threads)
    backbone = worker_backbone(task.backbone, task.device)
    t0 = time.perf_counter()  # the backbone is built once per process, outside the shard's time
    loader = DataLoader(
        ViewDataset(
            list(task.views),
            list(task.paths),
            backbone.mean,
            backbone.std,
            skip_bad=True,
            pastes=list(task.pastes),
            masks=list(task.masks) if task.masks is not None else None,
        ),
        batch_size=task.batch_size,
        num_workers=task.loader_workers,
        collate_fn=_collate,
    )
    blocks: dict[str, list[np.ndarray]] = {}
    quant: dict[str, list[np.ndarray]] = {}
    skipped, done, masks = [], 0, []
    for images, errors, view_masks in loader:
        masks += view_masks
        for i, err in enumerate(errors):
            if err:
                if not task.skip_bad:
                    raise CachedetError(err)
                view = task.start + done + i
                skipped.append(
                    {"view": view, "image_id": task.views[done + i].image_id, "error": err}
                )
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
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        masks=masks if task.masks is not None else None,
    )


def write_shard(task: ShardTask, computed: ComputedShard) -> dict:
    """Write a computed shard's features, then its completion record; return the record."""
    t0 = time.perf_counter()
    try:
        writer = StoreWriter(task.store)
        digests = writer.write_features(task.shard, computed.blocks, task.start, computed.quant)
        if computed.masks is not None:
            digests["masks"] = writer.write_masks(task.shard, computed.masks)
    except OSError as e:  # no space, no permission, a lost connection: the shard stays incomplete
        raise CachedetError(
            f"--out {task.store}: writing shard {task.shard} failed: {e.strerror or e}; "
            "it is not marked complete, rerun the same command to resume"
        ) from None
    record = {
        "shard": task.shard,
        "views": [task.start, task.start + len(task.views)],
        "sha256": digests,
        "skipped": computed.skipped,
        "seconds": round(computed.seconds + time.perf_counter() - t0, 3),  # compute + write
    }
    try:
        writer.write_record(record)
    except OSError as e:
        raise CachedetError(
            f"--out {task.store}: writing the completion record of shard {task.shard} failed: "
            f"{e.strerror or e}; rerun the same command to resume"
        ) from None
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


def run_shards_on_dask(
    tasks: list[ShardTask], workers: int, scheduler: str | None, bar
) -> list[dict]:
    """Run shard tasks on an existing cluster (``scheduler``) or a LocalCluster of ``workers`` processes."""
    from dask.distributed import Client, LocalCluster, as_completed

    if scheduler:
        client, cluster = Client(scheduler), None
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
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
