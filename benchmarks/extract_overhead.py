"""Extraction's CPU-side overhead against its primitives, with the backbone stubbed out (issue 15).

The backbone is replaced by a stub that returns, instantly, fixed ReLU-like float32 tensors of a
declared backbone's shapes (ResNet-50: 256/512/1024/2048 channels at strides 4/8/16/32), so what
is left is the host's share of extraction: decode, augment, device copy, encode, compress, write,
and the checksum (CRC-32C) of each level that the completion record keeps for ``verify``.
For each config it reports, in core-milliseconds per view (process CPU time, all threads, every
thread of the process on one core; see ``one_core``):

- the whole pipeline (``run_shards_in_process``: DataLoader, encode, write pool, records);
- each stage as the pipeline runs it (cachedet's functions on the same views);
- beside each, the primitive alone on the same bytes: PIL decode of the file, torchvision's
  antialiased bilinear resize to the view's size (the resize LSJ makes; normalising, flipping and
  padding count as overhead), a memory copy, a float16 cast, the Blosc codec (one thread, as zarr
  calls it) on each view's stored chunk, a plain file write of the compressed bytes to new files (as every shard is a new file);
- pipeline runs, stage calls and primitive calls taken in turn, round after round, so that drifts
  in load and page-cache state hit both sides alike;
- views/s with 1 and 2 worker processes, each pinned to its own core and running an equal share
  of whole shards with one runner (as a dask worker keeps its runner between shard tasks), the
  stores in RAM (/dev/shm) so that the kernel's writeback to the disk is not counted;
- the cached feed: ``CachedViews`` reading and decoding the store against a plain zarr read plus
  float32 decode of the same blocks, and reading float16 as stored (train-heads on CUDA with
  autocast) against a plain zarr read; views/s in one spawned process of its own (the feed changes
  its process's allocator settings, which must not reach the next config).

Run: ``flock /tmp/cpu-bench.lock python benchmarks/extract_overhead.py`` (writes
``benchmarks/results/extract_overhead.{json,md}``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import cachedet.extraction.run as extract_mod
import cachedet.extraction.shards as shards
from cachedet.backbones.backbone import BackboneConfig
from cachedet.cache.store import CHECKSUM
from cachedet.core.structures import FeatureSpec
from cachedet.data.views import AugmentConfig
from cachedet.tools.bench import machine_info

R50 = {"c2": (256, 4), "c3": (512, 8), "c4": (1024, 16), "c5": (2048, 32)}
CONFIGS = [  # name, levels, canvas, source image (w, h)
    ("r50_c3-c5_640", ("c3", "c4", "c5"), 640, (640, 480)),
    ("r50_c2-c5_640", ("c2", "c3", "c4", "c5"), 640, (640, 480)),
    ("r50_c3-c5_1024", ("c3", "c4", "c5"), 1024, (1280, 960)),
    ("r50_c2-c5_1024", ("c2", "c3", "c4", "c5"), 1024, (1280, 960)),
]
IMAGES, VIEWS, SHARD_VIEWS, BATCH = 24, 2, 4, 2  # 48 views, 12 shards (6 per process for views/s)


class StubBackbone(torch.nn.Module):
    """Instantly returns fixed features of ResNet-50's shapes for ``levels`` (benchmark only)."""

    def __init__(self, levels: tuple[str, ...], size: int):
        super().__init__()
        self.levels, self.size = levels, size
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the stub a device
        self.specs = [FeatureSpec(k, R50[k][0], R50[k][1]) for k in levels]
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        self.identity = {"name": "stub_resnet50", "out_indices": list(range(len(levels)))}
        self.identity.update(weights="stub", weights_sha256=None, mean=self.mean, std=self.std)
        g = torch.Generator().manual_seed(0)
        self.out = {  # ReLU outputs: about half exact zeros, as ResNet stages give
            k: torch.randn(BATCH, R50[k][0], size // R50[k][1], size // R50[k][1], generator=g)
            .relu_()
            .mul_(0.5)
            for k in levels
        }

    def feature_shapes(self, size: int) -> dict[str, tuple[int, int, int]]:
        return {k: tuple(v.shape[1:]) for k, v in self.out.items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[: len(images)] for k, v in self.out.items()}


def install_stub(levels, size):
    stub = StubBackbone(tuple(levels), size)
    extract_mod.build_backbone = shards.build_backbone = lambda *a, **k: stub
    return stub


def natural_jpeg(path: str, w: int, h: int, seed: int):
    """A smooth gradient with blobs and grain, JPEG quality 90 (sizes like camera photos)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 200, y / h * 180, (x + y) / (w + h) * 160], axis=-1)
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, w / 4)
        img += (((y - cy) ** 2 + (x - cx) ** 2) < r * r)[..., None] * rng.uniform(-60, 60, 3)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_dataset(root: str, wh: tuple[int, int], count: int = IMAGES) -> dict:
    os.makedirs(root, exist_ok=True)
    w, h = wh
    images, anns = [], []
    for i in range(count):
        natural_jpeg(os.path.join(root, f"{i}.jpg"), w, h, i)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                     "bbox": [w / 4, h / 4, w / 3, h / 3], "area": w * h / 9})  # fmt: skip
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "blob"}]}
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(data, f)
    return {"train": os.path.join(root, "train.json"), "images": root}


def planned_tasks(data: dict, out: str, size: int, loader_workers: int = 0):
    """A laid-out store and its shard tasks, as ``extract`` makes them (no shard written)."""
    from cachedet.data.coco import load_detection_dataset

    cfg = extract_mod.ExtractConfig(
        annotations=data["train"], images=data["images"], out=out,
        backbone=BackboneConfig("stub_resnet50", None, "random"),
        augment=AugmentConfig(size=size, seed=0), views=VIEWS, shard_views=SHARD_VIEWS,
        batch_size=BATCH, device="cpu", loader_workers=loader_workers, overwrite=True,
    )  # fmt: skip
    dataset = load_detection_dataset(cfg.annotations, cfg.images)
    plan = extract_mod.plan_views(dataset, cfg.augment, cfg.views)
    backbone = extract_mod.build_backbone(cfg.backbone)
    header = extract_mod._header(cfg, backbone, dataset, plan, None, False)
    extract_mod.prepare_store(cfg, header, plan)
    return extract_mod.shard_tasks(cfg, cfg.backbone, None, plan), backbone, plan


ROUNDS = 7  # pipeline runs, stage calls and primitive calls are taken in turn this many times


def cpu_ms(fn) -> float:
    """Process CPU milliseconds (all threads) of one call of ``fn``."""
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1000


def pipeline_runs(data, work, size):
    """A function that runs the whole pipeline once, into a new store, and returns its core-ms
    per view (after one warm-up shard: imports, allocator)."""
    tasks, backbone, _ = planned_tasks(data, os.path.join(work, "warm.zarr"), size)
    runner = shards.ShardRunner(tasks[0].backbone, "cpu", backbone=backbone)
    shards.run_shards_in_process(tasks[:1], runner=runner)
    runs = itertools.count()

    def run() -> float:
        tasks, _, _ = planned_tasks(data, os.path.join(work, f"pipe{next(runs)}.zarr"), size)
        n = sum(len(t.views) for t in tasks)
        return cpu_ms(lambda: shards.run_shards_in_process(tasks, runner=runner)) / n

    return run


def stage_calls(data, work, size, backbone) -> dict:
    """Each stage as the pipeline runs it and each primitive alone on the same bytes, as
    {"pipeline": {stage: (fn, views per call)}, "primitives": {...}, "raw_bytes", "stored_bytes"}.

    Writes go to new files every call, as the pipeline's do: rewriting a file just written lets
    the kernel drop its dirty pages before they reach the disk, which made a plain write 2-4x
    cheaper than writing the same bytes to a new file (and a zarr shard rewrite reads it back)."""
    import numcodecs
    import torchvision.transforms.v2.functional as TF

    from cachedet.cache import schema
    from cachedet.cache.store import StoreWriter, features_checksum, write_level
    from cachedet.data.decode import read_image
    from cachedet.data.views import normalize, transform_image

    tasks, _, _ = planned_tasks(data, os.path.join(work, "stages.zarr"), size)
    assert len(tasks) >= ROUNDS, "a new shard for each call of the compress + write stage"
    task = tasks[0]
    k = len(task.views)
    params = task.views[0]
    img = read_image(task.paths[0], params.orig_size)
    hw, as_float = params.resized_size, img.float()
    images = torch.randn(BATCH, 3, size, size)
    feats = backbone(images)
    out = {n: np.empty(tuple(v.shape), dtype=np.float16) for n, v in feats.items()}
    blocks = shards.compute_shard(task, runner=shards.ShardRunner(None, "cpu", backbone)).blocks
    codec = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    numcodecs.blosc.use_threads = False  # one thread, as zarr calls it from its pool's threads
    per_view = {n: [b[i] for i in range(k)] for n, b in blocks.items()}
    compressed = [codec.encode(v) for vs in per_view.values() for v in vs]
    calls = itertools.count()

    def plain_write():  # one new file per level, as a zarr shard is (its views' chunks in a row)
        folder = os.path.join(work, f"plain_{next(calls)}")
        os.makedirs(folder)
        for i, n in enumerate(per_view):
            with open(os.path.join(folder, n), "wb") as f:
                for c in compressed[i * k : (i + 1) * k]:
                    f.write(c)

    # the pipeline writes a shard's levels with zarr (compress and write in one call), then
    # checksums them for the completion record (verify's; no primitive: it is cachedet's own check)
    writer = StoreWriter(task.store)
    shard_starts = iter(t.start for t in tasks)

    def compress_write():  # a new shard each call
        start = next(shard_starts)
        for n, b in blocks.items():
            write_level(writer.group[f"features/{n}"], start, b)

    pipeline = {
        "decode": (lambda: read_image(task.paths[0], params.orig_size), 1),
        "augment": (
            lambda: transform_image(params, normalize(img, backbone.mean, backbone.std)),
            1,
        ),
        "device_copy": (lambda: images.to("cpu", non_blocking=True), BATCH),
        "encode": (
            lambda: [schema.encode_into(v, "float16", out[n]) for n, v in feats.items()],
            BATCH,
        ),
        "compress_write": (compress_write, k),
        "digest": (lambda: [features_checksum(b) for b in blocks.values()], k),
    }
    primitives = {
        "decode": (lambda: Image.open(task.paths[0]).convert("RGB").load(), 1),
        "augment": (lambda: TF.resize(as_float, list(hw), antialias=True), 1),
        "device_copy": (lambda: images.clone(), BATCH),
        "encode": (lambda: [v.half() for v in feats.values()], BATCH),
        "compress": (lambda: [codec.encode(v) for vs in per_view.values() for v in vs], k),
        "write": (plain_write, k),
    }
    return {
        "pipeline": pipeline,
        "primitives": primitives,
        "raw_bytes": sum(b.nbytes for b in blocks.values()) / k,
        "stored_bytes": sum(len(c) for c in compressed) / k,
    }


@contextlib.contextmanager
def one_core():
    """Every thread of this process (and those it starts) on one core, as a worker process on a
    machine whose cores all work: unpinned, the pipeline's threads and Blosc's migrate between
    the cores with cold caches, which cost this 2-core VM up to a third more CPU time for the same
    compression (24 core-ms pinned to either core, 31-33 unpinned, for one 6.5 MB block)."""
    before = os.sched_getaffinity(0)
    pin_threads({min(before)})
    try:
        yield
    finally:
        pin_threads(before)


def pin_threads(cores: set[int]):
    """Every thread this process has now (and those they start) on ``cores``: an affinity set
    with pid 0 reaches only the calling thread, and zarr's I/O thread, which starts its codec
    threads, may already run."""
    for tid in [int(t) for t in os.listdir("/proc/self/task")]:
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # a pool thread that has ended
            pass


def measure(data, work, size, backbone) -> dict:
    """``ROUNDS`` rounds, each one pipeline run, then one call of every stage and primitive, so
    that drifts in load and page-cache state hit both sides alike, all on one core. Core-ms per
    view: medians over the rounds; the ratio is the median of the rounds' ratios."""
    with one_core():
        return _measure(data, work, size, backbone)


def _measure(data, work, size, backbone) -> dict:
    run = pipeline_runs(data, work, size)
    calls = stage_calls(data, work, size, backbone)  # 12 shards: a new one for each write
    rounds = []
    for _ in range(ROUNDS):
        r = {"total": run()}
        for side in ("pipeline", "primitives"):
            r[side] = {name: cpu_ms(fn) / per for name, (fn, per) in calls[side].items()}
        r["ratio"] = r["total"] / sum(r["primitives"].values())
        rounds.append(r)

    def median(key, side=None):
        return statistics.median(r[side][key] if side else r[key] for r in rounds)

    return {
        "total": median("total"),
        "primitives_total": statistics.median(sum(r["primitives"].values()) for r in rounds),
        "ratio": median("ratio"),
        "ratios": [round(r["ratio"], 3) for r in rounds],
        "pipeline": {n: median(n, "pipeline") for n in calls["pipeline"]},
        "primitives": {n: median(n, "primitives") for n in calls["primitives"]},
        "raw_bytes": calls["raw_bytes"],
        "stored_bytes": calls["stored_bytes"],
    }


def _worker_init(levels, size, next_core):
    """One core per worker process (all its threads on it), so that 1 and 2 processes compare
    one core against two, not one process that already spreads its writer threads over both."""
    with next_core.get_lock():
        core = next_core.value
        next_core.value += 1
    cores = sorted(os.sched_getaffinity(0))
    pin_threads({cores[core % len(cores)]})
    torch.set_num_threads(1)
    install_stub(levels, size)


def _work(tasks) -> int:
    backbone = shards.build_backbone(None)
    return len(
        shards.run_shards_in_process(tasks, runner=shards.ShardRunner(None, "cpu", backbone))
    )


RAM_DISK = "/dev/shm"  # where views/s writes its stores, when the machine has one


def views_per_s(data, levels, size, procs: int) -> float:
    """Whole shards on ``procs`` spawned processes (1 torch thread each, each pinned to its own
    core), each an equal share of the shards with one runner, after a warm-up shard per process.

    The stores go to ``RAM_DISK``: on a disk, the kernel's writeback runs on the same cores as the
    workers. With 1 process it takes the idle core; with 2 it takes the workers' time, so the
    ratio measured the disk and the kernel's share as well as cachedet's scaling (1.56-2.07 from
    run to run here; the disk's own limit is the third one ``gpu_suite`` sets beside these)."""
    ctx = mp.get_context("spawn")
    next_core = ctx.Value("i", 0)
    scratch = tempfile.mkdtemp(prefix="extract_overhead_", dir=ram_disk())
    try:
        with ctx.Pool(procs, initializer=_worker_init, initargs=(levels, size, next_core)) as pool:
            warm, _, _ = planned_tasks(data, os.path.join(scratch, "warm.zarr"), size)
            pool.map(_work, [[t] for t in warm[:procs]], chunksize=1)
            tasks, _, _ = planned_tasks(data, os.path.join(scratch, "run.zarr"), size)
            t = time.perf_counter()
            pool.map(_work, [tasks[i::procs] for i in range(procs)], chunksize=1)
            return sum(len(x.views) for x in tasks) / (time.perf_counter() - t)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


SCALING_ROUNDS = 3  # 1-process and 2-process runs taken in turn


def scaling(data, levels, size) -> dict:
    """Views/s with 1 and 2 processes, runs taken in turn ``SCALING_ROUNDS`` times: medians, and
    the median of the rounds' ratios (a single pair moved by up to 0.4 on this 2-core VM)."""
    pairs = [
        (views_per_s(data, levels, size, 1), views_per_s(data, levels, size, 2))
        for _ in range(SCALING_ROUNDS)
    ]
    return {
        "views_per_s_1": round(statistics.median(p[0] for p in pairs), 2),
        "views_per_s_2": round(statistics.median(p[1] for p in pairs), 2),
        "scaling_2_over_1": round(statistics.median(p[1] / p[0] for p in pairs), 3),
        "scaling_per_round": [round(p[1] / p[0], 3) for p in pairs],
    }


def ram_disk() -> str | None:
    return RAM_DISK if os.path.isdir(RAM_DISK) and os.access(RAM_DISK, os.W_OK) else None


def feed(work, size, rounds: int) -> dict:
    """One process: CachedViews over a store against plain zarr reads + decode of the same blocks
    (wall-clock views/s), and the same for float16 as stored (``keep_float16``: what train-heads
    reads on CUDA with autocast, which casts on the device) against plain reads alone. Each
    dataset is built once and iterated each pass, as a training run does every epoch; passes of
    the four are taken in turn, ``rounds`` times: medians, and the medians of the passes' ratios."""
    import zarr

    from cachedet.cache import schema
    from cachedet.cache.dataset import CachedViews
    from cachedet.cache.store import StoreReader
    from cachedet.core.runtime import retain_freed_memory

    retain_freed_memory()  # as train-heads sets it first, before zarr starts its threads
    url = os.path.join(work, "pipe0.zarr")  # written by the first pipeline run
    reader = StoreReader(url)
    n = reader.num_views
    datasets = [
        CachedViews(url, views_per_epoch=VIEWS, shuffle_buffer=4, keep_float16=half)
        for half in (False, True)
    ]
    epochs = itertools.count()

    def cached(dataset):
        dataset.set_epoch(next(epochs))
        assert sum(1 for _ in dataset) == n

    def plain(decode: bool):
        g = zarr.open_group(url, mode="r")
        for a in range(0, n, SHARD_VIEWS):
            for s in reader.specs:
                x = g[f"features/{s.name}"][a : a + SHARD_VIEWS]
                if decode:
                    schema.decode(x, "float16")

    def seconds(fn, *args) -> float:
        t = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t

    sides = [(cached, datasets[0]), (plain, True), (cached, datasets[1]), (plain, False)]
    for fn, arg in sides:  # warm-up: each side opens its store
        fn(arg)
    passes = [[seconds(fn, arg) for fn, arg in sides] for _ in range(rounds)]
    rate = [n / statistics.median(p[i] for p in passes) for i in range(len(sides))]
    return {
        "views_per_s_per_worker": rate[0],
        "plain_read_views_per_s": rate[1],
        "ratio": statistics.median(p[1] / p[0] for p in passes),
        "float16_views_per_s_per_worker": rate[2],
        "float16_plain_read_views_per_s": rate[3],
        "float16_ratio": statistics.median(p[3] / p[2] for p in passes),
    }


def verify_cost(work, rounds: int) -> dict:
    """One process: the cached feed with its read check (``verify_reads``, each shard block
    compared with its completion record's CRC-32C) against the same feed without it, float32 and
    float16 as stored. A reader checks each shard once, so every pass builds its datasets anew:
    each pass is a first epoch, where every block is checked. Passes of the four sides (and the check's
    CRC-32C pass alone, on bytes already read) are taken in turn, ``rounds`` times: medians, and
    the medians of the passes' ratios (with / without; CRC-32C CPU time / unchecked feed's)."""
    from cachedet.cache.dataset import CachedViews
    from cachedet.cache.store import StoreReader, features_checksum
    from cachedet.core.runtime import retain_freed_memory

    retain_freed_memory()
    url = os.path.join(work, "pipe0.zarr")
    n = StoreReader(url).num_views

    def seconds(verify: bool, half: bool) -> tuple[float, float]:
        """(wall, process CPU) seconds of one first epoch."""
        dataset = CachedViews(
            url, views_per_epoch=VIEWS, shuffle_buffer=4, keep_float16=half, verify_reads=verify
        )
        dataset.set_epoch(0)
        t, c = time.perf_counter(), time.process_time()
        assert sum(1 for _ in dataset) == n
        return time.perf_counter() - t, time.process_time() - c

    sides = [(True, False), (False, False), (True, True), (False, True)]
    for side in sides:  # warm-up: page cache, allocator
        seconds(*side)
    reader = StoreReader(url)  # the check's own work: one CRC-32C pass over each shard's bytes
    stored = [
        {s.name: reader.read_stored(s.name, slice(*rec["views"])) for s in reader.specs}
        for _, rec in sorted(reader.shard_records().items())
    ]

    def checksums() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for levels in stored:
            for x, q in levels.values():
                features_checksum(x, q)
        return time.perf_counter() - t, time.process_time() - c

    passes = [[seconds(*side) for side in sides] + [checksums()] for _ in range(rounds)]
    rate = [n / statistics.median(p[i][0] for p in passes) for i in range(len(sides))]

    def ratio(a: int, b: int, clock: int) -> float:
        return statistics.median(p[a][clock] / p[b][clock] for p in passes)

    return {
        "verified_views_per_s": rate[0],
        "unverified_views_per_s": rate[1],
        "verify_ratio": ratio(0, 1, 0),
        "verify_cpu_ratio": ratio(0, 1, 1),
        "float16_verified_views_per_s": rate[2],
        "float16_unverified_views_per_s": rate[3],
        "float16_verify_ratio": ratio(2, 3, 0),
        "float16_verify_cpu_ratio": ratio(2, 3, 1),
        "checksum_cpu_share": ratio(4, 1, 1),  # CRC-32C CPU time / the unchecked feed's
        "float16_checksum_cpu_share": ratio(4, 3, 1),
        "verify_ratio_per_pass": [round(p[0][0] / p[1][0], 3) for p in passes],
        "verify_cpu_ratio_per_pass": [round(p[0][1] / p[1][1], 3) for p in passes],
    }


def feed_in_new_process(work, size) -> dict:
    """``feed`` in a spawned process (1 torch thread): CachedViews keeps freed memory for reuse in
    the process that reads (``runtime.retain_freed_memory``), which must not reach the next
    config's pipeline and primitives."""
    with mp.get_context("spawn").Pool(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return {**pool.apply(feed, (work, size, ROUNDS)), **pool.apply(verify_cost, (work, ROUNDS))}


def feed_only(name, levels, size, wh, work) -> dict:
    """The cached feed's measurements alone (``--feed-only``), on a store the pipeline writes once."""
    torch.set_num_threads(1)
    install_stub(levels, size)
    data = make_dataset(os.path.join(work, "data"), wh)
    tasks, backbone, _ = planned_tasks(data, os.path.join(work, "pipe0.zarr"), size)
    shards.run_shards_in_process(
        tasks, runner=shards.ShardRunner(tasks[0].backbone, "cpu", backbone=backbone)
    )
    before = open("/proc/loadavg").read().split()[:3]
    entry = {
        k: v if isinstance(v, list) else round(v, 3 if "ratio" in k or "share" in k else 2)
        for k, v in feed_in_new_process(work, size).items()
    }
    return {"name": name, **entry, "loadavg": [before, open("/proc/loadavg").read().split()[:3]]}


def run_config(name, levels, size, wh, work) -> dict:
    torch.set_num_threads(1)  # core-ms: one core does the work, as in one worker process
    backbone = install_stub(levels, size)
    data = make_dataset(os.path.join(work, "data"), wh)
    jpeg_kb = np.mean(
        [os.path.getsize(os.path.join(data["images"], f"{i}.jpg")) for i in range(IMAGES)]
    )
    m = measure(data, work, size, backbone)
    entry = {
        "name": name,
        "canvas": size,
        "levels": list(levels),
        "source_image": list(wh),
        "jpeg_kb": round(float(jpeg_kb) / 1024, 1),
        "bytes_per_view_raw": int(m["raw_bytes"]),
        "bytes_per_view_stored": int(m["stored_bytes"]),
        "pipeline_ms_per_view": round(m["total"], 1),
        "primitives_ms_per_view": round(m["primitives_total"], 1),
        "ratio": round(m["ratio"], 3),
        "ratio_per_round": m["ratios"],
        "stages_ms_per_view": {k: round(v, 2) for k, v in m["pipeline"].items()},
        "primitive_ms_per_view": {k: round(v, 2) for k, v in m["primitives"].items()},
    }
    entry.update(scaling(data, levels, size))
    entry["feed"] = {
        k: v if isinstance(v, list) else round(v, 3 if "ratio" in k or "share" in k else 2)
        for k, v in feed_in_new_process(work, size).items()
    }
    return entry


def machine() -> dict:
    import numcodecs
    import zarr

    return {
        **machine_info(),
        "loadavg_before": open("/proc/loadavg").read().split()[:3],
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "pillow": Image.__version__,
    }


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [
        "# Extraction overhead against its primitives (stub backbone, CPU)",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), load average {' '.join(m['loadavg_before'])} before, "
        f"{' '.join(res['loadavg_after'])} after; Python {m['python']}, torch {m['torch']}, zarr "
        f"{m['zarr']}, numcodecs {m['numcodecs']}, Pillow {m['pillow']}. {IMAGES * VIEWS} views per "
        f"run and config, shards of {SHARD_VIEWS}, batch {BATCH}, "
        f"float16, zstd. Core-ms per view, medians of {ROUNDS} rounds that each take one pipeline "
        "run, then one call of every stage and primitive (every write to new files); the ratio is "
        "the median of the rounds' ratios (all rounds in the JSON). While core-ms are measured, "
        "every thread of the process runs on one core: unpinned, threads migrating between this "
        "VM's two cores cost up to a third more CPU time for the same work, on either side. "
        f"Views/s with every thread of each worker process pinned to its own core, writing to "
        f"{ram_disk() or 'the disk'} (see views_per_s), {SCALING_ROUNDS} runs of each in turn "
        "(medians; 2/1 is the median of the runs' ratios).",
        "",
        "| config | stored MB/view | pipeline | primitives | ratio | views/s 1 proc | 2 procs | 2/1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in res["configs"]:
        out.append(
            f"| {c['name']} | {c['bytes_per_view_stored'] / 1e6:.1f} (raw {c['bytes_per_view_raw'] / 1e6:.1f}) "
            f"| {c['pipeline_ms_per_view']} | {c['primitives_ms_per_view']} | {c['ratio']} "
            f"| {c['views_per_s_1']} | {c['views_per_s_2']} | {c['scaling_2_over_1']} |"
        )
    out += [
        "",
        "Per stage, pipeline / primitive (core-ms per view; compress and write are one zarr call; the "
        "pipeline total also holds the DataLoader, batching and the completion record):",
        "",
    ]
    out += [
        f"| config | decode | augment | device copy | encode | compress + write | digest ({CHECKSUM}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in res["configs"]:
        s, p = c["stages_ms_per_view"], c["primitive_ms_per_view"]
        out.append(
            f"| {c['name']} | {s['decode']} / {p['decode']} | {s['augment']} / {p['augment']} "
            f"| {s['device_copy']} / {p['device_copy']} | {s['encode']} / {p['encode']} "
            f"| {s['compress_write']} / {p['compress'] + p['write']:.2f} | {s['digest']} / - |"
        )
    out += [
        "",
        f"Cached feed, one process (views/s, medians of {ROUNDS} passes each, in turn; the "
        "ratio is the median of the passes' ratios): CachedViews / plain zarr read + decode to "
        "float32 (what train-heads reads on a CPU), and float16 as stored (``keep_float16``, "
        "what it reads on CUDA with autocast, the default there) / plain zarr read",
        "",
    ]
    out += [
        "| config | CachedViews | plain read + decode | ratio | float16 CachedViews "
        "| plain read | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in res["feed"]:
        out.append(
            f"| {f['name']} | {f['views_per_s_per_worker']} | {f['plain_read_views_per_s']} "
            f"| {f['ratio']:.2f} | {f['float16_views_per_s_per_worker']} "
            f"| {f['float16_plain_read_views_per_s']} | {f['float16_ratio']:.2f} |"
        )
    checked = [f for f in res["feed"] if "verify_ratio" in f]
    if checked:
        out += [
            "",
            f"Cost of the read check (``verify_reads``: each shard block's CRC-32C against its "
            f"completion record), one process, views/s, medians of {ROUNDS} passes each, in "
            "turn, every pass a first epoch (a reader checks each shard once); the ratios are the "
            "medians of the passes' time with the check / without it (1.03: 3% slower), in wall "
            "time and in process CPU time (less sensitive to the other load on a shared "
            "machine); and the check's own work, one CRC-32C pass over each shard's stored "
            "bytes, timed alone in the same passes, as a share of the unchecked feed's CPU time "
            "(float32 / float16). Load average before and after the feed runs:",
            "",
            "| config | checked | unchecked | ratio wall / CPU | float16 checked | unchecked "
            "| ratio wall / CPU | CRC-32C share | load average |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for f in checked:
            load = " / ".join(" ".join(x) for x in f.get("loadavg", []))
            out.append(
                f"| {f['name']} | {f['verified_views_per_s']} | {f['unverified_views_per_s']} "
                f"| {f['verify_ratio']:.3f} / {f['verify_cpu_ratio']:.3f} "
                f"| {f['float16_verified_views_per_s']} | {f['float16_unverified_views_per_s']} "
                f"| {f['float16_verify_ratio']:.3f} / {f['float16_verify_cpu_ratio']:.3f} "
                f"| {f['checksum_cpu_share']:.2%} / {f['float16_checksum_cpu_share']:.2%} | {load} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None):
    global ROUNDS, SCALING_ROUNDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="configs to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="only the 640-pixel configs")
    ap.add_argument(
        "--out", default=None, help="folder for extract_overhead.{json,md} (default: results/)"
    )
    ap.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"rounds and feed passes (default {ROUNDS})"
    )
    ap.add_argument(
        "--scaling-rounds",
        type=int,
        default=SCALING_ROUNDS,
        help=f"1- and 2-process views/s runs of each (default {SCALING_ROUNDS})",
    )
    ap.add_argument(
        "--feed-only",
        action="store_true",
        help="measure only the cached feed (and its read check) and update those entries of the "
        "existing results",
    )
    args = ap.parse_args(argv)
    SCALING_ROUNDS = args.scaling_rounds  # read by scaling and the markdown
    ROUNDS = args.rounds  # read by measure and the markdown; handed to the feed's process
    names = args.names or [c[0] for c in CONFIGS if not args.quick or "640" in c[0]]
    here = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.feed_only:
        return update_feed(names, here)
    res = {"machine": machine(), "configs": [], "feed": []}
    for name, entry in each_config(names, run_config, "extract_overhead_"):
        res["feed"].append({"name": name, **entry.pop("feed")})
        res["configs"].append(entry)
        print(json.dumps(entry), flush=True)
    res["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    write_results(res, here)


def each_config(names: list[str], measure, prefix: str):
    """(name, ``measure(name, levels, size, wh, work)``) for each config in ``names``, each in its
    own temporary folder, removed afterwards."""
    for name, levels, size, wh in CONFIGS:
        if name not in names:
            continue
        work = tempfile.mkdtemp(prefix=prefix)
        try:
            yield name, measure(name, levels, size, wh, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def write_results(res: dict, here: str):
    os.makedirs(here, exist_ok=True)
    with open(os.path.join(here, "extract_overhead.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(here, "extract_overhead.md"), "w") as f:
        f.write(markdown(res))


def update_feed(names: list[str], here: str):
    """``--feed-only``: measure the feed of ``names`` and replace their feed entries in the
    results under ``here`` (the other measurements stay as they were, from their own run)."""
    with open(os.path.join(here, "extract_overhead.json")) as f:
        res = json.load(f)
    for name, entry in each_config(names, feed_only, "extract_overhead_feed_"):
        res["feed"] = [e for e in res["feed"] if e["name"] != name] + [entry]
        res["feed"].sort(key=lambda e: [c[0] for c in CONFIGS].index(e["name"]))
        print(json.dumps(entry), flush=True)
    write_results(res, here)


if __name__ == "__main__":
    main()
