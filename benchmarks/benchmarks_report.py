"""Markdown table and PNG plot from benchmarks/results/savings.json."""

from __future__ import annotations

import json
import os
import sys


def _ratio(a, b):
    return a / b if a and b else None


REGIME_ORDER = (
    "torchvision_finetune",
    "torchvision_frozen",
    "finetune",
    "online_frozen",
    "cached",
    "heads_in_memory",
    "adapters_online",
    "adapters_hybrid",
)
TITLES = {"fpn+faster-rcnn": "Faster R-CNN R50-FPN", "fpn+retinanet": "RetinaNet R50-FPN"}


def headline_records(result: dict, detector: str) -> dict[str, dict]:
    """The R50 headline records of one detector, by regime."""
    size = result["headline"]["config"]["size"]
    return {
        r["regime"]: r
        for r in result["records"]
        if r["size"] == size and r["detector"] == detector and r["backbone"].startswith("resnet50")
    }


def regime_table(by: dict[str, dict], title: str, hc: dict) -> list[str]:
    base = by.get("torchvision_frozen")
    lines = [
        f"### {title}, {hc['size']}x{hc['size']}, batch {hc['batch']}, {hc['device']} "
        f"(median of {hc['steps']} steps after {hc['warmup']} warm-up)",
        "",
        "| regime | step (s) | speed-up vs torchvision frozen | speed-up vs finetune | GFLOPs / step | peak memory (GB) | memory vs finetune |",
        "|---|---|---|---|---|---|---|",
    ]
    for regime in REGIME_ORDER:
        r = by.get(regime)
        if not r:
            continue
        vs_tv = f"{_ratio(base['step_s_median'], r['step_s_median']):.2f}x" if base else "-"
        lines.append(
            f"| {regime} | {r['step_s_median']:.2f} | {vs_tv} | "
            f"{_ratio(by['finetune']['step_s_median'], r['step_s_median']):.2f}x | {r['flops_per_step'] / 1e9:.0f} | "
            f"{r['peak_mem_bytes'] / 1e9:.2f} | {r['peak_mem_bytes'] / by['finetune']['peak_mem_bytes']:.2f} |"
        )
    return lines


def write_report(result: dict, out_dir: str) -> str:
    m = result["machine"]
    recs = result["records"]
    by = headline_records(result, "fpn+faster-rcnn")
    lines = [
        f"Machine: {m['cpu']} ({m['cores']} cores), GPU {m['gpu']}, torch {m['torch']}, Python {m['python']}.",
        "",
    ]
    lines += regime_table(by, TITLES["fpn+faster-rcnn"], result["headline"]["config"])
    if result.get("retinanet"):
        lines += [""] + regime_table(
            headline_records(result, "fpn+retinanet"),
            TITLES["fpn+retinanet"],
            result["retinanet"]["config"],
        )
    st = result["headline"]["stages"]
    if st.get("import_baseline_bytes") and "cached" in by:
        base = st["import_baseline_bytes"]
        lines += [
            "",
            f"A process that only imports torch, torchvision, timm, zarr and cachedet peaks at {base / 1e9:.2f} GB here "
            f"(torch's CUDA build); above that floor, `cached` uses {(by['cached']['peak_mem_bytes'] - base) / 1e9:.2f} GB "
            f"against `finetune`'s {(by['finetune']['peak_mem_bytes'] - base) / 1e9:.2f} GB "
            f"({(by['cached']['peak_mem_bytes'] - base) / (by['finetune']['peak_mem_bytes'] - base):.2f}x).",
        ]
    lines += [
        "",
        f"Extraction {st['extract_views_per_s']:.2f} views/s against backbone-only forward "
        f"{st['backbone_forward_views_per_s']:.2f} views/s ({st['extract_vs_forward']:.2f}x); cache "
        f"{st['cache_bytes_per_view'] / 1e6:.2f} MB per view ("
        + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in st["cache_bytes_per_view_by_level"].items())
        + f"), compression {st['compression_ratio']:.2f}x; break-even after "
        + (
            f"{st['break_even_epochs']:.2f} epochs"
            if st.get("break_even_epochs")
            else "- (cached not faster)"
        )
        + ".",
        "",
    ]
    lines += [
        "| dtype | codec | MB per view | compression | decode MB/s (float32 out) | max abs error |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["headline"]["codecs"]:
        lines.append(
            f"| {c['dtype']} | {c['codec']} | {c['bytes_per_view'] / 1e6:.3f} | {c['compression_ratio']:.2f}x | "
            f"{c['decode_MBps']:.0f} | {c['max_abs_error']:.2g} |"
        )
    if result["sweep"]:
        sc = result["sweep"][0]["config"]
        lines += [
            "",
            f"### Across backbones: Faster R-CNN, {sc['size']}x{sc['size']}, batch {sc['batch']} "
            "(CNNs: FPN on c3-c5, P3-P6; plain ViTs: ViTDet's simple pyramid on the last block, P2-P6)",
            "",
            "| backbone | neck | backbone share of frozen step FLOPs | finetune (s) | online frozen (s) | cached (s) | heads in memory (s) | cached vs online frozen | cached vs finetune | cached / heads in memory |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in result["sweep"]:
            name = s["config"]["backbone"]
            rr = {r["regime"]: r for r in recs if r["backbone"] == name and r["size"] == sc["size"]}
            share = (
                s["stages"]["backbone_flops_per_view"]
                * sc["batch"]
                / rr["online_frozen"]["flops_per_step"]
            )
            s["share"] = share
            lines.append(
                f"| {name} | {s['config']['neck']} | {share:.2f} | {rr['finetune']['step_s_median']:.2f} | {rr['online_frozen']['step_s_median']:.2f} | "
                f"{rr['cached']['step_s_median']:.2f} | {rr['heads_in_memory']['step_s_median']:.2f} | "
                f"{_ratio(rr['online_frozen']['step_s_median'], rr['cached']['step_s_median']):.2f}x | "
                f"{_ratio(rr['finetune']['step_s_median'], rr['cached']['step_s_median']):.2f}x | "
                f"{_ratio(rr['cached']['step_s_median'], rr['heads_in_memory']['step_s_median']):.2f} |"
            )
        for s in result["sweep"]:
            if s.get("machine"):  # measured in a later run than the rest of the table
                sm = s["machine"]
                lines.append(
                    f"\n{s['config']['backbone']}: measured in a separate run on {sm['cpu']} ({sm['cores']} cores), "
                    f"torch {sm['torch']}, timm {sm.get('timm', '?')}, Python {sm['python']}"
                    + (f"; {sm['note']}" if sm.get("note") else "")
                    + "."
                )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "savings.md"), "w") as f:
        f.write(text)
    _plot(result, by, out_dir)
    return text


def _plot(result, by, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, 2 if result["sweep"] else 1, figsize=(12 if result["sweep"] else 6, 4.2)
    )
    axes = axes if result["sweep"] else [axes]
    order = [r for r in REGIME_ORDER if r in by]
    colours = dict(
        zip(
            REGIME_ORDER,
            ["#999", "#bbb", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b"],
        )
    )
    axes[0].barh(order, [by[r]["step_s_median"] for r in order], color=[colours[r] for r in order])
    axes[0].set_xlabel("seconds per training step (median)")
    axes[0].set_title("Faster R-CNN R50-FPN")
    axes[0].invert_yaxis()
    if result["sweep"]:
        recs = result["records"]
        for s in result["sweep"]:
            name = s["config"]["backbone"]
            rr = {
                r["regime"]: r
                for r in recs
                if r["backbone"] == name and r["size"] == s["config"]["size"]
            }
            x = (
                s["stages"]["backbone_flops_per_view"]
                * s["config"]["batch"]
                / rr["online_frozen"]["flops_per_step"]
            )
            y = rr["online_frozen"]["step_s_median"] / rr["cached"]["step_s_median"]
            axes[1].scatter([x], [y])
            axes[1].annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes[1].set_xlabel("backbone share of a frozen step's FLOPs")
        axes[1].set_ylabel("speed-up of cached over online frozen")
        axes[1].axhline(1.0, color="#888", lw=0.8)
        axes[1].set_title("savings grow with the backbone's share")
    fig.suptitle(
        f"cachedet on {result['machine']['cpu']} ({result['machine']['cores']} cores)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "savings.png"), dpi=110)


if __name__ == "__main__":
    path = (
        sys.argv[1]
        if len(sys.argv) > 1
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "savings.json")
    )
    with open(path) as f:
        print(write_report(json.load(f), os.path.dirname(path)))
