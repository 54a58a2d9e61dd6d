"""cachedet at COCO / LVIS scale: how annotation loading, view planning and evaluation grow.

    python benchmarks/scale.py [--sizes 1180,11800,118000] [--eval-images 5000] [--quick]

Generates COCO-sized annotation files (``coco_like``: ~7 annotations per image with 16-point polygons,
80 classes) and an LVIS-sized validation file (``lvis_like``: 1,203 classes with r/c/f frequencies,
``neg_category_ids``, ``not_exhaustive_category_ids``), whose images are symbolic links to a few
small JPEGs. Each measurement runs in a fresh Python process (``--stage``), which reports its wall
time and peak resident memory (``ru_maxrss``):

- ``json``: ``json.load`` of the file (the floor any loader pays);
- ``plan``: what ``extract`` does before any store or backbone: ``load_detection_dataset`` (the
  file's checks) and ``plan_views`` (one view per image), the figure the load target judges, and
  the image header scan (``cachedet.data.scan``), which opens every image file (I/O that
  ``json.load`` does not do) and is reported beside it (``scan_s``, and the ratio with it); the
  imports before them (torch, rich, Pillow's format plugins: constants) are reported apart
  (``import_s``) and not counted; peak memory counts them (the process's VmHWM);
- ``eval``: ``DetectionEvaluator`` (pycocotools COCOeval; LVISEval for the LVIS file) on N images
  with 100 detections each; the COCO file is scored again with ``--backend faster-coco-eval``
  (where installed), in its own process, on the same detections: both wall times (``eval_s``),
  their ratio and whether the 12 COCO stats agree (to 1e-6) are recorded.

Writes ``results/scale.json`` (``sizes``: one entry per size; ``eval``) and ``results/scale.md``,
with the machine, versions and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOAD_TARGET = 1.5  # load + planning within this multiple of json.load, in time and in peak memory
FLAT_TARGET = 1.10  # per-view extraction and per-step training cost: largest / smallest size
FIRST_STEP_TARGET = 30.0  # train-heads' first step within this many seconds of launch (100k views)
WORKER_TARGET = 1.10  # a worker's peak USS at the largest size within this multiple of the smallest
CANVAS, SHARD_VIEWS, EXTRACT_SHARDS, TRAIN_STEPS = 64, 64, 16, 30
EVAL_PER_TRAIN = 5000 / 118000  # COCO's val:train ratio: eval images per size
SOURCE_SIDES = ((640, 480), (480, 640), (640, 427), (500, 375))  # the few real JPEGs linked to


def _polygon(rng, x, y, w, h, points=16) -> list[float]:
    angles = np.sort(rng.uniform(0, 2 * np.pi, points))
    radius = rng.uniform(0.6, 1.0, points)
    xs = x + w / 2 + np.cos(angles) * radius * w / 2
    ys = y + h / 2 + np.sin(angles) * radius * h / 2
    return np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()


def coco_like(
    n_images: int, seed: int = 0, classes: int = 80, per_image: float = 7.0, lvis: bool = False
) -> dict:
    """A COCO-format dict of ``n_images`` images (sizes of ``SOURCE_SIDES``, file names
    ``{i % 4}/{id}.jpg``), ~``per_image`` annotations each (Poisson) with a 16-point polygon and
    its box, over ``classes`` categories. ``lvis``: LVIS's fields too (category ``frequency`` r/c/f,
    per-image ``neg_category_ids`` and ``not_exhaustive_category_ids``)."""
    rng = np.random.default_rng(seed)
    freq = rng.choice(["r", "c", "f"], size=classes, p=[0.28, 0.38, 0.34]) if lvis else None
    categories = [
        {"id": c + 1, "name": f"class_{c + 1}", **({"frequency": str(freq[c])} if lvis else {})}
        for c in range(classes)
    ]
    images, annotations = [], []
    counts = rng.poisson(per_image, n_images)
    for i in range(n_images):
        w, h = SOURCE_SIDES[i % len(SOURCE_SIDES)]
        image = {"id": i + 1, "file_name": f"{i % len(SOURCE_SIDES)}/{i + 1}.jpg", "width": w}
        image["height"] = h
        if lvis:
            image["neg_category_ids"] = rng.choice(classes, 3, replace=False).tolist()
            image["not_exhaustive_category_ids"] = [int(rng.integers(1, classes + 1))]
        images.append(image)
        for _ in range(counts[i]):
            bw, bh = rng.uniform(8, w / 3), rng.uniform(8, h / 3)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, classes + 1)),
                    "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                    "area": round(bw * bh * 0.7, 2),
                    "iscrowd": 0,
                    "segmentation": [_polygon(rng, x, y, bw, bh)],
                }
            )
    return {"images": images, "annotations": annotations, "categories": categories}


def write_dataset(root: str, data: dict) -> tuple[str, str]:
    """Write ``data`` as ``root/annotations.json`` and its images as symbolic links (one folder per
    source size) to a few small JPEGs under ``root/sources``. Returns (annotation file, image dir)."""
    from PIL import Image

    images = os.path.join(root, "images")
    sources = os.path.join(root, "sources")
    os.makedirs(sources, exist_ok=True)
    for k, (w, h) in enumerate(SOURCE_SIDES):
        src = os.path.join(sources, f"{k}.jpg")
        if not os.path.exists(src):
            Image.new("RGB", (w, h), (90 + 30 * k, 120, 150)).save(src, quality=80)
        os.makedirs(os.path.join(images, str(k)), exist_ok=True)
    for image in data["images"]:
        link = os.path.join(images, image["file_name"])
        if not os.path.lexists(link):
            os.symlink(os.path.join(sources, image["file_name"].split("/")[0] + ".jpg"), link)
    path = os.path.join(root, "annotations.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, images


def detections_for(data: dict, per_image: int = 100, seed: int = 1) -> list[dict]:
    """``per_image`` COCO results per image: jittered copies of its boxes and random boxes."""
    rng = np.random.default_rng(seed)
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    classes = len(data["categories"])
    out = []
    for image in data["images"]:
        w, h = image["width"], image["height"]
        truth = by_image.get(image["id"], [])
        for k in range(per_image):
            if k < len(truth):
                x, y, bw, bh = truth[k]["bbox"]
                box = [x + rng.normal(0, 2), y + rng.normal(0, 2), bw, bh]
                cid = truth[k]["category_id"]
            else:
                bw, bh = rng.uniform(8, w / 3), rng.uniform(8, h / 3)
                box = [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh]
                cid = int(rng.integers(1, classes + 1))
            score = float(rng.uniform(0.5, 1.0) if k < len(truth) else rng.uniform(0, 0.6))
            out.append(
                {
                    "image_id": image["id"],
                    "category_id": cid,
                    "bbox": [round(float(v), 2) for v in box],
                    "score": round(score, 4),
                }
            )
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def _peak_mb() -> float:
    """This process's peak resident memory: VmHWM (reset at exec; ``ru_maxrss`` keeps the parent's
    peak across fork + exec on Linux), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage(name: str, path: str, images: str | None, backend: str = "pycocotools") -> dict:
    """Run one measurement in this process; returns {seconds, peak_mb, ...}. ``backend``: the COCO
    scorer of the eval stages."""
    t = time.perf_counter()
    imported = 0.0
    if name == "json":
        with open(path) as f:
            data = json.load(f)
        extra = {"images": len(data["images"]), "annotations": len(data["annotations"])}
    elif name == "plan":
        from PIL import Image

        import cachedet.core.progress  # noqa: F401  (the scan's progress bar imports rich lazily)
        from cachedet.data.coco import load_detection_dataset
        from cachedet.data.scan import scan_images
        from cachedet.data.views import AugmentConfig
        from cachedet.extraction.run import plan_views

        Image.preinit()  # Pillow loads its common format plugins on the first open
        imported = time.perf_counter() - t  # torch and friends: a constant, not the data's cost
        import_mb = _rss_mb()
        t = time.perf_counter()
        dataset = load_detection_dataset(path, images)
        loaded = time.perf_counter() - t
        scan = scan_images(dataset, "ExtractConfig.images", progress=False)
        scanned = time.perf_counter() - t - loaded
        plan = plan_views(dataset, AugmentConfig(size=640), 1)
        extra = {
            "load_s": loaded,
            "scan_s": scanned,
            "plan_s": time.perf_counter() - t - loaded - scanned,
            "load_plan_s": time.perf_counter() - t - scanned,
            "views": len(plan.views),
            "bad_images": len(scan.bad),
            "import_mb": import_mb,
        }
    elif name in ("eval", "eval_lvis"):
        from cachedet.evaluation.evaluator import DetectionEvaluator
        from cachedet.evaluation.ground_truth import scoring_ground_truth

        with open(path) as f:
            data = json.load(f)
        dets = detections_for(data)
        t, cpu = time.perf_counter(), time.process_time()  # scoring only: given gt and detections
        lvis = name == "eval_lvis"
        gt = scoring_ground_truth(data, path, lvis)
        names = {c["id"]: c["name"] for c in data["categories"]}
        evaluator = DetectionEvaluator(gt, names, lvis=lvis, backend=backend)
        evaluator.reset()
        evaluator.process(dets)
        metrics = evaluator.evaluate()
        extra = {
            "images": len(data["images"]),
            "detections": len(dets),
            "AP": metrics["bbox"]["AP"],
            "stats": metrics["bbox"],  # the 12 COCO numbers, 0..100
            "cpu_s": time.process_time() - cpu,  # all threads: a scorer's own threads show here
            "backend": backend,
        }
    elif name in ("extract", "extract_dask"):
        extra = extract_stage(path, images, dask=name == "extract_dask", shards=int(backend))
    elif name == "train_store":
        extra = train_store_stage(path, images)
    elif name == "train":
        extra = train_stage(images, steps=int(backend))  # ``images``: the store here
    else:
        raise SystemExit(f"unknown stage {name}")
    return {
        "seconds": time.perf_counter() - t,
        "import_s": imported,
        "peak_mb": _peak_mb(),
        **extra,
    }


class ChildMemory:
    """Polls this process's descendants (every ``every`` s, in a thread) for their peak memory:
    RSS (VmHWM, exact), and USS / PSS (psutil ``memory_full_info``, at the polls): a forked
    child's RSS counts the pages it shares with its parent, its USS only its own."""

    def __init__(self, every: float = 0.2):
        import threading

        self.every, self.peak, self.stop = every, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _poll(self):
        import psutil

        me = psutil.Process()
        while not self.stop.wait(self.every):
            for p in me.children(recursive=True):
                try:
                    m, cmd = p.memory_full_info(), " ".join(p.cmdline())[-80:]
                    with open(f"/proc/{p.pid}/status") as f:
                        hwm = next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmHWM:"))
                except (psutil.Error, OSError, StopIteration):
                    continue
                d = self.peak.setdefault(p.pid, {"cmd": cmd})
                for k, v in (("rss", hwm), ("uss", m.uss / 2**20), ("pss", m.pss / 2**20)):
                    d[k] = max(d.get(k, 0.0), v)

    def largest(self) -> dict:
        """The peak of the descendant with the largest USS: {rss, uss, pss (MB), cmd}."""
        return max(self.peak.values(), key=lambda d: d["uss"], default={})


def _extract_config(path: str, images: str, out: str, **kw):
    """The benchmark's extraction: test_resnet (random init) at CANVAS px on the CPU, one view per
    image, float16, SHARD_VIEWS views per shard."""
    from cachedet.backbones.backbone import BackboneConfig
    from cachedet.data.views import AugmentConfig
    from cachedet.extraction.run import ExtractConfig

    return ExtractConfig(
        annotations=path,
        images=images,
        out=out,
        backbone=BackboneConfig("test_resnet", None, "random"),
        augment=AugmentConfig(size=CANVAS, seed=0),
        views=1,
        shard_views=SHARD_VIEWS,
        batch_size=16,
        device="cpu",
        overwrite=True,
        **kw,
    )


def _planned(cfg):
    """What ``extract`` does before its shards: load, plan, lay the store out, one task per
    shard. Returns (backbone, header, tasks)."""
    from cachedet.backbones.backbone import build_backbone
    from cachedet.data.coco import load_detection_dataset
    from cachedet.extraction.run import _header, plan_views, prepare_store, shard_tasks

    dataset = load_detection_dataset(cfg.annotations, cfg.images)
    plan = plan_views(dataset, cfg.augment, cfg.views)
    backbone = build_backbone(cfg.backbone, warn=False)
    masks = cfg.masks and dataset.has_masks
    header = _header(cfg, backbone, dataset, plan, None, masks)
    prepare_store(cfg, header, plan)
    tasks = shard_tasks(cfg, cfg.backbone, dataset if masks else None, plan)
    return backbone, header, tasks


class _Bar:
    def advance(self, n: int) -> None:
        pass


def extract_stage(path: str, images: str, dask: bool, shards: int) -> dict:
    """Plan the whole file as ``extract`` does, then run its first shard (warm-up: DataLoader or
    dask worker start, first calls) and time the next ``shards`` through the library's shard
    machinery, with one DataLoader worker in this process (``ShardRunner.computed`` over every
    shard's task, as ``extract`` gives them) or one dask worker (``run_shards_on_dask`` on a
    LocalCluster of one worker process). The peak memory of the worker process is polled."""
    import pickle

    from cachedet.extraction.shards import ShardRunner, run_shards_on_dask, write_shard

    out = os.path.join(os.path.dirname(path), "extract.zarr")
    cfg = _extract_config(path, images, out, **({"workers": 1} if dask else {"loader_workers": 1}))
    backbone, _, tasks = _planned(cfg)
    warm = 1 if len(tasks) > 1 else 0  # a file of one shard: timed with its start-up
    shards = max(1, min(shards, len(tasks) - warm))
    payload = [len(pickle.dumps(t)) for t in tasks[: warm + shards]]
    timed_views = sum(len(t.views) for t in tasks[warm : warm + shards])
    with ChildMemory() as memory:
        if dask:
            from dask.distributed import LocalCluster

            with LocalCluster(
                n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster:
                address = cluster.scheduler_address
                run_shards_on_dask(tasks[:warm], 0, address, _Bar())
                t = time.perf_counter()
                run_shards_on_dask(tasks[warm : warm + shards], 0, address, _Bar())
                seconds = time.perf_counter() - t
        else:
            runner = ShardRunner(cfg.backbone, cfg.device, backbone=backbone)
            # what a spawned (or forkserver) DataLoader worker is sent at its start
            loader_kb = len(pickle.dumps(runner.loader(tasks).dataset)) / 1024
            computed = runner.computed(tasks)  # every shard's task, as extract hands them over
            t = time.perf_counter()
            for i, (task, shard) in enumerate(computed, 1 - warm):
                write_shard(task, shard)
                if i == 0:
                    t = time.perf_counter()
                if i == shards:
                    break
            seconds = time.perf_counter() - t
            computed.close()  # its DataLoader workers end
    return {
        "extract_s": seconds,
        "shards": shards,
        "views_timed": timed_views,
        "ms_per_view": 1000 * seconds / timed_views,
        "task_payload_kb": float(np.mean(payload)) / 1024,
        "worker": memory.largest(),
        "loader_dataset_kb": None if dask else loader_kb,
        "shards_total": len(tasks),
    }


def train_store_stage(path: str, images: str) -> dict:
    """A store of every image's view (no masks) laid out by the library as ``extract`` lays it out,
    each shard written by ``write_shard`` with deterministic random float16 features in place of a
    backbone's (seeded by the shard)."""
    from cachedet.extraction.shards import ComputedShard, write_shard

    out = os.path.join(os.path.dirname(path), "train.zarr")
    cfg = _extract_config(path, images, out, masks=False)
    _, header, tasks = _planned(cfg)
    for task in tasks:
        rng, n = np.random.default_rng(task.shard), len(task.views)
        blocks = {
            k: rng.standard_normal((n, *shape), dtype=np.float32).astype(np.float16)
            for k, shape in header.shapes.items()
        }
        write_shard(task, ComputedShard(blocks, None, [], 0.0))
    return {"store": out, "views": header.num_views}


def train_stage(store: str, steps: int) -> dict:
    """train-heads on ``store`` (a tiny detector on the CPU, one epoch of ``steps + 1`` steps):
    ``first_step_s`` from this process's start (imports, store, detector, first batch included) to
    the end of the first step, ``ms_per_step`` over the following ``steps``."""
    import psutil

    launched = psutil.Process().create_time()
    from cachedet.engine import trainer
    from cachedet.engine.train import TrainConfig, train

    stamps = []
    run_step = trainer.Trainer.run_step

    def timed(self, batch):
        out = run_step(self, batch)
        stamps.append(time.time())
        return out

    trainer.Trainer.run_step = timed
    cfg = TrainConfig.of(
        out=os.path.join(os.path.dirname(store), f"run_{os.getpid()}"),
        cache=store,
        epochs=1,
        batch_size=4,
        neck_channels=32,
        lr=0.01,
        warmup_steps=2,
        device="cpu",
        max_steps_per_epoch=steps + 1,
        detector_options={
            "box_convs": 0,
            "box_fcs": 2,
            "box_representation": 128,
            "rois_per_image": 64,
            "proposals_per_image": 200,
        },
    )
    train(cfg, progress=False)
    return {
        "first_step_s": stamps[0] - launched,
        "ms_per_step": 1000 * (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
        "steps": len(stamps),
    }


def fresh(name: str, path: str, images: str | None = None, backend: str | None = None) -> dict:
    """``stage`` in a new Python process (nothing cached from earlier stages)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", name, "--file", path]
    if images:
        cmd += ["--images", images]
    if backend:
        cmd += ["--backend", backend]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"stage {name} failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_stages(n: int, path: str, images: str, shards: int, steps: int) -> dict:
    """Extraction, worker memory, train-heads and eval at one size, each stage a fresh process."""
    inproc = fresh("extract", path, images, backend=str(shards))
    dask = fresh("extract_dask", path, images, backend=str(shards))
    store = fresh("train_store", path, images)
    trained = fresh("train", path, store["store"], backend=str(steps))
    n_eval = max(1, round(n * EVAL_PER_TRAIN))
    val = os.path.join(os.path.dirname(path), "val.json")
    with open(val, "w") as f:
        json.dump(coco_like(n_eval, seed=2), f)
    scored = fresh("eval", val)
    return {
        "extract_ms_per_view": inproc["ms_per_view"],
        "extract_dask_ms_per_view": dask["ms_per_view"],
        "extract_views_timed": inproc["views_timed"],
        "task_payload_kb": inproc["task_payload_kb"],  # what a dask worker is sent per shard
        "loader_dataset_kb": inproc["loader_dataset_kb"],  # what a DataLoader worker is sent
        "worker_peak_mb": {  # rss: VmHWM (a forked worker's counts pages shared with its parent)
            "loader": {k: inproc["worker"].get(k) for k in ("rss", "uss", "pss")},
            "dask": {k: dask["worker"].get(k) for k in ("rss", "uss", "pss")},
        },
        "extract_peak_mb": inproc["peak_mb"],  # the main process: the whole plan lives here
        "train_views": store["views"],
        "train_first_step_s": trained["first_step_s"],
        "train_ms_per_step": trained["ms_per_step"],
        "train_steps_timed": trained["steps"] - 1,
        "eval_images": n_eval,
        "eval_detections": scored["detections"],
        "eval_s": scored["seconds"],
    }


def targets(rows: list[dict]) -> dict:
    """Which target each figure checks, and whether it is met across ``rows`` (smallest to largest
    size): per-view extraction and per-step training cost flat within 10%; each worker's peak USS
    flat within 10%; the first training step within 30 s of launch at the largest size."""
    out = {
        "load_s, load_peak_mb (time_ratio, memory_ratio)": {
            "target": f"load + plan <= {LOAD_TARGET}x json.load, time and peak memory (the "
            "image header scan reported beside it)",
            "met": all(r["meets_load_target"] for r in rows),
        }
    }
    staged = [r for r in rows if "extract_ms_per_view" in r]
    if not staged:
        return out
    first, last = staged[0], staged[-1]

    def flat(key, get=lambda r, k: r[k]):
        ratio = get(last, key) / get(first, key)
        return {"ratio_largest_to_smallest": ratio, "met": ratio <= FLAT_TARGET}

    sizes = f"{first['images']:,} to {last['images']:,} images"
    out["extract_ms_per_view"] = {
        "target": f"per-view extraction cost flat within 10% ({sizes})",
        **flat("extract_ms_per_view"),
    }
    out["train_ms_per_step"] = {
        "target": f"per-step training cost flat within 10% ({sizes})",
        **flat("train_ms_per_step"),
    }
    for worker in ("loader", "dask"):
        out[f"worker_peak_mb.{worker}.uss"] = {
            "target": f"a {worker} worker's memory does not grow with the dataset (peak USS "
            f"within {WORKER_TARGET:.2f}x, {sizes})",
            **flat(worker, lambda r, k: r["worker_peak_mb"][k]["uss"]),
        }
    out["train_first_step_s"] = {
        "target": f"first step within {FIRST_STEP_TARGET:.0f} s of launch on a 100k-view store",
        "views": last["train_views"],
        "seconds": last["train_first_step_s"],
        # judged on a 100k-view store only; smaller stores say how far start-up is from it
        "met": last["train_first_step_s"] <= FIRST_STEP_TARGET
        if last["train_views"] >= 100_000
        else None,
        "within_at_largest_size": last["train_first_step_s"] <= FIRST_STEP_TARGET,
    }
    out["eval_s"] = {
        "target": "eval on images = size x 5000 / 118000 (COCO val:train) with 100 detections "
        "each: measured, no limit",
        "met": None,
    }
    return out


def measure_sizes(
    sizes: list[int], work: str, log=print, stages: bool = True, shards: int = EXTRACT_SHARDS,
    steps: int = TRAIN_STEPS,
) -> list[dict]:  # fmt: skip
    """Per size: load and plan against json.load; with ``stages`` also extraction (``shards``
    timed shards), worker memory, train-heads (``steps`` timed steps) and eval."""
    rows = []
    for n in sizes:
        root = os.path.join(work, f"coco_{n}")
        path, images = write_dataset(root, coco_like(n))
        base = fresh("json", path)
        plan = fresh("plan", path, images)
        row = {
            "images": n,
            "annotations": base["annotations"],
            "file_mb": os.path.getsize(path) / 1e6,
            "json_load_s": base["seconds"],
            "json_load_peak_mb": base["peak_mb"],
            "load_s": plan["load_plan_s"],  # parse + checks + view plan: what the target judges
            "load_scan_s": plan["seconds"],  # with the image header scan
            "load_peak_mb": plan["peak_mb"],
            "import_mb": plan["import_mb"],  # resident after importing torch, before the file
            "parts_s": {k: plan[k] for k in ("load_s", "scan_s", "plan_s", "import_s")},
            "time_ratio": plan["load_plan_s"] / base["seconds"],
            "time_ratio_with_scan": plan["seconds"] / base["seconds"],
            # the data's share: the peak above what the imports hold, against json.load's peak
            "memory_ratio": (plan["peak_mb"] - plan["import_mb"]) / base["peak_mb"],
        }
        row["meets_load_target"] = (
            row["time_ratio"] <= LOAD_TARGET and row["memory_ratio"] <= LOAD_TARGET
        )
        if stages:
            row.update(measure_stages(n, path, images, shards, steps))
        log(json.dumps(row))
        rows.append(row)
    return rows


def measure_eval(n_images: int, work: str, log=print, lvis_images: int | None = None) -> list[dict]:
    rows = []
    for name, lvis, classes in (("eval", False, 80), ("eval_lvis", True, 1203)):
        n_images = (lvis_images or n_images) if lvis else n_images
        root = os.path.join(work, f"{name}_{n_images}")
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, "val.json")
        with open(path, "w") as f:
            json.dump(coco_like(n_images, seed=2, classes=classes, lvis=lvis), f)
        r = fresh(name, path)
        row = {
            "protocol": "LVIS" if lvis else "COCO",
            "classes": classes,
            **r,
            "eval_s": r["seconds"],
        }
        if not lvis:
            row["faster_coco_eval"] = compare_backend(path, r)
        log(json.dumps(row))
        rows.append(row)
    return rows


def compare_backend(path: str, reference: dict) -> dict:
    """Score the COCO file ``path`` with faster-coco-eval in a fresh process, beside ``reference``
    (pycocotools' stage result): {eval_s, cpu_s, peak_mb, speedup (pycocotools' seconds over
    faster-coco-eval's), stats_agree (all 12 stats within 1e-6 in COCOeval's 0..1 units),
    max_stat_diff}, or {"skipped": why} where the package is not installed."""
    import importlib.util

    if importlib.util.find_spec("faster_coco_eval") is None:
        return {"skipped": "faster-coco-eval is not installed (pip install faster-coco-eval)"}
    r = fresh("eval", path, backend="faster-coco-eval")
    ours, theirs = reference["stats"], r["stats"]
    diffs = [  # COCOeval's 0..1 units; undefined (None) on one side only counts as 1, the whole range
        1.0
        if (ours[k] is None) != (theirs.get(k) is None)
        else abs(ours[k] - theirs[k]) / 100
        if ours[k] is not None
        else 0.0
        for k in ours
    ]
    return {
        "eval_s": r["seconds"],
        "cpu_s": r["cpu_s"],
        "peak_mb": r["peak_mb"],
        "speedup": reference["seconds"] / r["seconds"],
        "stats_agree": len(ours) == 12 and ours.keys() == theirs.keys() and max(diffs) <= 1e-6,
        "max_stat_diff": max(diffs),
    }


def markdown(result: dict) -> str:
    lines = [
        "# cachedet at scale: loading and planning, extraction, worker memory, training, evaluation",
        "",
        f"Machine: {', '.join(f'{k} {v}' for k, v in result['machine'].items())}. Load average before {result['load_before']}, after "
        f"{result['load_after']}. Code at commit {result.get('commit') or '?'}. Each figure is one"
        " fresh process.",
        "",
        "| images | annotations | file MB | json.load s | load+plan s | ratio | + header scan s"
        " | ratio | json.load peak MB | load+scan+plan peak MB (imports) | ratio"
        " | target ≤ 1.5× (load+plan) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sizes"]:
        lines.append(
            f"| {r['images']:,} | {r['annotations']:,} | {r['file_mb']:.0f} | {r['json_load_s']:.2f}"
            f" | {r['load_s']:.2f} | {r['time_ratio']:.2f} | {r['load_scan_s']:.2f}"
            f" | {r['time_ratio_with_scan']:.2f} | {r['json_load_peak_mb']:.0f}"
            f" | {r['load_peak_mb']:.0f} ({r['import_mb']:.0f}) | {r['memory_ratio']:.2f}"
            f" | {'met' if r['meets_load_target'] else 'missed'} |"
        )
    lines += [
        "",
        "Where the time goes (seconds): load (parse + checks), header scan (every image file opened,",
        "I/O that json.load does not do), view plan; the imports before them (torch, rich, Pillow's",
        "plugins) are not counted above; the memory ratio counts the peak above what the imports",
        "hold (in brackets).",
    ]
    if result.get("load_commit"):
        lines.append(
            f"Load rows re-measured at commit {result['load_commit']} (load average before"
            f" {result.get('load_rows_load_before')}); the other stages at {result.get('commit')}."
        )
    lines.append("")
    lines += ["| images | load | scan | plan | imports |", "|---|---|---|---|---|"]
    for r in result["sizes"]:
        p = r["parts_s"]
        lines.append(
            f"| {r['images']:,} | {p['load_s']:.2f} | {p['scan_s']:.2f} | {p['plan_s']:.2f}"
            f" | {p['import_s']:.2f} |"
        )
    staged = [r for r in result["sizes"] if "extract_ms_per_view" in r]
    if staged:
        lines += [
            "",
            f"Extraction: test_resnet (random init) at {CANVAS} px on the CPU, one float16 view per"
            f" image, shards of {SHARD_VIEWS} views, masks; after the whole file is planned as"
            " `extract` plans it, one warm-up shard, then the timed shards, with one DataLoader"
            " worker in process, and again on a LocalCluster of one dask worker. Worker memory:"
            " peak RSS / USS / PSS of the worker process (a forked DataLoader worker's RSS counts"
            " the pages it shares with its parent; USS is its own). Task KB/shard: the pickled"
            " `ShardTask` a dask worker is sent per shard; loader dataset KB: what a DataLoader"
            " worker is sent at its start under spawn / forkserver (its batches come with their"
            " views). Train: a store of one view per"
            " image (random float16 features written by the library's `write_shard`), a tiny"
            " Faster R-CNN on the CPU, batch 4; the first step counts from the process's start."
            " Eval: pycocotools on size × 5000 / 118000 images, 100 detections each.",
            "",
            "| images | extract ms/view (dask) | task KB/shard | loader worker MB RSS/USS/PSS"
            " | loader dataset KB | dask worker MB RSS/USS/PSS | train views | first step s | ms/step | eval images"
            " | eval s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in staged:
            w = r["worker_peak_mb"]
            mem = {k: "/".join(f"{w[k][m] or 0:.0f}" for m in ("rss", "uss", "pss")) for k in w}
            lines.append(
                f"| {r['images']:,} | {r['extract_ms_per_view']:.1f}"
                f" ({r['extract_dask_ms_per_view']:.1f}) | {r['task_payload_kb']:.0f}"
                f" | {mem['loader']} | {r['loader_dataset_kb']:.1f} | {mem['dask']}"
                f" | {r['train_views']:,}"
                f" | {r['train_first_step_s']:.1f} | {r['train_ms_per_step']:.0f}"
                f" | {r['eval_images']:,} | {r['eval_s']:.2f} |"
            )
    if result.get("targets"):
        lines += ["", "| figure | target | met |", "|---|---|---|"]
        for key, t in result["targets"].items():
            met = {True: "met", False: "missed", None: "measured"}[t["met"]]
            if t["met"] is None and "views" in t:
                met = "not judged below 100k views"
            if "ratio_largest_to_smallest" in t:
                met += f" ({t['ratio_largest_to_smallest']:.2f}×)"
            elif "seconds" in t:
                met += f" ({t['seconds']:.1f} s at {t['views']:,} views)"
            lines.append(f"| `{key}` | {t['target']} | {met} |")
    if result.get("eval"):
        lines += ["", "| scorer | images | classes | detections | seconds | peak MB |"]
        lines += ["|---|---|---|---|---|---|"]
        for r in result["eval"]:
            lines.append(
                f"| {r['protocol']} | {r['images']:,} | {r['classes']:,} | {r['detections']:,} |"
                f" {r['seconds']:.1f} | {r['peak_mb']:.0f} |"
            )
        fast = [r for r in result["eval"] if "eval_s" in r.get("faster_coco_eval", {})]
        if fast:
            lines += [
                "",
                "COCO scorer backends on the same detections, each in a fresh process (`eval"
                " --backend`; pycocotools is the reference):",
                "",
                "| images | detections | pycocotools s (CPU s) | faster-coco-eval s (CPU s) | speed-up"
                " | 12 stats agree (max difference) |",
                "|---|---|---|---|---|---|",
            ]
            for r in fast:
                f = r["faster_coco_eval"]
                lines.append(
                    f"| {r['images']:,} | {r['detections']:,} | {r['eval_s']:.1f} ({r['cpu_s']:.1f})"
                    f" | {f['eval_s']:.1f} ({f['cpu_s']:.1f}) | {f['speedup']:.1f}×"
                    f" | {'yes' if f['stats_agree'] else 'NO'} ({f['max_stat_diff']:.1e}) |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1180,11800,118000")
    ap.add_argument("--eval-images", type=int, default=5000)
    ap.add_argument("--lvis-images", type=int, default=None, help="default: --eval-images")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="sizes 120,1200, 4 timed shards, 10 timed steps, 200 eval images",
    )
    ap.add_argument("--extract-shards", type=int, default=EXTRACT_SHARDS, help="timed shards")
    ap.add_argument("--train-steps", type=int, default=TRAIN_STEPS, help="timed steps")
    ap.add_argument(
        "--load-only",
        action="store_true",
        help="re-measure only the load rows and merge them into the existing results",
    )
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="pycocotools", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stage:
        print(json.dumps(stage(args.stage, args.file, args.images, args.backend)))
        return None
    import tempfile

    from cachedet.core.atomic import write_json_atomic

    sizes = [120, 1200] if args.quick else [int(s) for s in args.sizes.split(",")]
    shards, steps = (4, 10) if args.quick else (args.extract_shards, args.train_steps)
    eval_images = 200 if args.quick else args.eval_images
    work = args.work or tempfile.mkdtemp(prefix="cachedet-scale-")
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(
        ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    name = "scale_quick" if args.quick else "scale"
    if args.load_only:
        result = _merge_load_rows(os.path.join(args.out, f"{name}.json"), sizes, work, commit)
    else:
        result = _measure_all(sizes, work, shards, steps, eval_images, args, commit)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, f"{name}.json"), result, indent=2)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(markdown(result))
    return result


def _merge_load_rows(path: str, sizes: list[int], work: str, commit: str) -> dict:
    """The committed results with each size's load figures re-measured (the other stages kept,
    with the commit they came from)."""
    with open(path) as f:
        result = json.load(f)
    result["load_rows_load_before"] = os.getloadavg()
    fresh_rows = {r["images"]: r for r in measure_sizes(sizes, work, stages=False)}
    for row in result["sizes"]:
        row.update(fresh_rows.get(row["images"], {}))
    result["load_commit"] = commit
    result["targets"] = targets(result["sizes"])
    return result


def _measure_all(sizes, work, shards, steps, eval_images, args, commit) -> dict:
    from cachedet.tools.bench import machine_info

    result = {"machine": machine_info(), "commit": commit, "load_before": os.getloadavg()}
    result["sizes"] = measure_sizes(sizes, work, shards=shards, steps=steps)
    result["eval"] = measure_eval(
        eval_images, work, lvis_images=None if args.quick else args.lvis_images
    )
    result["load_after"] = os.getloadavg()
    result["targets"] = targets(result["sizes"])
    return result


if __name__ == "__main__":
    main()
