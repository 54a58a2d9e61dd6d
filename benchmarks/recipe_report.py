"""Markdown tables of benchmarks/recipe_study.py's records: mean box AP over seeds with each seed's value,
so the spread between seeds is in view."""

from __future__ import annotations

import statistics


def _ap(rows: list[dict]) -> str:
    aps = [r["AP"] for r in sorted(rows, key=lambda r: r["seed"])]
    if not aps:
        return "-"
    return f"{statistics.mean(aps):.1f} ({' / '.join(f'{a:.1f}' for a in aps)})"


def _ap50(rows: list[dict]) -> str:
    return f"{statistics.mean(r['AP50'] for r in rows):.1f}" if rows else "-"


def _step(rows: list[dict]) -> str:
    return f"{statistics.median(r['step_s_median'] for r in rows):.3f}" if rows else "-"


def _select(records: list[dict], **match) -> list[dict]:
    def fits(r):
        return all((tuple(r[k]) if isinstance(r[k], list) else r[k]) == v for k, v in match.items())

    return [r for r in records if fits(r)]


def grid_table(records: list[dict], settings: dict) -> list[str]:
    lines = [
        "## Jitter range x cached views x schedule",
        "",
        "Box AP: mean over seeds (each seed). Faster R-CNN 2-FC head, warm-up min(1000, 5%).",
        "",
        "| LSJ range | views K | short: box AP | AP50 | long (4x): box AP | AP50 |",
        "|---|---|---|---|---|---|",
    ]
    grid = [r for r in records if r["part"] == "grid"]
    for rng in sorted({tuple(r["scale_range"]) for r in grid}):
        for k in sorted({r["views"] for r in grid}):
            short = _select(grid, scale_range=rng, views=k, epochs=settings["short_epochs"])
            long = _select(grid, scale_range=rng, views=k, epochs=settings["long_epochs"])
            lines.append(
                f"| {rng[0]}–{rng[1]} | {k} | {_ap(short)} | {_ap50(short)} | {_ap(long)} | {_ap50(long)} |"
            )
    return lines


def comparison_table(records: list[dict], settings: dict) -> list[str]:
    base = [
        r
        for r in records
        if r["part"] == "grid"
        and r["views"] == 4
        and tuple(r["scale_range"]) == (0.8, 1.25)
        and r["epochs"] == settings["short_epochs"]
    ]
    rows = [
        ("2-FC head, short", base),
        ("4conv1fc head, equal steps", [r for r in records if r["part"] == "head-equal-steps"]),
        ("2-FC head, equal wall time", [r for r in records if r["part"] == "head-equal-time"]),
        (
            "warm-up: fixed 100 steps (old default)",
            [r for r in records if r["part"] == "warmup-fixed-100"],
        ),
    ]
    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        rows.append((f"backbone {name}", _select(records, part="backbone", backbone=name)))
    lines = [
        "## Box head, warm-up and backbone (LSJ 0.8–1.25, 4 views)",
        "",
        "| variant | steps | warm-up steps | box AP | AP50 | median step s | extract s | KB per view |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in rows:
        if not rs:
            lines.append(f"| {label} | - | - | - | - | - | - | - |")
            continue
        r0 = rs[0]
        lines.append(
            f"| {label} | {r0['steps']} | {r0['warmup_steps']} | {_ap(rs)} | {_ap50(rs)} | {_step(rs)} | "
            f"{r0['extract_seconds']:.0f} | {r0['bytes_per_view'] / 1e3:.0f} |"
        )
    return lines


def report(records: list[dict], settings: dict, machine: dict) -> str:
    head = [
        "# Recipe study: defaults at the user's schedule (measured)",
        "",
        f"Demo dataset, reduced: {settings['train_images']} train / {settings['val_images']} val images, canvas "
        f"{settings['size']}, EfficientNet-Lite0 (ImageNet, offline) unless stated, FPN ({settings['neck_channels']} "
        f"channels) + Faster R-CNN, batch {settings['batch_size']}, SGD lr {settings['lr']}, step decay. Short = "
        f"{settings['short_epochs']} epochs ({settings['short_steps']} steps), long = {settings['long_epochs']} epochs "
        f"({settings['long_steps']} steps). Seeds {settings['seeds']} change initial weights and batch order; the "
        f"cache is shared. Machine: {machine['cpu']}, {machine['cores']} cores (shared), torch {machine['torch']}, "
        f"timm {machine['timm']}, Python {machine['python']}.",
        "",
    ]
    return (
        "\n".join(head + grid_table(records, settings) + [""] + comparison_table(records, settings))
        + "\n"
    )
