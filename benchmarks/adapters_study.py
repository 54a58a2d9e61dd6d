"""Beyond freezing, measured on the demo dataset: AP and step time of the frozen backbone (from the
cache), frozen + residual adapters (online, and from a hybrid cache) and fine-tuning.

    python benchmarks/adapters_study.py [--work DIR] [--out benchmarks/results] [--epochs 8] [--size 256]

EfficientNet-Lite0 (ImageNet), FPN + Faster R-CNN, the same steps in every row. Adapters sit in
the backbone's last stage (4: blocks 5-6); the hybrid cache stores stages 0-3 (c3, c4), so only
stage 4 and the heads run per step. Writes adapters_study.json and adapters_study.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo_variants import make_cache, median_step_seconds, study_setup, train_and_score  # noqa: E402

from cachedet.core.atomic import write_json_atomic  # noqa: E402
from cachedet.tools.bench import machine_info  # noqa: E402

VIEWS = 2
ADAPT = (4,)


def main():
    args, s, paths = study_setup("adapters_work", __doc__)
    plain, _, _ = make_cache(args.work, paths, s, views=VIEWS)
    hybrid, hybrid_seconds, hybrid_info = make_cache(
        args.work, paths, s, views=VIEWS, cache_stage=ADAPT[0] - 1
    )
    rows = [
        ("frozen, from the cache", f"K{VIEWS}", dict(cache=plain)),
        (
            "frozen + adapters, online",
            "adapters-online",
            dict(online=True, adapters=True, adapt_stages=ADAPT),
        ),
        (
            "frozen + adapters, hybrid cache",
            "adapters-hybrid",
            dict(cache=hybrid, adapters=True, adapt_stages=ADAPT),
        ),
        ("fine-tuned, online", "finetune", dict(online=True, backbone_trainable=True)),
    ]
    records = []
    for label, name, kw in rows:
        scores = train_and_score(args.work, name, paths, s, **kw)
        records.append(
            {"regime": label, **scores, "step_s_median": median_step_seconds(args.work, name)}
        )
        print(records[-1], flush=True)
    result = {
        "machine": machine_info(),
        "settings": {
            "size": s.size,
            "epochs": s.epochs,
            "views": VIEWS,
            "adapt_stages": list(ADAPT),
            "hybrid_cache_bytes_per_view": hybrid_info["bytes_per_view"],
        },
        "records": records,
    }
    write_json_atomic(os.path.join(args.out, "adapters_study.json"), result, indent=2)
    base = records[0]
    lines = [
        f"Demo dataset, canvas {s.size}, {s.epochs} epochs, EfficientNet-Lite0 (ImageNet) + FPN + Faster R-CNN; "
        f"adapters in stage {ADAPT[0]}; caches hold {VIEWS} LSJ views per image.",
        "",
        "| regime | box AP | AP50 | median step (s) | step vs frozen cached |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['regime']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['step_s_median']:.2f} | "
            f"{r['step_s_median'] / base['step_s_median']:.2f}x |"
        )
    with open(os.path.join(args.out, "adapters_study.md"), "w") as f:
        f.write(
            "# Frozen, adapters (online / hybrid) and fine-tuned (measured)\n\n"
            + "\n".join(lines)
            + "\n"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
