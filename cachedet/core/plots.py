"""Pictures of runs and scores (matplotlib, drawn on Agg figures: no display, no global backend change).

- ``plot_curves``: RUN/curves.png from metrics.jsonl, losses (each term), lr and validation AP against steps.
- ``plot_per_class_ap``: a horizontal bar chart of per-class AP (box, and mask for mask runs).
- ``plot_pr_curves``: precision-recall curves per class at IoU 0.5 and averaged over IoU 0.5:0.95,
  from COCOeval's precision array (``cachedet.evaluation.scoring.coco_evaluate(..., curves=True)``).

matplotlib is an optional dependency (the ``plots`` extra): ``matplotlib_available`` says whether
it can be imported; each function raises ImportError when it cannot.
"""

from __future__ import annotations

import json

import numpy as np

NOT_LOSSES = ("epoch", "step", "lr", "views_per_s", "step_s")
CLASS_COLORS = [
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#9a6324",
    "#469990",
    "#800000",
    "#808000",
    "#000075",
    "#bfef45",
    "#ffe119",
    "#a9a9a9",
    "#dcbeff",
]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: str) -> str:
    import os

    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)  # a reader (an image viewer refreshing) never sees half a picture
    return path


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(training step lines, validation lines) of a metrics.jsonl; unreadable lines are skipped."""
    train, val = [], []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            (val if "val" in record else train if "loss" in record else []).append(record)
    return train, val


def plot_curves(metrics_path: str, out: str, smooth: int = 0) -> str:
    """RUN/curves.png: every loss term (moving average over ``smooth`` steps, default ~steps/50), lr, and
    validation box/mask AP and AP50 against optimiser steps. Returns ``out``."""
    train, val = read_metrics(metrics_path)
    fig, axes = _figure(13, 3.8, 1, 3)
    ax_loss, ax_lr, ax_val = axes[0]
    steps = np.array([r["step"] for r in train])
    terms = [k for k in (train[0] if train else {}) if k not in NOT_LOSSES]
    window = smooth or max(1, len(train) // 50)
    for i, term in enumerate(terms):
        y = np.array([r.get(term, np.nan) for r in train], dtype=float)
        if window > 1 and len(y) >= window:
            y = np.convolve(y, np.ones(window) / window, mode="valid")
        ax_loss.plot(
            steps[len(steps) - len(y) :],
            y,
            label=term,
            lw=2.2 if term == "loss" else 1.2,
            color="black" if term == "loss" else CLASS_COLORS[i % len(CLASS_COLORS)],
        )
    ax_loss.set(
        title="training losses" + (f" (moving average of {window} steps)" if window > 1 else ""),
        xlabel="step",
        ylabel="loss",
    )
    if terms:
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=7, ncol=2)
    ax_lr.plot(steps, [r["lr"] for r in train], color="#4363d8")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    vsteps = [r["step"] for r in val]
    for part, label, color in (("bbox", "box", "#e6194b"), ("segm", "mask", "#3cb44b")):
        for stat, style in (("AP", "-o"), ("AP50", "--s")):
            ys = [(r["val"].get(part) or {}).get(stat) for r in val]
            if any(y is not None for y in ys):
                ax_val.plot(
                    vsteps,
                    [np.nan if y is None else y for y in ys],
                    style,
                    color=color,
                    ms=4,
                    label=f"{label} {stat}",
                )
    ax_val.set(title="validation", xlabel="step", ylabel="AP (0-100)")
    if val:
        ax_val.legend(fontsize=7)
        ax_val.set_xlim(0, max(steps.max() if len(steps) else 1, max(vsteps)) * 1.02)
    else:
        ax_val.text(
            0.5,
            0.5,
            "no validation\n(train-heads --val-annotations\nwith --val-images or --val-cache)",
            ha="center",
            va="center",
            transform=ax_val.transAxes,
            color="gray",
        )
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_per_class_ap(per_class: list[dict], out: str, title: str = "AP per class") -> str:
    """A bar chart of ``per_class`` rows ({name, category_id, AP[, mask_AP]}, AP 0..100 or None). Returns ``out``."""
    names = [f"{r['name']} ({r['category_id']})" for r in per_class]
    masks = any("mask_AP" in r for r in per_class)
    fig, axes = _figure(7, 1.2 + 0.38 * max(len(names), 1) * (1.6 if masks else 1))
    ax = axes[0][0]
    y = np.arange(len(names))
    height = 0.4 if masks else 0.7
    for offset, key, label, color in (
        (0, "AP", "box AP", "#4363d8"),
        (1, "mask_AP", "mask AP", "#3cb44b"),
    ):
        if key == "mask_AP" and not masks:
            continue
        values = [r.get(key) for r in per_class]
        pos = y + (offset - 0.5) * height if masks else y
        bars = ax.barh(
            pos, [0 if v is None else v for v in values], height=height, color=color, label=label
        )
        for bar, v in zip(bars, values):
            ax.text(
                bar.get_width() + 0.5,
                bar.get_y() + bar.get_height() / 2,
                "no val objects" if v is None else f"{v:.1f}",
                va="center",
                fontsize=8,
            )
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 105), xlabel="AP (IoU 0.5:0.95, 0-100)", title=title)
    if masks:
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out)


def plot_pr_curves(
    precision: np.ndarray, names: list[str], out: str, title: str = "precision-recall"
) -> str:
    """Per-class precision against recall from COCOeval's ``precision`` (T IoUs x 101 recalls x K classes,
    area all, 100 detections; -1 where undefined): at IoU 0.5, and averaged over IoU 0.5:0.95. Returns ``out``."""
    precision = np.asarray(precision, dtype=float)
    recall = np.linspace(0, 1, precision.shape[1])
    fig, axes = _figure(11, 4.6, 1, 2)
    for ax, sub, label in (
        (axes[0][0], precision[:1], "IoU 0.5"),
        (axes[0][1], precision, "IoU 0.5:0.95 (mean)"),
    ):
        for k, name in enumerate(names):
            p = sub[:, :, k]
            if (p < 0).all():
                continue  # no ground truth of this class
            curve = p.mean(axis=0)
            ap = float(curve.mean() * 100)  # = COCOeval's per-class AP for the IoUs shown
            ax.plot(
                recall, curve, color=CLASS_COLORS[k % len(CLASS_COLORS)], label=f"{name} ({ap:.1f})"
            )
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.02),
            xlabel="recall",
            ylabel="precision",
            title=f"{title}, {label}",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="class (AP)", title_fontsize=7, loc="lower left")
    return _save(fig, out)
