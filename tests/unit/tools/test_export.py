"""Export: the ONNX graph run by onnxruntime matches ``predict``; what cannot export says so in one line."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cachedet
from cachedet.api import to_pixels
from cachedet.core.errors import CachedetError
from cachedet.data import preprocess as reference
from cachedet.data.decode import read_image
from cachedet.tools.export import (
    REFERENCE,
    export_run,
    image_boxes,
    prepare_image,
    read_metadata,
)

ort = pytest.importorskip("onnxruntime")
THRESHOLD = 0.001  # untrained heads score low; keep enough detections to compare


def matched_share(boxes, scores, labels, ref, box_tol=0.05, score_tol=1e-4) -> float:
    """Share of ``ref``'s detections that the runtime's (image-pixel boxes, scores, dataset ids) contain
    within tolerance. Order-free: near-equal scores may swap places between the two runtimes."""
    free = np.ones(len(scores), dtype=bool)
    hits = 0
    for box, score, label in zip(ref.boxes, ref.scores, ref.labels):
        close = (
            free
            & (labels == label)
            & (np.abs(scores - score) <= score_tol)
            & (np.abs(boxes - box).max(axis=1) <= box_tol)
        )
        if close.any():
            free[np.argmax(close)] = False
            hits += 1
    return hits / max(len(ref), 1)


def spread_scores(run: str, out: str) -> str:
    from cachedet.runs.checkpoint import save_atomic

    """A copy of a RetinaNet checkpoint with noise on its class logits: after 2 steps every anchor still
    scores the focal-loss prior 0.01, and which of equal scores fill the 100 slots is arbitrary."""
    ckpt = torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=False)
    weights = ckpt["state"]["detector"]
    key = next(k for k in weights if k.endswith("cls_logits.weight"))
    noise = torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(0))
    weights[key] = weights[key] + 2.0 * noise
    save_atomic({k: v for k, v in ckpt.items() if k != "checksum"}, out)  # a fresh checksum
    return out


def online_adapter_run(synthetic, out, backbone: str) -> str:
    """A run with adapters in the backbone, trained online for one step."""
    from conftest import train_config

    from cachedet.engine.train import train

    train(
        train_config(
            out,
            None,
            online=True,
            annotations=synthetic["train"],
            images=synthetic["images"],
            backbone=backbone,
            weights="random",
            size=96,
            adapters=True,
            epochs=1,
            max_steps_per_epoch=1,
        ),
        progress=False,
    )
    return str(out)


def projected_run(synthetic, out) -> str:
    """A run trained for two steps on a projected store (8 directions per level, canvas 96)."""
    from conftest import small_config, train_config

    from cachedet.engine.train import train
    from cachedet.extraction.run import extract

    store = small_config(synthetic, str(out / "p.zarr"), views=1, project=8, recipe="short")
    extract(store, progress=False)
    run = out / "run"
    train(train_config(run, store.out, epochs=1, max_steps_per_epoch=2), progress=False)
    return str(run)


def shipped_reference(folder):
    """The numpy/Pillow preprocessing module an export wrote into ``folder``, imported from there."""
    spec = importlib.util.spec_from_file_location("shipped_preprocess", Path(folder) / REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(tmp_path) -> list[str]:
    """Non-square files of several modes, smaller and larger than a 64 px canvas, and one whose EXIF
    orientation turns it upright."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (120, 75, 4), dtype=np.uint8)
    pixels[:40, :30] = (250, 20, 20, 255)  # an object, so resampling has edges to get right
    cases = {
        "rgb_wide.png": Image.fromarray(pixels[:45, :, :3]),
        "rgb_tall_small.png": Image.fromarray(pixels[:37, :23, :3]),  # enlarged to 64 x 40
        "grey.png": Image.fromarray(pixels[:, :61, 0]),
        "rgba.png": Image.fromarray(pixels[:90]),
        "palette.png": Image.fromarray(pixels[:50, :70, :3]).convert("P"),
    }
    paths = []
    for name, pil in cases.items():
        pil.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 75 x 51, shown 51 x 75
    Image.fromarray(pixels[:51, :, :3]).save(tmp_path / "exif6.jpg", exif=exif, quality=95)
    return paths + [str(tmp_path / "exif6.jpg")]


def test_numpy_pillow_reference_equals_predicts_preprocessing(tmp_path):
    """The torch-free steps shipped beside an export give predict's input within float32 rounding."""
    meta = {
        "canvas": 64,
        "preprocess": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    boxes = np.array([[3.2, 4.0, 40.5, 60.1], [50.0, 2.0, 70.0, 30.0], [0, 0, 64, 64]], np.float32)
    for path in _images(tmp_path):
        rgb = reference.load_image(path)
        torch_rgb = read_image(path)
        assert np.array_equal(rgb, torch_rgb.permute(1, 2, 0).numpy()), path
        x, view = reference.preprocess(rgb, meta)
        expected, params = prepare_image(torch_rgb, meta)
        assert x.dtype == np.float32 and x.shape == expected.shape == (1, 3, 64, 64)
        assert view["resized_size"] == params.resized_size, path
        # a few float32 ulps at |x| <= 2.7 (Pillow's float64 bilinear resize is ~2e-5 away)
        assert np.abs(x - expected).max() <= 2e-6, (path, np.abs(x - expected).max())
        got, keep = reference.image_boxes(boxes, view)
        want, want_keep = image_boxes(boxes, params)
        assert np.allclose(got, want, atol=1e-4) and np.array_equal(keep, want_keep), path
    # the recipe the docs gave before (resize the uint8 image, normalise after) is measurably off
    rgb = reference.load_image(str(tmp_path / "rgb_wide.png"))
    h, w = reference.resized_size(*rgb.shape[:2], 64)
    small = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
    mean, std = np.array(meta["preprocess"]["mean"]), np.array(meta["preprocess"]["std"])
    old = ((small / 255 - mean) / std).transpose(2, 0, 1)
    new = reference.preprocess(rgb, meta)[0][0, :, :h, :w]
    assert np.abs(old - new).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("head", ["faster-rcnn", "retinanet", "cascade", "adapters", "projected"])
def test_onnx_runtime_matches_predict(head, tiny_run, synthetic, tmp_path):
    if head == "projected":  # the store's map runs inside the exported backbone
        run, head = projected_run(synthetic, tmp_path), "faster-rcnn"
    elif head == "adapters":  # ResNet adapters run inside the exported backbone
        run, head = (
            online_adapter_run(synthetic, tmp_path / "adapters", "test_resnet"),
            "faster-rcnn",
        )
    else:
        run = tiny_run(head)
    if head == "retinanet":
        run = spread_scores(run, str(tmp_path / "spread.pt"))  # a checkpoint file serves as the run
    path = export_run(run, "onnx", str(tmp_path / "m.onnx"), score_threshold=THRESHOLD)
    meta = read_metadata(path)
    assert meta["head"] == head and meta["canvas"] == 96 and len(meta["preprocess"]["mean"]) == 3
    import onnx

    embedded = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(embedded["cachedet"]) == meta
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    model = cachedet.load(run, score_threshold=THRESHOLD)
    shipped = shipped_reference(tmp_path)  # numpy + Pillow only, as a runtime without torch has
    counts = []
    for image in sorted((Path(synthetic["images"]) / "val").iterdir()):
        pixels = to_pixels(image)
        x, view = shipped.preprocess(shipped.load_image(str(image)), meta)
        boxes, scores, labels = session.run(None, {"image": x})
        boxes, keep = shipped.image_boxes(boxes, view)
        ids = np.asarray(meta["category_ids"])[labels[keep]]
        ref = model.predict(pixels)
        assert abs(int(keep.sum()) - len(ref)) <= max(2, len(ref) // 20)
        assert matched_share(boxes[keep], scores[keep], ids, ref) >= 0.9
        counts.append(len(ref))
    assert sum(counts) > 0


def test_cli_export_writes_the_graph_and_its_metadata(tiny_run, cli, tmp_path):
    r = cli("export", "--run", tiny_run("faster-rcnn"), "--out", tmp_path / "det.onnx")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "det.json").read_text())
    assert (
        (tmp_path / "det.onnx").is_file() and meta["exported_as"] == "onnx" and meta["opset"] == 17
    )
    assert meta["input"]["shape"] == [1, 3, 96, 96] and meta["category_names"]
    # the preprocessing reference beside it runs where neither torch nor cachedet can be imported
    code = (
        "import sys; sys.modules['torch'] = sys.modules['cachedet'] = None\n"
        "import json, numpy as np, cachedet_preprocess as p\n"
        "meta = json.load(open('det.json'))\n"
        "x, view = p.preprocess(np.full((50, 70, 3), 128, np.uint8), meta)\n"
        "print(x.dtype, x.shape, view['resized_size'])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["float32", "(1,", "3,", "96,", "96)", "(69,", "96)"]


@pytest.mark.slow
def test_what_cannot_export_says_so_in_one_line(tiny_run, synthetic, cli, tmp_path):
    cases = [
        (tiny_run("faster-rcnn"), "pt2", "format pt2 cannot export the faster-rcnn head yet"),
        (tiny_run("faster-rcnn", masks=True), "onnx", "mask branch .*cannot export yet"),
        (tiny_run("faster-rcnn"), "tflite", "format tflite: expected one of onnx, pt2"),
        (
            online_adapter_run(synthetic, tmp_path / "vit", "test_vit"),
            "onnx",
            "plain ViT backbones",
        ),
    ]
    for run, fmt, message in cases:
        with pytest.raises(CachedetError, match=message) as info:
            export_run(run, fmt, str(tmp_path / f"m.{fmt}"))
        assert "\n" not in str(info.value)
    r = cli(
        "export", "--run", tiny_run("faster-rcnn"), "--format", "pt2", "--out", tmp_path / "m.pt2"
    )
    assert r.exit_code == 2 and "cannot export" in r.output
