"""Compute-savings harness: every training regime on the same views, measured in one run.

Regimes (one training step = forward + backward + optimizer step on a batch of views):
  finetune              backbone trainable (BatchNorm frozen), heads trained
  online_frozen         frozen backbone run every step (inference mode), heads trained
  cached                features read from a real zarr store through the real DataLoader
  heads_in_memory       the lower bound: heads only, features already in memory
  torchvision_frozen    torchvision's fasterrcnn_resnet50_fpn, trainable_backbone_layers=0
  torchvision_finetune  the same with trainable_backbone_layers=5
  adapters_online       frozen backbone with residual adapters in its last stage, run every step
  adapters_hybrid       the same model from a hybrid cache (extract --cache-stage = last stage - 1):
                        only the adapted last stage and the heads run
Per regime: median step time after warm-up, FLOPs of one step (torch.utils.flop_counter) and
peak memory (CUDA max allocated; on CPU the peak RSS of a fresh process per regime).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cachedet.core.errors import CachedetError
from cachedet.core.recipes import DEFAULT_CANVAS

OUR_REGIMES = ("finetune", "online_frozen", "cached", "heads_in_memory")
ADAPTER_REGIMES = ("adapters_online", "adapters_hybrid")
TORCHVISION_REGIMES = ("torchvision_frozen", "torchvision_finetune")
BENCH_REGIMES = OUR_REGIMES + TORCHVISION_REGIMES + ADAPTER_REGIMES
# the detector torchvision's fasterrcnn_resnet50_fpn builds: FPN on c2-c5, 2-FC box head, 2000 proposals
TORCHVISION_LIKE = {"box_convs": 0, "box_fcs": 2, "proposals_per_image": 2000}


@dataclass(frozen=True)
class BenchConfig:
    """What ``cachedet bench`` measures (the CLI builds this; ``resolved`` fills the defaults that
    depend on other fields, once, for the CLI and Python alike).

    out_indices: levels or a ViT's taps; ``"auto"``: 1,2,3,4 for resnet50 (torchvision's R50-FPN),
    the backbone's default otherwise; None: the backbone's default. neck ``"auto"``: the simple
    pyramid for a ViT's taps, FPN otherwise. options: detector options; None: torchvision's
    R50-FPN box head (``TORCHVISION_LIKE``) for two-stage heads, none for RetinaNet. size: canvas
    (pixels); batch: images per step; warmup / steps: untimed / timed steps per regime.
    """

    backbone: str = "resnet50"
    out_indices: tuple[int, ...] | str | None = "auto"
    neck: str = "auto"  # resolved by run_benchmark (needs the backbone's feature specs)
    head: str = "faster-rcnn"
    size: int = DEFAULT_CANVAS
    batch: int = 2
    device: str = "auto"
    warmup: int = 2
    steps: int = 5
    num_classes: int = 91
    options: dict | None = None
    workdir: str = ""

    def resolved(self) -> BenchConfig:
        """This config with ``device``, ``out_indices`` and ``options`` resolved and its numbers
        checked (CachedetError naming the field)."""
        from cachedet.core.errors import check_number
        from cachedet.core.runtime import resolve_device

        for name in ("size", "batch", "steps", "num_classes"):
            check_number(f"BenchConfig.{name}", getattr(self, name), integer=True, low=1)
        check_number("BenchConfig.warmup", self.warmup, integer=True, low=0)
        indices = self.out_indices
        if indices == "auto":
            indices = (1, 2, 3, 4) if self.backbone == "resnet50" else None
        options = self.options
        if options is None:
            options = dict(TORCHVISION_LIKE) if self.head != "retinanet" else {}
        device = str(resolve_device(self.device))
        return replace(self, out_indices=indices, options=options, device=device)

    @property
    def num_images(self) -> int:
        return self.batch * (self.warmup + self.steps)

    @property
    def detector_name(self) -> str:
        return f"{self.neck}+{self.head}"


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import timm

    return {
        "cpu": cpu or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def prepare(cfg: BenchConfig, hybrid: bool = False) -> dict:
    """Generate images, extract a plain (no-jitter) cache of them; return paths and stage measurements."""
    from cachedet.backbones.backbone import BackboneConfig
    from cachedet.cache.store import FeatureStore
    from cachedet.data.synthetic import SyntheticSpec, make_synthetic_dataset
    from cachedet.data.views import AugmentConfig
    from cachedet.extraction.run import ExtractConfig, extract

    data = make_synthetic_dataset(
        os.path.join(cfg.workdir, "data"),
        SyntheticSpec(
            num_train=cfg.num_images,
            num_val=1,
            min_side=int(cfg.size * 0.75),
            max_side=cfg.size,
            max_objects=6,
        ),
    )
    store = os.path.join(cfg.workdir, "bench.zarr")
    ecfg = ExtractConfig(
        annotations=data["train"],
        images=data["images"],
        out=store,
        backbone=BackboneConfig(cfg.backbone, cfg.out_indices, "random"),
        augment=AugmentConfig(size=cfg.size, augment=False),
        views=1,
        shard_views=cfg.batch * 2,
        batch_size=cfg.batch,
        device=cfg.device,
        overwrite=True,
    )
    # steady state, like the forward-only figure it is compared with: extract builds and warms
    # its backbone (first-call kernel selection) before its clock starts
    result = extract(ecfg, progress=False)
    fs = FeatureStore(store)
    # wall time of the shard work (decode, forward, encode, write), not planning or the backbone build
    prepared = {
        "data": data,
        "store": store,
        "extract_views_per_s": result.views_per_second,
        "cache": fs.info(),
        "hybrid_store": None,
    }
    if hybrid:  # the same views, cached up to the stage before the last (for adapters_hybrid)
        from dataclasses import replace

        from cachedet.backbones.backbone import build_backbone

        last = max(build_backbone(ecfg.backbone, warn=False).identity["out_indices"])
        prepared["hybrid_store"] = os.path.join(cfg.workdir, "hybrid.zarr")
        extract(replace(ecfg, out=prepared["hybrid_store"], cache_stage=last - 1), progress=False)
    return prepared


def _batches_in_memory(store_url: str, cfg: BenchConfig, with_features: bool):
    """[(features {level: (B, C, H, W)} or None, targets)] for every batch of the store's views.

    Features are loaded only when asked (heads_in_memory), so other regimes' peak memory is theirs.
    """
    from cachedet.cache.store import FeatureStore

    fs = FeatureStore(store_url)
    feats = fs.read_features(0, fs.num_views) if with_features else None
    out = []
    for s in range(0, fs.num_views - cfg.batch + 1, cfg.batch):
        targets = [
            {
                "boxes": torch.from_numpy(fs.boxes(v)[0].copy()),
                "labels": torch.from_numpy(fs.boxes(v)[1].copy()),
            }
            for v in range(s, s + cfg.batch)
        ]
        out.append(
            (
                {k: torch.from_numpy(v[s : s + cfg.batch].copy()) for k, v in feats.items()}
                if feats
                else None,
                targets,
            )
        )
    return out


def _images(
    store_url: str, data: dict, cfg: BenchConfig, normalize_with=None
) -> list[torch.Tensor]:
    """The same plain views the cache holds, as image tensors (normalised, or in [0, 1] for torchvision)."""
    from cachedet.cache.store import FeatureStore
    from cachedet.data.coco import load_detection_dataset
    from cachedet.data.images import read_image
    from cachedet.data.views import normalize, transform_image

    fs = FeatureStore(store_url)
    ds = load_detection_dataset(data["train"], data["images"])
    by_id = {r.id: r for r in ds.images}
    views = []
    for v in range(fs.num_views):
        p = fs.view_params(v)
        image = read_image(ds.image_path(by_id[p.image_id]))
        mean, std = normalize_with or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        views.append(transform_image(p, normalize(image, mean, std)))
    return views


def _last_stage(backbone) -> int:
    return len(backbone.stage_names()) - 1


def _our_model(
    cfg: BenchConfig, regime: str, specs, backbone=None, hybrid_stage: int | None = None
):
    from cachedet.engine.step import TrainModel
    from cachedet.models.detector import DetectorConfig, build_detector

    torch.manual_seed(0)
    det = build_detector(
        DetectorConfig(
            num_classes=cfg.num_classes,
            canvas=cfg.size,
            in_specs=tuple(specs),
            neck=cfg.neck,
            head=cfg.head,
            options=dict(cfg.options),
        )
    )
    if backbone is not None:
        backbone.set_trainable(regime == "finetune")
    uses_backbone = regime in ("finetune", "online_frozen") + ADAPTER_REGIMES
    return TrainModel(det, backbone if uses_backbone else None, hybrid_stage)


def _torchvision_model(cfg: BenchConfig, regime: str):
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    layers = 0 if regime == "torchvision_frozen" else 5
    common = dict(min_size=cfg.size, max_size=cfg.size)
    torch.manual_seed(0)
    if cfg.head == "retinanet":
        bb = resnet_fpn_backbone(
            backbone_name="resnet50",
            weights=None,
            norm_layer=FrozenBatchNorm2d,
            trainable_layers=layers,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(256, 256),
        )
        return RetinaNet(bb, num_classes=cfg.num_classes, **common)
    bb = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=layers,
    )
    return FasterRCNN(bb, num_classes=cfg.num_classes + 1, **common)


def measure_regime(cfg: BenchConfig, regime: str, prepared: dict) -> dict:
    """Time ``cfg.steps`` training steps after ``cfg.warmup``; count one step's FLOPs; peak memory."""
    from cachedet.backbones.backbone import BackboneConfig, build_backbone
    from cachedet.cache.store import FeatureStore
    from cachedet.engine.config import LoaderConfig
    from cachedet.engine.distributed import DistInfo
    from cachedet.engine.sources import CacheSource
    from cachedet.engine.step import train_step

    device = torch.device(cfg.device)
    store = prepared["store"]
    mem = _batches_in_memory(store, cfg, with_features=regime == "heads_in_memory")
    torchvision = regime in TORCHVISION_REGIMES
    if torchvision:
        model = _torchvision_model(cfg, regime).to(device).train()
        images = _images(store, prepared["data"], cfg)
        batches = [
            (
                [images[i * cfg.batch + j] for j in range(cfg.batch)],
                [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets],
            )
            for i, (_, targets) in enumerate(mem)
        ]
    elif regime in ("finetune", "online_frozen", "adapters_online"):
        backbone = build_backbone(
            BackboneConfig(cfg.backbone, cfg.out_indices, "random"), warn=False
        )
        if regime == "adapters_online":
            backbone.add_adapters((_last_stage(backbone),))
        model = _our_model(cfg, regime, backbone.specs, backbone).to(device).train()
        images = _images(store, prepared["data"], cfg, (backbone.mean, backbone.std))
        batches = [
            (torch.stack(images[i * cfg.batch : (i + 1) * cfg.batch]), targets)
            for i, (_, targets) in enumerate(mem)
        ]
    elif regime == "adapters_hybrid":
        source = CacheSource(
            prepared["hybrid_store"],
            LoaderConfig(batch_size=cfg.batch, workers=1, shuffle_buffer=4),
            DistInfo(0, 1, 0),
        )
        source.enable_adapters((source.hybrid_stage + 1,))
        model = (
            _our_model(cfg, regime, source.specs, source.backbone, hybrid_stage=source.hybrid_stage)
            .to(device)
            .train()
        )
        batches = ((b["inputs"], b["targets"]) for b in source.batches(0))
    else:  # the heads alone, as cachedet trains them from a cache: no backbone is built in this process
        model = _our_model(cfg, regime, FeatureStore(store).specs).to(device).train()
        if regime == "heads_in_memory":
            batches = mem
        else:
            # the feed train-heads uses on this device: its default workers, pinned memory on CUDA
            loader = LoaderConfig(batch_size=cfg.batch, shuffle_buffer=4).resolved(device)
            source = CacheSource(
                store,
                replace(loader, workers=loader.workers or 1),
                DistInfo(0, 1, 0),
                pin_memory=device.type == "cuda",
            )
            batches = ((b["inputs"], b["targets"]) for b in source.batches(0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def to_dev(inputs, targets):
        if isinstance(inputs, dict):
            inputs = {k: v.to(device).float() for k, v in inputs.items()}
        elif isinstance(inputs, list):
            inputs = [x.to(device) for x in inputs]
        else:
            inputs = inputs.to(device)
        return inputs, [{k: v.to(device) for k, v in t.items()} for t in targets]

    def step(inputs, targets):
        train_step(model, inputs, targets, optimizer=opt, check_finite=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    iterator = iter(batches)
    first = None
    for i in range(cfg.warmup + cfg.steps):
        t0 = time.perf_counter()
        inputs, targets = to_dev(*next(iterator))
        first = first or (inputs, targets)
        torch.manual_seed(i)
        step(inputs, targets)
        sync()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        step(*first)
    flops = int(counter.get_total_flops())

    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else process_peak_rss()
    return {
        "backbone": "resnet50 (torchvision)" if torchvision else cfg.backbone,
        "detector": cfg.detector_name,
        "size": cfg.size,
        "batch": cfg.batch,
        "device": cfg.device,
        "regime": regime,
        "step_s_median": statistics.median(times),
        **step_spread(times),
        "step_s_all": times,
        "flops_per_step": flops,
        "peak_mem_bytes": int(peak),
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }


def process_peak_rss() -> int:
    """Peak resident memory of this process in bytes.

    /proc/self/status VmHWM belongs to this address space only; getrusage's ru_maxrss would carry
    the parent's peak across fork + exec and floor every child's figure at it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def backbone_forward_views_per_s(cfg: BenchConfig, reps: int = 3) -> tuple[float, int]:
    """Backbone-only forward throughput on a batch, and its FLOPs per view."""
    from cachedet.backbones.backbone import BackboneConfig, build_backbone
    from cachedet.extraction.shards import compute_features

    cfg = cfg.resolved()

    bb = build_backbone(BackboneConfig(cfg.backbone, cfg.out_indices, "random"), warn=False).to(
        cfg.device
    )
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size)
    compute_features(bb, x)
    t = time.perf_counter()
    for _ in range(reps):
        compute_features(bb, x)
    vps = reps * cfg.batch / (time.perf_counter() - t)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bb(x.to(cfg.device))
    return vps, int(counter.get_total_flops()) // cfg.batch


def decode_speeds(store_url: str, workdir: str) -> list[dict]:
    """Bytes per view, compression ratio and decode MB/s (float32 out) for each dtype x codec."""
    import zarr

    from cachedet.cache import schema
    from cachedet.cache.store import FeatureStore, bytes_on_disk

    fs = FeatureStore(store_url)
    n = min(fs.num_views, 8)
    sample = fs.read_features(0, n)
    rows = []
    for dtype in schema.DTYPES:
        for codec in schema.CODECS:
            url = os.path.join(workdir, f"codec_{dtype}_{codec}.zarr")
            g = zarr.open_group(url, mode="w")
            raw, quant = 0, {}
            for name, x in sample.items():
                enc, quant[name] = schema.encode(x, dtype)
                a = g.create_array(
                    name,
                    shape=enc.shape,
                    chunks=(1,) + enc.shape[1:],
                    dtype=enc.dtype,
                    compressors=schema.compressors(codec),
                )
                a[...] = enc
                raw += enc.nbytes
            params = sum(
                q.nbytes for q in quant.values() if q is not None
            )  # uint8's per-channel (offset, step)
            stored = bytes_on_disk(url) + params
            t = time.perf_counter()
            reps = 3
            for _ in range(reps):
                out = sum(schema.decode(g[name][...], dtype, quant[name]).nbytes for name in sample)
            mbps = reps * out / (time.perf_counter() - t) / 1e6
            err = max(
                float(np.abs(schema.decode(g[k][...], dtype, quant[k]) - v).max())
                for k, v in sample.items()
            )
            rows.append(
                {
                    "dtype": dtype,
                    "codec": codec,
                    "bytes_per_view": stored / n,
                    "raw_bytes_per_view": (raw + params) / n,
                    "compression_ratio": (raw + params) / stored,
                    "decode_MBps": mbps,
                    "max_abs_error": err,
                }
            )
    return rows


def import_baseline_bytes() -> int:
    """Peak RSS of a fresh process that only imports what every regime imports (torch, torchvision,
    timm, zarr, cachedet): the floor under every CPU regime's peak memory."""
    code = (
        "import torch, torchvision, timm, zarr, cachedet.tools.bench, cachedet.engine.train; "
        "from cachedet.tools.bench import process_peak_rss; print(process_peak_rss())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def _run_regime_in_fresh_process(cfg: BenchConfig, regime: str, prepared: dict) -> dict:
    payload = json.dumps(
        {
            "config": asdict(cfg),
            "regime": regime,
            "prepared": {k: prepared[k] for k in ("data", "store", "hybrid_store")},
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cachedet.tools.bench"],
        input=payload,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"regime {regime} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    cfg: BenchConfig, regimes=None, fresh_process: bool | None = None, log=print
) -> dict:
    """Prepare the data and cache, then measure every regime; returns records + stage measurements."""
    from cachedet.backbones.backbone import BackboneConfig, build_backbone
    from cachedet.models.necks import resolve_neck

    for regime in regimes or ():
        if regime not in BENCH_REGIMES:
            raise CachedetError(f"regimes {regime}: expected some of {', '.join(BENCH_REGIMES)}")
    cfg = cfg.resolved()
    workdir = cfg.workdir or tempfile.mkdtemp(prefix="cachedet-bench-")
    backbone = build_backbone(
        BackboneConfig(cfg.backbone, cfg.out_indices, "random"), warn=False
    ).check_canvas(cfg.size)
    cfg = BenchConfig(
        **{**asdict(cfg), "workdir": workdir, "neck": resolve_neck(cfg.neck, backbone.specs)}
    )
    del backbone
    regimes = regimes or (
        OUR_REGIMES
        + (
            TORCHVISION_REGIMES
            if cfg.backbone == "resnet50"
            and cfg.neck == "fpn"
            and cfg.head in ("faster-rcnn", "retinanet")
            else ()
        )
    )
    fresh = (cfg.device == "cpu") if fresh_process is None else fresh_process
    prepared = prepare(cfg, hybrid="adapters_hybrid" in regimes)
    records = []
    for regime in regimes:
        rec = (
            _run_regime_in_fresh_process(cfg, regime, prepared)
            if fresh
            else measure_regime(cfg, regime, prepared)
        )
        log(
            f"{cfg.backbone} {cfg.detector_name} {regime}: {rec['step_s_median']:.3f} s/step, "
            f"{rec['flops_per_step'] / 1e9:.0f} GFLOPs, peak {rec['peak_mem_bytes'] / 1e9:.2f} GB"
        )
        records.append(rec)
    fwd_vps, fwd_flops = backbone_forward_views_per_s(cfg)
    by = {r["regime"]: r for r in records}
    stages = {
        "extract_views_per_s": prepared["extract_views_per_s"],
        "backbone_forward_views_per_s": fwd_vps,
        "extract_vs_forward": prepared["extract_views_per_s"] / fwd_vps,
        "backbone_flops_per_view": fwd_flops,
        "cache_bytes_per_view": prepared["cache"]["bytes_per_view"],
        "cache_bytes_per_view_by_level": {
            lv["name"]: lv["bytes_stored"] / prepared["cache"]["views"]
            for lv in prepared["cache"]["levels"]
        },
        "compression_ratio": prepared["cache"]["compression_ratio"],
    }
    if fresh:
        stages["import_baseline_bytes"] = import_baseline_bytes()
    stages["break_even_epochs"], stages["break_even_reason"] = break_even(
        by, cfg.batch, prepared["extract_views_per_s"], cfg.device
    )
    return {"config": asdict(cfg), "records": records, "stages": stages}


def step_spread(times: list[float]) -> dict:
    """The spread of timed steps (seconds): min, quartiles (``statistics.quantiles``, 'inclusive';
    the median itself for one step) and max."""
    q1, _, q3 = (
        statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    )
    return {"step_s_min": min(times), "step_s_q1": q1, "step_s_q3": q3, "step_s_max": max(times)}


def break_even(
    by: dict[str, dict], batch: int, extract_views_per_s: float, device: str
) -> tuple[float | None, str]:
    """(epochs after which extracting the cache has paid for itself, why): extracting one view costs
    1 / ``extract_views_per_s`` seconds once; each epoch then saves the online frozen step's time per
    view minus the cached step's. None (with the reason) when a regime is missing or the cached step
    is not cheaper on ``device``. ``by``: {regime: record with step_s_median (and step_s_min/max)}."""
    if "online_frozen" not in by or "cached" not in by:
        return None, "needs both the online_frozen and cached regimes (--regimes)"
    online = by["online_frozen"]["step_s_median"] / batch
    cached = by["cached"]["step_s_median"] / batch
    extract = 1 / extract_views_per_s
    if cached >= online:
        return None, (
            f"never: on {device} the cached step ({cached:.3f} s/view) is not cheaper than the online "
            f"frozen step ({online:.3f} s/view), so an epoch from the cache saves nothing to repay "
            f"extraction ({extract:.3f} s/view); the backbone's share of the step is too small here"
        )
    epochs = extract / (online - cached)
    a, b = by["online_frozen"], by["cached"]
    overlap = a.get("step_s_min", a["step_s_median"]) <= b.get("step_s_max", b["step_s_median"])
    return epochs, (
        f"{epochs:.2f} epochs: extracting a view costs {extract:.3f} s once, and each epoch from the "
        f"cache saves {online - cached:.3f} s/view ({online:.3f} online frozen - {cached:.3f} cached)"
        + ("; the two steps' spreads overlap: time more --steps to trust it" if overlap else "")
    )


def _child():
    req = json.loads(sys.stdin.read())
    cfgd = req["config"]
    cfgd["out_indices"] = tuple(cfgd["out_indices"]) if cfgd["out_indices"] is not None else None
    torch.set_num_threads(os.cpu_count() or 1)
    rec = measure_regime(BenchConfig(**cfgd), req["regime"], req["prepared"])
    print(json.dumps(rec))


if __name__ == "__main__":
    _child()
