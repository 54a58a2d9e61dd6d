"""The benchmark harness measures what it says (no timing is asserted: benchmarks are not tests)."""

import numpy as np
import pytest

from cachedet.core.errors import CachedetError
from cachedet.tools.bench import OUR_REGIMES, BenchConfig, decode_speeds, run_benchmark

REQUIRED = {
    "backbone",
    "detector",
    "size",
    "batch",
    "device",
    "regime",
    "step_s_median",
    "flops_per_step",
    "peak_mem_bytes",
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    cfg = BenchConfig(
        backbone="test_resnet",
        out_indices=None,
        size=96,
        batch=2,
        warmup=1,
        steps=2,
        num_classes=5,
        options={"box_convs": 0, "box_fcs": 2, "box_representation": 64, "rois_per_image": 32},
        workdir=str(tmp_path_factory.mktemp("bench")),
    )
    return run_benchmark(cfg, fresh_process=False, log=lambda *a: None)


def test_every_regime_is_measured_with_the_required_fields(small_run):
    recs = {r["regime"]: r for r in small_run["records"]}
    assert set(recs) == set(OUR_REGIMES)  # no torchvision peer for a non-ResNet-50 backbone
    for r in recs.values():
        assert REQUIRED <= r.keys()
        assert len(r["step_s_all"]) == 2 and r["step_s_median"] > 0 and r["peak_mem_bytes"] > 0
    f = {k: r["flops_per_step"] for k, r in recs.items()}
    # the same views through the same detector: only the backbone's share differs
    assert f["finetune"] > f["online_frozen"] > f["cached"] == f["heads_in_memory"] > 0


def test_stage_measurements(small_run):
    st = small_run["stages"]
    assert st["extract_views_per_s"] > 0 and st["backbone_forward_views_per_s"] > 0
    assert set(st["cache_bytes_per_view_by_level"]) == {"c3", "c4", "c5"}
    assert st["cache_bytes_per_view"] == pytest.approx(
        sum(st["cache_bytes_per_view_by_level"].values()), rel=0.05
    )
    assert "break_even_epochs" in st


def test_codec_table_covers_every_dtype_and_codec(small_run):
    rows = decode_speeds(
        small_run["config"]["workdir"] + "/bench.zarr", small_run["config"]["workdir"]
    )
    from cachedet.cache.schema import CODECS, DTYPES

    assert {(r["dtype"], r["codec"]) for r in rows} == {(d, c) for d in DTYPES for c in CODECS}
    assert set(DTYPES) >= {"float16", "bfloat16", "float32", "uint8", "float8", "uint4"}
    by = {(r["dtype"], r["codec"]): r for r in rows}
    assert by[("float32", "none")]["max_abs_error"] == 0
    assert by[("float16", "zstd")]["bytes_per_view"] < by[("float32", "zstd")]["bytes_per_view"]
    assert by[("bfloat16", "none")]["max_abs_error"] > by[("float16", "none")]["max_abs_error"]
    assert by[("uint8", "none")]["bytes_per_view"] < 0.6 * by[("float16", "none")]["bytes_per_view"]
    assert (
        by[("float8", "none")]["bytes_per_view"] < 0.6 * by[("float16", "none")]["bytes_per_view"]
    )
    assert (
        by[("uint4", "none")]["bytes_per_view"] < 0.35 * by[("float16", "none")]["bytes_per_view"]
    )
    assert all(np.isfinite(r["decode_MBps"]) and r["decode_MBps"] > 0 for r in rows)


def test_adapter_regimes_cost_between_cached_and_online(tmp_path):
    from cachedet.tools.bench import ADAPTER_REGIMES

    cfg = BenchConfig(
        backbone="test_resnet",
        out_indices=None,
        size=96,
        batch=2,
        warmup=1,
        steps=1,
        num_classes=5,
        options={"box_convs": 0, "box_fcs": 2, "box_representation": 64, "rois_per_image": 32},
        workdir=str(tmp_path),
    )
    run = run_benchmark(
        cfg,
        regimes=("online_frozen", "cached") + ADAPTER_REGIMES,
        fresh_process=False,
        log=lambda *a: None,
    )
    f = {r["regime"]: r["flops_per_step"] for r in run["records"]}
    # adapters add their own backward (and a backward through the last stage); the hybrid skips stages 0-3
    assert (
        f["adapters_online"] > f["online_frozen"]
        and f["cached"] < f["adapters_hybrid"] < f["adapters_online"]
    )


def test_bench_defaults_resolve_in_the_library_as_the_cli_had_them(cli):
    """BenchConfig.resolved fills what the CLI used to: R50-FPN levels and box head, device."""
    from cachedet.tools.bench import BENCH_REGIMES, TORCHVISION_LIKE
    from cachedet_cli.vocabulary import BENCH_REGIMES as CLI_REGIMES

    assert tuple(CLI_REGIMES) == BENCH_REGIMES
    r50 = BenchConfig().resolved()
    assert r50.out_indices == (1, 2, 3, 4) and r50.options == TORCHVISION_LIKE
    assert r50.device == "cpu" and r50.size == 640
    assert BenchConfig(backbone="test_vit").resolved().out_indices is None
    assert BenchConfig(head="retinanet").resolved().options == {}
    with pytest.raises(CachedetError, match=r"^BenchConfig\.batch: expected an integer >= 1"):
        BenchConfig(batch=0).resolved()
    with pytest.raises(CachedetError, match="^regimes warp: expected some of finetune"):
        run_benchmark(BenchConfig(), regimes=("warp",))
    r = cli("bench", "--batch-size", 0)
    assert r.exit_code == 2 and "--batch-size: expected an integer >= 1" in r.stderr, r.output
    r = cli("bench", "--regimes", "warp")
    assert r.exit_code == 2 and "--regimes warp: expected some of" in r.stderr, r.output


def _rec(median, lo, hi):
    return {"step_s_median": median, "step_s_min": lo, "step_s_max": hi}


def test_break_even_says_why():
    from cachedet.tools.bench import break_even, step_spread

    epochs, why = break_even({"online_frozen": _rec(1.0, 0.9, 1.1)}, 2, 10.0, "cpu")
    assert epochs is None and "online_frozen and cached" in why
    slower = {"online_frozen": _rec(1.0, 0.9, 1.1), "cached": _rec(1.2, 1.1, 1.3)}
    epochs, why = break_even(slower, 2, 10.0, "cpu")
    assert epochs is None and why.startswith("never: on cpu the cached step (0.600 s/view)")
    faster = {"online_frozen": _rec(1.0, 0.9, 1.1), "cached": _rec(0.6, 0.55, 0.65)}
    epochs, why = break_even(faster, 2, 10.0, "cpu")  # 0.1 s/view once, 0.2 s/view saved per epoch
    assert epochs == pytest.approx(0.5) and why.startswith("0.50 epochs") and "overlap" not in why
    close = {"online_frozen": _rec(1.0, 0.7, 1.1), "cached": _rec(0.9, 0.8, 1.0)}
    assert "spreads overlap" in break_even(close, 2, 10.0, "cpu")[1]
    assert step_spread([3.0, 1.0, 2.0, 4.0, 5.0]) == {
        "step_s_min": 1.0,
        "step_s_q1": 2.0,
        "step_s_q3": 4.0,
        "step_s_max": 5.0,
    }


def test_bench_command_prints_spread_and_break_even_reason(cli, monkeypatch):
    from cachedet.tools import bench

    result = {
        "config": {"neck": "fpn"},
        "records": [
            {"regime": r, "flops_per_step": 1e9, "peak_mem_bytes": 1e9, **_rec(m, lo, hi)}
            for r, m, lo, hi in (("online_frozen", 1.0, 0.9, 1.1), ("cached", 1.2, 1.1, 1.3))
        ],
        "stages": {
            "extract_views_per_s": 10.0,
            "backbone_forward_views_per_s": 20.0,
            "cache_bytes_per_view": 1e6,
            "break_even_epochs": None,
            "break_even_reason": "never: on cpu the cached step is not cheaper",
        },
    }
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: result)
    monkeypatch.setenv("COLUMNS", "200")
    r = cli("bench", "--backbone", "test_resnet", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "1.100-1.300" in r.output and "min-max" in r.output
    assert "break-even: never: on cpu the cached step is not cheaper" in r.output
