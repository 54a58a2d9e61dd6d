"""The demo checks its options before any work and prints commands that the CLI accepts."""

import os
import shlex

import pytest

from cachedet.core.errors import CachedetError
from cachedet.tools.demo import QUICK, demo_commands, run_demo, smoke_note, train_settings


def test_a_bad_option_is_refused_before_the_dataset_is_made(tmp_path):
    with pytest.raises(CachedetError, match="^neck bifpn"):
        run_demo(str(tmp_path / "demo"), quick=True, progress=False, neck="bifpn")
    with pytest.raises(CachedetError, match="yolo"):
        run_demo(str(tmp_path / "demo"), quick=True, progress=False, head="yolo")
    assert not os.path.exists(tmp_path / "demo" / "data")


def test_demo_commands_parse(cli, tmp_path):
    cfg = train_settings(QUICK, str(tmp_path / "demo"), "fpn", "faster-rcnn", True)
    commands = demo_commands(QUICK, str(tmp_path / "demo"), cfg, "default")
    assert [c.split()[1] for c in commands] == ["extract", "train-heads", "eval"]
    for command in commands:
        r = cli(*shlex.split(command)[1:], "--help")  # unknown options fail before --help answers
        assert r.exit_code == 0, (command, r.output)
    for name, value in QUICK.head_options.items():
        assert f"--{name.replace('_', '-')} {value}" in commands[1]


def test_a_quick_run_without_ap_says_it_is_a_smoke_test():
    assert "smoke test" in smoke_note({"bbox": {"AP": 0.0}}, quick=True)
    assert smoke_note({"bbox": {"AP": 12.0}}, quick=True) is None
    assert smoke_note({"bbox": {"AP": 0.0}}, quick=False) is None


def test_the_demo_names_only_files_the_run_wrote(tmp_path):
    from cachedet_cli.demo import written_files

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert written_files(str(run)) == ""
    (run / "checkpoints" / "best.pt").write_bytes(b"x")
    assert written_files(str(run)) == f"best checkpoint: {run / 'checkpoints' / 'best.pt'}"
    (run / "curves.png").write_bytes(b"x")
    assert written_files(str(run)).startswith(f"curves: {run / 'curves.png'}; best checkpoint: ")
