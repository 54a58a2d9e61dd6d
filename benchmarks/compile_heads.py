"""Does ``torch.compile`` make the cached step faster? Our neck + heads (what ``train-heads``
builds by default) on identical ResNet-50 c2-c5 features, eager against compiled (the neck alone,
and the whole detector with graph breaks where torchvision's detection ops need them).

    python benchmarks/compile_heads.py [--size 384] [--batch 2] [--steps 5] [--threads 1]

Forward + backward, median of ``--steps`` after a warm-up that includes compilation (whose
seconds are reported apart), the variants interleaved step by step. Writes
benchmarks/results/compile_heads.{json,md}. Issue 15 keeps compilation only if it measures faster.
"""

from __future__ import annotations

import time

import torch
from heads_vs_torchvision import (
    default_options,
    inputs,
    interleaved,
    ours,
    parse,
    step_fn,
    write_results,
)

from cachedet.tools.bench import machine_info


def main(argv=None) -> dict:
    args = parse(argv, __doc__, size=384, steps=5, threads=1)
    feats, targets = inputs(args.size, args.batch)
    eager = ours(options=default_options()).train()
    neck = ours(options=default_options()).train()
    neck.neck = torch.compile(neck.neck)
    whole = torch.compile(ours(options=default_options()).train())
    fns = {
        "eager": step_fn(eager, feats, targets, args.size),
        "neck_compiled": step_fn(neck, feats, targets, args.size),
        "detector_compiled": step_fn(whole, feats, targets, args.size),
    }
    compile_s = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()  # the first call compiles
        compile_s[name] = time.perf_counter() - t
    step_s = interleaved(fns, 1, args.steps)
    result = {
        "machine": {**machine_info(), "threads": args.threads},
        "settings": {"size": args.size, "batch": args.batch, "steps": args.steps},
        "options": default_options(),
        "first_call_s": compile_s,
        "step_s": step_s,
        "vs_eager": {k: v / step_s["eager"] for k, v in step_s.items()},
    }
    return write_results(args.out, "compile_heads", result, markdown(result))


def markdown(r: dict) -> str:
    s, m = r["settings"], r["machine"]
    lines = [
        "# torch.compile of the cached step's detector",
        "",
        f"Default detector (`train-heads` with no detector flags) on ResNet-50 c2-c5 features at "
        f"{s['size']}², batch {s['batch']}, forward + backward, median of {s['steps']} interleaved "
        f"steps; {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}.",
        "",
        "| variant | first call s (compiles) | step s | vs eager |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {r['first_call_s'][k]:.1f} | {v:.3f} | {r['vs_eager'][k]:.3f} |"
        for k, v in r["step_s"].items()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
