"""Export: the ONNX graph run by onnxruntime matches ``predict``; what cannot export says so in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cachedet
from cachedet.api import to_pixels
from cachedet.core.errors import CachedetError
from cachedet.tools.export import export_run, image_boxes, prepare_image, read_metadata

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


@pytest.mark.slow
@pytest.mark.parametrize("head", ["faster-rcnn", "retinanet", "cascade", "adapters"])
def test_onnx_runtime_matches_predict(head, tiny_run, synthetic, tmp_path):
    if head == "adapters":  # ResNet adapters run inside the exported backbone
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
    counts = []
    for image in sorted((Path(synthetic["images"]) / "val").iterdir()):
        pixels = to_pixels(image)
        x, params = prepare_image(pixels, meta)
        boxes, scores, labels = session.run(None, {"image": x})
        boxes, keep = image_boxes(boxes, params)
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
