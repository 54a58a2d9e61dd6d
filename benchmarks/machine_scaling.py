"""How this machine's own work scales from 1 to 2 processes, each pinned to its own core: the bound
that ``extract_overhead``'s 2-process views/s sits against (issue 15).

Three kinds of work, each run alone in 1 process, then in 2 processes at once (3 times in turn):
a cache-resident float loop (128 KB, compute only), a 64 MB memory copy (memory bandwidth), and
Blosc zstd with bit-shuffle on a 6.5 MB float16 ReLU block (ResNet-50 c3 at 640², as extraction
compresses it). Reports the ratio of the 2 processes' calls/s to 1 process's.

Run: ``flock /tmp/cpu-bench.lock python benchmarks/machine_scaling.py`` (writes
``benchmarks/results/machine_scaling.{json,md}``).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

from cachedet.tools.bench import machine_info

KINDS = {"compute": 400, "memcpy": 60, "blosc": 60}  # kind: calls per run
ROUNDS = 3


def _call(kind: str, seed: int):
    import numcodecs

    if kind == "blosc":
        numcodecs.blosc.use_threads = False  # one thread, as zarr calls it
        rng = np.random.default_rng(seed)
        x = (np.maximum(rng.standard_normal((512, 80, 80)), 0) * 0.5).astype(np.float16)
        codec = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
        return lambda: codec.encode(x)
    if kind == "memcpy":
        a = np.ones(64 << 20, dtype=np.uint8)
        b = np.empty_like(a)
        return lambda: np.copyto(b, a)
    a = np.ones(32 << 10, dtype=np.float32)  # 128 KB: stays in the core's cache
    return lambda: [np.sqrt(a, out=a) for _ in range(50)]


def calls_per_s(args) -> float:
    core, kind = args
    os.sched_setaffinity(0, {core})
    fn = _call(kind, core)
    fn()
    t = time.perf_counter()
    for _ in range(KINDS[kind]):
        fn()
    return KINDS[kind] / (time.perf_counter() - t)


def scaling(kind: str) -> list[float]:
    ctx = mp.get_context("spawn")
    cores = sorted(os.sched_getaffinity(0))[:2]
    out = []
    for _ in range(ROUNDS):
        with ctx.Pool(1) as pool:
            one = pool.map(calls_per_s, [(cores[0], kind)])[0]
        with ctx.Pool(2) as pool:
            two = sum(pool.map(calls_per_s, [(c, kind) for c in cores]))
        out.append(two / one)
    return out


def main():
    res = {"machine": machine_info(), "kinds": {}}
    for kind in KINDS:
        r = scaling(kind)
        res["kinds"][kind] = {"ratios": [round(v, 3) for v in r], "median": statistics.median(r)}
        print(kind, res["kinds"][kind], flush=True)
    m = res["machine"]
    md = [
        "# This machine's own 1 → 2 process scaling",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), Python {m['python']}. Each process pinned to "
        f"its own core; {ROUNDS} rounds of 1 process then 2 at once; the ratio is the 2 processes' "
        "calls/s over 1 process's.",
        "",
        "| work | 2 procs / 1 (median) | rounds |",
        "|---|---|---|",
    ]
    for kind, v in res["kinds"].items():
        md.append(f"| {kind} | {v['median']:.2f} | {', '.join(str(x) for x in v['ratios'])} |")
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(here, "machine_scaling.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(here, "machine_scaling.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
