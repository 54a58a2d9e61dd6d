"""Markdown tables of benchmarks/recipe_study.py's records: mean box AP over seeds with each seed's
value, so that the spread between seeds is in view."""

from __future__ import annotations

import statistics

SHORT_RANGE, PAPER_RANGE = (0.8, 1.25), (0.1, 2.0)


def _ap(rows: list[dict], key: str = "AP") -> str:
    aps = [r[key] for r in sorted(rows, key=lambda r: r["seed"])]
    if not aps:
        return "-"
    return f"{statistics.mean(aps):.1f} ({' / '.join(f'{a:.1f}' for a in aps)})"


def _step(rows: list[dict]) -> str:
    return f"{statistics.median(r['step_s_median'] for r in rows):.3f}" if rows else "-"


def _select(records: list[dict], **match) -> list[dict]:
    def fits(r):
        return all(
            (tuple(r.get(k)) if isinstance(r.get(k), list) else r.get(k)) == v
            for k, v in match.items()
        )

    return [r for r in records if fits(r)]


def _base(records: list[dict], epochs: int) -> list[dict]:
    """The 2-FC cells on the base cache (LSJ 0.8-1.25, 4 views) of the grid."""
    return _select(records, part="grid", views=4, scale_range=SHORT_RANGE, epochs=epochs)


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
                f"| {rng[0]}–{rng[1]} | {k} | {_ap(short)} | {_ap(short, 'AP50')} | {_ap(long)} | "
                f"{_ap(long, 'AP50')} |"
            )
    return lines


def _span(rows: list[dict], key: str) -> str:
    lo, hi = min(r[key] for r in rows), max(r[key] for r in rows)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _rows_table(title: str, note: str, rows: list[tuple[str, list[dict]]]) -> list[str]:
    lines = (
        [title, ""]
        + ([note, ""] if note else [])
        + [
            "| variant | steps | warm-up | box AP | AP50 | median step s | train s |",
            "|---|---|---|---|---|---|---|",
        ]
    )
    for label, rs in rows:
        if not rs:
            lines.append(f"| {label} | - | - | - | - | - | - |")
            continue
        train_s = statistics.mean(r["train_seconds"] for r in rs)
        lines.append(
            f"| {label} | {_span(rs, 'steps')} | {_span(rs, 'warmup_steps')} | {_ap(rs)} | "
            f"{_ap(rs, 'AP50')} | {_step(rs)} | {train_s:.0f} |"
        )
    return lines


def step_time_lines(records: list[dict]) -> list[str]:
    """The interleaved step times of the two box heads (one batch, the heads in turn each step)."""
    rows = _select(records, part="step-time")
    if not rows:
        return []
    lines = [
        "Training step (forward, backward, SGD) on one cached batch, the two heads in turn each "
        "step, median of 30, 1 thread:",
        "",
        "| seed process | 2-FC s | 4conv1fc s | 4conv1fc / 2-FC |",
        "|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["seed"]):
        two, four = r["step_s"]["2fc"], r["step_s"]["4conv1fc"]
        lines.append(f"| {r['seed']} | {two:.3f} | {four:.3f} | {four / two:.2f} |")
    return lines + [""]


def head_and_recipe_tables(records: list[dict], settings: dict) -> list[str]:
    rows = []
    for sched in ("short", "long"):
        epochs = settings[f"{sched}_epochs"]
        rows += [
            (f"{sched}: 2-FC head", _base(records, epochs)),
            (
                f"{sched}: 4conv1fc head, equal steps",
                _select(records, part="head-equal-steps", epochs=epochs),
            ),
            (
                f"{sched}: 2-FC head, equal wall time",
                _select(records, part="head-equal-time", schedule=sched),
            ),
            (
                f"{sched}: paper recipe (LSJ 0.1–2.0 + 4conv1fc)",
                _select(records, part="recipe-paper", epochs=epochs),
            ),
        ]
    warm = [
        ("warm-up min(1000, 5%)", _base(records, settings["short_epochs"])),
        ("warm-up fixed 100 steps (old default)", _select(records, part="warmup-fixed-100")),
    ]
    return (
        _rows_table(
            "## Box head and recipe (4 cached views)",
            "LSJ 0.8–1.25 unless stated. Equal wall time: the 2-FC head trains for the steps that "
            "fit in the 4conv1fc run's time, by the ratio of their interleaved step times (table "
            "below; per seed process). The runs' own median step times include whatever else the "
            "2 cores ran at the time, so compare heads by the interleaved table.",
            rows,
        )
        + [""]
        + step_time_lines(records)
        + _rows_table("## Warm-up (short schedule, LSJ 0.8–1.25, 2-FC head)", "", warm)
    )


def backbone_table(records: list[dict], settings: dict) -> list[str]:
    lines = [
        "## Backbone (offline ImageNet weights; short schedule, LSJ 0.8–1.25, 4 views, 2-FC head)",
        "",
        "Cached step: median of the run. Backbone forward: the frozen pass on one training batch "
        "(what `--online` adds to every step), 1 thread; its share is of an online step "
        "(forward + cached step).",
        "",
        "| backbone | box AP | AP50 | cached step s | backbone forward s | backbone share | "
        "GFLOPs/view | extract s (all views) | KB per view |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("efficientnet_lite0", _base(records, settings["short_epochs"]))]
    rows += [
        (n, _select(records, part="backbone", backbone=n))
        for n in ("efficientnet_lite1", "efficientnet_lite2")
    ]
    for name, rs in rows:
        timing = _select(records, part="backbone-time", backbone=name)
        fwd, share, gflops = "-", "-", "-"
        if timing:
            t = timing[-1]
            fwd, gflops = f"{t['forward_s_per_batch']:.3f}", f"{t['gflops_per_view']:.2f}"
            if rs:
                step = statistics.median(r["step_s_median"] for r in rs)
                share = f"{t['forward_s_per_batch'] / (t['forward_s_per_batch'] + step):.0%}"
        if not rs:
            lines.append(f"| {name} | - | - | - | {fwd} | - | {gflops} | - | - |")
            continue
        lines.append(
            f"| {name} | {_ap(rs)} | {_ap(rs, 'AP50')} | {_step(rs)} | {fwd} | {share} | {gflops} | "
            f"{rs[0]['extract_seconds']:.0f} | {rs[0]['bytes_per_view'] / 1e3:.0f} |"
        )
    return lines


def report(records: list[dict], settings: dict, machine: dict) -> str:
    head = [
        "# Recipe study: defaults at the user's schedule (measured)",
        "",
        f"Demo dataset, reduced: {settings['train_images']} train / {settings['val_images']} val "
        f"images, canvas {settings['size']}, EfficientNet-Lite0 (ImageNet, offline) unless stated, "
        f"FPN ({settings['neck_channels']} channels) + Faster R-CNN, batch {settings['batch_size']}, "
        f"SGD at the default lr {settings['lr']:g}, step decay. Short = {settings['short_epochs']} "
        f"epochs ({settings['short_steps']} steps), long = {settings['long_epochs']} epochs "
        f"({settings['long_steps']} steps). Seeds {settings['seeds']} change initial weights and "
        f"batch order; the caches are shared. {settings.get('threads_per_run', '?')} thread per "
        f"run, one process per seed. Machine: {machine['cpu']}, {machine['cores']} cores, torch "
        f"{machine['torch']}, timm {machine['timm']}, Python {machine['python']}.",
        "",
    ]
    parts = [
        grid_table(records, settings),
        head_and_recipe_tables(records, settings),
        backbone_table(records, settings),
    ]
    return "\n".join(head + [line for p in parts for line in p + [""]])
