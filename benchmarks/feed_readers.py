"""The cached feed in bytes per second (issue 29): one process reading a ResNet-50 c3-c5 640² store
(11.5 MB of float16 per view) in each stored dtype, with each reader zarr can be given.

For float16, bfloat16, uint8 and uint4 stores of the same views (a stub backbone's ReLU-like
features, ``extract_overhead.StubBackbone``, through the real extraction pipeline), one process
(one torch thread) reads every shard and decodes it to float32, with:

- ``cachedet zarrs`` / ``cachedet zarr``: ``CachedViews``, the feed train-heads runs (read check,
  shuffle buffer, decode), with ``loader.reader`` zarrs (its default when installed) and zarr;
- ``zarr``: zarr-python's default codec pipeline, whole shard blocks per call, then decode;
- ``zarrs``: the same calls with zarr's ``codec_pipeline.path`` set to the Rust ``zarrs`` pipeline
  (``pip install zarrs``);
- ``tensorstore``: tensorstore's zarr3 driver reading the same blocks (``pip install tensorstore``).

Every zarr reader decodes on one thread (zarr's ``threading.max_workers`` 1, as train-heads'
DataLoader workers do), so its figure is one process's and one core's; tensorstore keeps its own
thread pool, so compare it by views per CPU second. Readers run in turn, ``--rounds`` times
(medians of wall and CPU seconds), and each checks that it returns the bytes zarr's default
pipeline does (the two cachedet feeds: the same arrays as each other). Reported per dtype and
reader: views/s, views per CPU second, stored MB/s, decoded float32 MB/s, and how many such
processes would feed the 119 views/s a cached Faster R-CNN step consumed on an H200 at this
configuration (``benchmarks/results/mask_cost_cuda.md``). Writes
``benchmarks/results/feed_readers.{json,md}``.

    python benchmarks/feed_readers.py [--views 48] [--rounds 5] [--work /tmp/cachedet-feed]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from extract_overhead import install_stub, make_dataset  # noqa: E402

from cachedet.core.atomic import write_bytes_atomic, write_json_atomic  # noqa: E402
from cachedet.tools.bench import machine_info  # noqa: E402

DTYPES = ("float16", "bfloat16", "uint8", "uint4")
H200_VIEWS_PER_S = 119  # cached Faster R-CNN step, R50 c3-c5 640² (mask_cost_cuda.md: 0.067 s / 8)
LEVELS, SIZE, SHARD_VIEWS = ("c3", "c4", "c5"), 640, 8


def make_store(work: str, dtype: str, views: int) -> str:
    from cachedet.backbones.backbone import BackboneConfig
    from cachedet.data.views import AugmentConfig
    from cachedet.extraction.run import ExtractConfig, extract

    out = os.path.join(work, f"{dtype}.zarr")
    if os.path.exists(out):
        return out
    install_stub(LEVELS, SIZE)
    data = make_dataset(os.path.join(work, "data"), (640, 480), count=views)
    cfg = ExtractConfig(
        annotations=data["train"],
        images=data["images"],
        out=out,
        backbone=BackboneConfig("stub_resnet50", None, "random"),
        augment=AugmentConfig(size=SIZE, seed=0),
        views=1,
        dtype=dtype,
        shard_views=SHARD_VIEWS,
        batch_size=2,
        device="cpu",
        recipe="short",
    )
    extract(cfg, progress=False)
    return out


def readers(url: str):
    """{name: read()} for one store; each read returns {level: float32 blocks} of every shard."""
    import zarr

    from cachedet.cache import schema
    from cachedet.cache.dataset import CachedViews
    from cachedet.cache.store import StoreReader

    reader = StoreReader(url)
    n, dtype, names = reader.num_views, reader.dtype, [s.name for s in reader.specs]
    quant = schema.is_quantized(dtype)
    epochs = itertools.count()

    def cachedet_feed(reader: str):
        dataset = CachedViews(url, views_per_epoch=1, shuffle_buffer=4, reader=reader)

        def read():
            dataset.set_epoch(next(epochs))
            got = {int(s["view"]): s["features"] for s in dataset}
            assert len(got) == n
            return {"feed": [got[v][k].numpy() for v in sorted(got) for k in names]}

        return read

    def zarr_blocks(pipeline: str | None):
        def read():
            with zarr.config.set({"codec_pipeline.path": pipeline} if pipeline else {}):
                g = zarr.open_group(url, mode="r")
                out = {}
                for name in names:
                    for a in range(0, n, SHARD_VIEWS):
                        x = g[f"features/{name}"][a : a + SHARD_VIEWS]
                        q = g[f"quant/{name}"][a : a + SHARD_VIEWS] if quant else None
                        out.setdefault(name, []).append((x, q))
                return decode_all(out, dtype)

        return read

    def tensorstore_blocks():
        import tensorstore as ts

        def open_array(path):
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/{path}"}}
            return ts.open(spec, read=True).result()

        arrays = {
            name: (
                open_array(f"features/{name}"),
                open_array(f"quant/{name}") if quant else None,
            )
            for name in names
        }

        def read():
            out = {}
            for name, (feat, q) in arrays.items():
                for a in range(0, n, SHARD_VIEWS):
                    x = feat[a : a + SHARD_VIEWS].read().result()
                    qq = q[a : a + SHARD_VIEWS].read().result() if q is not None else None
                    out.setdefault(name, []).append((x, qq))
            return decode_all(out, dtype)

        return read

    found = {"cachedet zarr": cachedet_feed("zarr"), "zarr": zarr_blocks(None)}
    try:
        import zarrs  # noqa: F401

        found["cachedet zarrs"] = cachedet_feed("zarrs")
        found["zarrs"] = zarr_blocks("zarrs.ZarrsCodecPipeline")
    except ImportError:
        pass
    try:
        import tensorstore  # noqa: F401

        found["tensorstore"] = tensorstore_blocks()
    except ImportError:
        pass
    return found, reader


def decode_all(blocks: dict, dtype: str) -> dict:
    from cachedet.cache import schema

    return {
        name: [schema.decode(np.asarray(x), dtype, q) for x, q in parts]
        for name, parts in blocks.items()
    }


def measure(url: str, rounds: int) -> dict:
    import torch
    import zarr

    from cachedet.cache.layout import url_fs

    torch.set_num_threads(1)
    with zarr.config.set({"threading.max_workers": 1}):  # one decode thread, as in a worker
        found, reader = readers(url)
        reference = found["zarr"]()
        feed_reference = found["cachedet zarr"]()
        same = {}
        for name, read in found.items():  # warm-up, and the bytes each reader returns
            got = read()
            ref = feed_reference if name.startswith("cachedet") else reference
            same[name] = all(np.array_equal(a, b) for k in ref for a, b in zip(ref[k], got[k]))
        passes = []
        for _ in range(rounds):
            row = {}
            for name, read in found.items():
                t, c = time.perf_counter(), time.process_time()
                read()
                row[name] = (time.perf_counter() - t, time.process_time() - c)
            passes.append(row)
    fs, path = url_fs(url)
    stored = sum(fs.size(f) for f in fs.find(f"{path}/features"))
    decoded = sum(sum(b.nbytes for b in blocks) for blocks in reference.values())
    n = reader.num_views
    out = {}
    for name in found:
        s = statistics.median(p[name][0] for p in passes)
        cpu = statistics.median(p[name][1] for p in passes)
        out[name] = {
            "seconds": s,
            "cpu_seconds": cpu,
            "views_per_s": n / s,
            "views_per_cpu_s": n / cpu,
            "stored_mb_per_s": stored / s / 1e6,
            "decoded_mb_per_s": decoded / s / 1e6,
            "processes_for_h200": math.ceil(H200_VIEWS_PER_S / (n / s)),
            "same_bytes_as_zarr": same.get(name),
        }
    return {
        "views": n,
        "stored_bytes_per_view": stored / n,
        "decoded_bytes_per_view": decoded / n,
        "readers": out,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# The cached feed per process, by stored dtype and reader (measured)",
        "",
        f"ResNet-50 c3-c5 at 640² (stub features of its shapes, ReLU-like), {result['views']} views "
        f"in shards of {SHARD_VIEWS}, zstd + bit-shuffle; one process, one torch thread, every "
        "shard read and decoded to float32 (zarr readers on one decode thread; tensorstore on its "
        "own thread pool: compare it by views per CPU second); medians of "
        f"{result['rounds']} passes, readers in turn. Processes for the H200: how many such "
        f"processes feed {H200_VIEWS_PER_S} views/s (a cached Faster R-CNN step on an H200, "
        "mask_cost_cuda.md). Machine: "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average before "
        f"{result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}.",
        "",
        "| dtype | stored KB/view | reader | views/s | views per CPU s | stored MB/s | decoded MB/s"
        " | processes for 119 views/s | same arrays |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype, r in result["dtypes"].items():
        for name, x in r["readers"].items():
            same = {True: "yes", False: "NO", None: "-"}[x["same_bytes_as_zarr"]]
            lines.append(
                f"| {dtype} | {r['stored_bytes_per_view'] / 1e3:.0f} | {name} | {x['views_per_s']:.1f}"
                f" | {x['views_per_cpu_s']:.1f} | {x['stored_mb_per_s']:.0f}"
                f" | {x['decoded_mb_per_s']:.0f} | {x['processes_for_h200']} | {same} |"
            )
    lines += [
        "",
        "The cachedet feed, zarrs over zarr (train-heads' `loader.reader`; auto = zarrs):",
        "",
    ]
    lines += ["| dtype | views/s | views per CPU s |", "|---|---|---|"]
    for dtype, r in result["dtypes"].items():
        x, y = r["readers"].get("cachedet zarrs"), r["readers"]["cachedet zarr"]
        if x:
            lines.append(
                f"| {dtype} | {x['views_per_s'] / y['views_per_s']:.2f}×"
                f" | {x['views_per_cpu_s'] / y['views_per_cpu_s']:.2f}× |"
            )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/cachedet-feed")
    ap.add_argument("--views", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    stores = {d: make_store(args.work, d, args.views) for d in DTYPES}
    result = {"machine": machine_info(), "rounds": args.rounds, "load_before": os.getloadavg()}
    result["dtypes"] = {d: measure(url, args.rounds) for d, url in stores.items()}
    result["views"] = args.views
    result["load_after"] = os.getloadavg()
    write_json_atomic(os.path.join(args.out, "feed_readers.json"), result, indent=1)
    write_bytes_atomic(os.path.join(args.out, "feed_readers.md"), markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
