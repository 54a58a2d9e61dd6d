"""The Python API: load(...).predict(...) on every input kind, its errors, lazy names, the README example."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cachedet
from cachedet.core.errors import CachedetError

ROOT = Path(__file__).resolve().parents[3]  # tests/unit/tools/ -> the repository
EXAMPLE = ROOT / "examples" / "api_example.py"


@pytest.fixture(scope="module")
def model(tiny_run):
    return cachedet.load(tiny_run("faster-rcnn"), score_threshold=0.01)


@pytest.fixture(scope="module")
def val_path(synthetic):
    return sorted((Path(synthetic["images"]) / "val").iterdir())[0]


def same(a, b):
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert a.labels.tolist() == b.labels.tolist() and a.names == b.names


def test_every_input_kind_gives_the_same_detections(model, val_path):
    ref = model.predict(str(val_path))
    pil = Image.open(val_path)
    array = np.asarray(pil.convert("RGB"))
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1)
    for single in (val_path, pil, array, chw, chw.float() / 255):
        same(model.predict(single), ref)
    # a batch runs the backbone once for all its images: compare it with a batch of the same size
    ref3, ref2 = model.predict([val_path] * 3), model.predict([val_path] * 2)
    batch = model.predict([str(val_path), pil, array])
    assert isinstance(batch, list) and len(batch) == 3
    for det, expected in zip(batch, ref3):
        same(det, expected)
    for det, expected in zip(
        model.predict(torch.stack([chw, chw])) + model.predict(np.stack([array, array])), ref2 * 2
    ):
        same(det, expected)


def test_detections_are_in_image_pixels_with_dataset_ids_and_names(model, val_path):
    det = model.predict(val_path)
    h, w = np.asarray(Image.open(val_path)).shape[:2]
    assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
    assert (
        (det.boxes[:, [0, 2]] <= w).all()
        and (det.boxes[:, [1, 3]] <= h).all()
        and (det.boxes >= 0).all()
    )
    assert (
        (det.boxes[:, 2] > det.boxes[:, 0]).all()
        and (det.scores >= 0.01).all()
        and det.masks is None
    )
    names = {c["id"]: c["name"] for c in model.categories}
    assert [names[i] for i in det.labels.tolist()] == det.names


def test_a_pil_image_follows_the_readers_exif_rule(model, val_path, tmp_path):
    pil = Image.open(val_path).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must turn 90 degrees clockwise to stand upright
    rotated = tmp_path / "rotated.png"
    pil.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif)
    same(model.predict(Image.open(rotated)), model.predict(rotated))
    same(model.predict(rotated), model.predict(pil))


def test_mask_runs_return_image_sized_masks(tiny_run, val_path):
    det = cachedet.load(tiny_run("faster-rcnn", masks=True), score_threshold=0.01).predict(val_path)
    h, w = np.asarray(Image.open(val_path)).shape[:2]
    assert det.masks is not None and det.masks.dtype == bool and det.masks.shape == (len(det), h, w)


def test_errors_name_the_input_or_the_file(model, tiny_run, tmp_path):
    run = tiny_run("faster-rcnn")
    cases = [
        (
            lambda: cachedet.load(run, checkpoint="best"),
            re.escape(os.path.join(run, "checkpoints", "best.pt")),
        ),
        (lambda: cachedet.load(str(tmp_path / "nowhere")), "nowhere: no such run directory"),
        (
            lambda: cachedet.load(run, checkpoint=str(tmp_path / "x.pt")),
            "x.pt: expected 'best', 'last'",
        ),
        (
            lambda: model.predict([np.zeros((8, 8, 3), np.uint8), 3]),
            r"images\[1\]: expected a path.*got int",
        ),
        (
            lambda: model.predict(np.zeros((8, 8, 3), np.float32)),
            r"images\[0\]: a numpy image must be uint8",
        ),
        (
            lambda: model.predict(torch.zeros(5, 8, 8)),
            r"images\[0\]: a tensor image must be \(3, H, W\)",
        ),
        (lambda: model.predict(str(tmp_path / "missing.jpg")), "missing.jpg: image file not found"),
        (
            lambda: cachedet.load(run, score_threshold=2),
            "score_threshold: expected a number >= 0 and <= 1, got 2",
        ),
    ]
    for call, message in cases:
        with pytest.raises(CachedetError, match=message) as info:
            call()
        assert "\n" not in str(info.value) and " at 0x" not in str(info.value)


def test_checkpoint_last_and_a_file_load_the_same_weights(model, tiny_run, val_path):
    path = os.path.join(tiny_run("faster-rcnn"), "checkpoints", "last.pt")
    same(
        cachedet.load(tiny_run("faster-rcnn"), checkpoint=path, score_threshold=0.01).predict(
            val_path
        ),
        model.predict(val_path),
    )


def test_import_is_cheap_and_names_are_public():
    code = (
        "import sys, cachedet; assert 'torch' not in sys.modules, 'torch imported'; "
        "print(' '.join(sorted(cachedet.__all__)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    public = {
        "load",
        "extract",
        "train_heads",
        "evaluate",
        "export",
        "TrainConfig",
        "ExtractConfig",
    }
    assert public <= set(out.split())
    import cachedet.api
    import cachedet.extraction.run
    import cachedet.tools.export

    # every stage is a function of the one front door, which the CLI calls too; no submodule
    # (cachedet.extraction, cachedet.tools.export) shadows a public function
    for name in ("load", "extract", "train_heads", "evaluate", "export"):
        assert getattr(cachedet, name) is getattr(cachedet.api, name), name
        assert callable(getattr(cachedet, name)), name
    assert cachedet.TrainConfig.__module__ == "cachedet.engine.config"


@pytest.mark.slow
def test_the_readme_example_is_the_example_file_and_runs(tmp_path, monkeypatch, capsys):
    code = EXAMPLE.read_text()
    body = code[code.index("import sys") :]
    assert body in (ROOT / "README.md").read_text(), (
        "README's example differs from examples/api_example.py"
    )
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(tmp_path / "work")])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "detections; best:" in out and "box AP" in out
    assert (tmp_path / "work" / "run" / "export" / "model.onnx").is_file()
    assert (tmp_path / "work" / "run" / "export" / "model.json").is_file()
