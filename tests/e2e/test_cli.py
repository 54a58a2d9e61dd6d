"""The command line's vocabulary and help: choices, help for every option, examples, old spellings,
--version, and that answering --help loads neither torch nor timm."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import typing

import pytest
import typer.main

from cachedet_cli import vocabulary as voc
from cachedet_cli.main import app


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps help at the terminal's width


COMMANDS = (
    "demo",
    "extract",
    "train-heads",
    "eval",
    "predict",
    "model-info",
    "bench",
    "export",
    "cache info",
    "cache verify",
    "cache repair",
)


def commands() -> dict:
    root = typer.main.get_command(app)
    out = {}
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        elif not cmd.hidden:
            out[name] = cmd
    return out


def test_help_loads_neither_torch_nor_timm():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom cachedet_cli.main import app\n"
        f"for c in {list(COMMANDS)!r} + ['']:\n"
        "    r = CliRunner().invoke(app, c.split() + ['--help'])\n"
        "    assert r.exit_code == 0, (c, r.output)\n"
        "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'zarr', 'dask') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_version(cli):
    r = cli("--version")
    assert r.exit_code == 0 and re.fullmatch(r"cachedet \S+ \(torch \S+, timm \S+\)\n", r.stdout)


def test_every_option_has_help_and_every_command_examples(cli):
    assert set(commands()) == set(COMMANDS)
    for name, cmd in commands().items():
        missing = [p.name for p in cmd.params if p.param_type_name == "option" and not p.help]
        assert missing == [], f"{name}: options without help: {missing}"
        r = cli(*name.split(), "--help")
        assert r.exit_code == 0 and "Examples:" in r.stdout and f"cachedet {name} " in r.stdout


def test_choices_are_shown_as_choices(cli):
    r = cli("train-heads", "--help")
    for choices in (
        "auto|fpn|nasfpn|simple",
        "faster-rcnn|cascade|retinanet",
        "sgd|adamw",
        "step|cosine",
    ):
        assert choices in r.stdout
    assert "float16|bfloat16|float32|uint8" in cli("extract", "--help").stdout
    r = cli("model-info", "--neck", "fpnn")
    assert r.exit_code == 2 and "fpnn" in r.output


def test_train_heads_options_are_grouped_in_panels(cli):
    out = cli("train-heads", "--help").stdout
    for panel in ("Data", "Model", "Optimisation", "Online (no cache)", "Adapters", "Run"):
        assert f"─ {panel} ─" in out


def test_old_spellings_work_hidden_with_a_warning(cli, capsys):
    assert voc.rename_aliases("bench", ["--batch", "3", "--batch=4", "--", "--batch"]) == [
        "--batch-size",
        "3",
        "--batch-size=4",
        "--",
        "--batch",
    ]
    assert "bench --batch is now --batch-size" in capsys.readouterr().err
    for name, aliases in voc.ALIASES.items():
        cmd = commands()[name]
        for old, new in aliases.items():
            ctx = cmd.make_context(
                name,
                [old, "3"]
                + (["--out", "x"] if name == "train-heads" else [])
                + (
                    ["--annotations", "a", "--images", "i", "--out", "o"]
                    if name == "extract"
                    else []
                ),
            )
            assert ctx.params[new.lstrip("-").replace("-", "_")] == 3
            assert not re.search(rf"(?<![\w-]){old}(?![\w-])", cli(name, "--help").stdout), (
                name,
                old,
            )


def test_one_name_for_one_thing():
    """--batch-size, --loader-workers, --device (default auto) and --size (default 640) wherever they exist."""
    for name, cmd in commands().items():
        opts = {o: p for p in cmd.params if p.param_type_name == "option" for o in p.opts}
        assert not {"--batch", "--workers"} & set(opts), name
        if "--device" in opts:
            assert opts["--device"].default == "auto", name
        if "--size" in opts:
            assert opts["--size"].default in (voc.DEFAULT_CANVAS, None), name


def test_choices_and_defaults_equal_the_library():
    from cachedet.backbones.backbone import DEFAULT_BACKBONE
    from cachedet.cache.schema import CODECS, DTYPES
    from cachedet.engine.config import SourceConfig
    from cachedet.models.build import HEADS, NECKS
    from cachedet.tools.bench import ADAPTER_REGIMES, OUR_REGIMES, TORCHVISION_REGIMES

    assert voc.DEFAULT_BACKBONE == DEFAULT_BACKBONE and voc.DEFAULT_CANVAS == SourceConfig.size
    assert typing.get_args(voc.Neck) == ("auto", *NECKS) and typing.get_args(voc.Head) == tuple(
        HEADS
    )
    assert typing.get_args(voc.Dtype) == DTYPES and typing.get_args(voc.Codec) == CODECS
    assert set(voc.BENCH_REGIMES) == set(OUR_REGIMES + ADAPTER_REGIMES + TORCHVISION_REGIMES)


def test_every_extract_option_maps_to_a_config_field():
    from cachedet.backbones.backbone import BackboneConfig
    from cachedet.data.views import AugmentConfig
    from cachedet.extraction.run import ExtractConfig
    from cachedet_cli.extract import extract_command

    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    fields |= {f"backbone.{f.name}" for f in dataclasses.fields(BackboneConfig)}
    fields |= {f"augment.{f.name}" for f in dataclasses.fields(AugmentConfig)}
    options = inspect.signature(extract_command).parameters
    unmapped = {
        n: voc.EXTRACT_FIELD_OF.get(n, n)
        for n in options
        if voc.EXTRACT_FIELD_OF.get(n, n) not in fields | {None}
    }
    assert unmapped == {}
    assert voc.flags_of_field("workers", voc.EXTRACT_FIELD_OF) == "--dask-workers"
    assert voc.flags_of_field("workers", voc.TRAIN_FIELD_OF) == "--loader-workers"


def test_size_is_refused_for_a_cache_run(cli, tmp_path):
    r = cli("train-heads", "--cache", tmp_path / "s.zarr", "--out", tmp_path / "run", "--size", 320)
    assert (
        r.exit_code == 2
        and "--size 320: a cache run uses the canvas its store was made with" in r.stderr
    )


@pytest.mark.parametrize(
    "args",
    [
        "extract --annotations nope.json --images . --out x.zarr",
        "cache info nope.zarr",
        "cache verify nope.zarr",
        "eval --run . --annotations nope.json --images .",
        "predict a.png --run nope.run --out d.json",
        "train-heads --cache nope.zarr --out run",
        "train-heads --online --annotations nope.json --images . --out run",
    ],
)
def test_missing_input_is_refused_before_heavy_imports(args, tmp_path):
    """A missing file or store is named (with its option) before torch, timm, zarr or dask load."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom cachedet_cli.main import app\n"
        f"r = CliRunner().invoke(app, {args.split()!r})\n"
        "print(r.exit_code, r.output.strip())\n"
        "print(sorted(m for m in ('torch', 'timm', 'zarr', 'dask') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout.splitlines()
    assert out[0].startswith("2 cachedet: error: ") and "nope." in out[0], out
    assert "not found" in out[0] or "no feature store" in out[0], out
    assert out[-1] == "[]", out


def test_every_command_prints_user_errors_as_one_line():
    """Each registered command runs inside @user_errors (a decorator lost in a merge once left
    extract printing tracebacks)."""
    from cachedet_cli.main import app

    def commands(typer_app):
        for info in typer_app.registered_commands:
            yield info.callback
        for group in typer_app.registered_groups:
            yield from commands(group.typer_instance)

    found = list(commands(app))
    assert len(found) >= 10
    for callback in found:
        assert getattr(callback, "__wrapped__", None) is not None, callback.__name__
