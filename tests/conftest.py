"""Shared fixtures: a small generated COCO dataset and helpers to run extraction on it."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
from typer.testing import CliRunner

from cachedet.backbones.backbone import BackboneConfig
from cachedet.data.synthetic import SyntheticSpec, make_synthetic_dataset
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import ExtractConfig

warnings.filterwarnings("ignore", message="no offline weights for test_")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """12 train + 4 val images, 96-180 px, up to 4 objects each."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(
        str(root), SyntheticSpec(num_train=12, num_val=4, min_side=96, max_side=180, max_objects=4)
    )


@pytest.fixture
def dataset_copy(synthetic, tmp_path):
    """A private, editable copy of the synthetic dataset."""
    dst = tmp_path / "data"
    shutil.copytree(synthetic["images"], dst)
    return {"train": str(dst / "train.json"), "val": str(dst / "val.json"), "images": str(dst)}


def small_config(paths: dict, out: str, **kw) -> ExtractConfig:
    defaults = dict(
        annotations=paths["train"],
        images=paths["images"],
        out=out,
        backbone=BackboneConfig("test_resnet", None, "random"),
        augment=AugmentConfig(size=96, seed=3),
        views=2,
        shard_views=5,
        batch_size=4,
        recipe="paper",  # LSJ 0.1-2.0 where a test gives no scale_range (the reference store's)
    )
    defaults.update(kw)
    return ExtractConfig(**defaults)


TRAIN_LIGHT = {
    "box_convs": 0,
    "box_fcs": 2,
    "box_representation": 128,
    "rois_per_image": 64,
    "proposals_per_image": 200,
}


def train_config(out, cache, **kw):
    """A TrainConfig for a few CPU steps on a tiny detector; ``kw`` overrides any field."""
    from cachedet.engine.train import TrainConfig

    defaults = dict(
        out=str(out),
        cache=cache,
        epochs=2,
        batch_size=4,
        neck_channels=32,
        lr=0.01,
        warmup_steps=2,
        detector_options=TRAIN_LIGHT,
    )
    return TrainConfig.of(**{**defaults, **kw})


def to_lvis(data: dict) -> dict:
    """An LVIS-format copy of a synthetic COCO split: frequencies f, f, c, c, c, r, r, r and the
    per-image negative / not-exhaustive category lists LVISEval reads."""
    data = copy.deepcopy(data)
    freq = ["f", "f", "c", "c", "c", "r", "r", "r"]
    for c in data["categories"]:
        c["frequency"], c["synset"] = freq[c["id"] - 1], c["name"]
    present = {}
    for a in data["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    for img in data["images"]:
        img["neg_category_ids"] = [
            c["id"] for c in data["categories"] if c["id"] not in present.get(img["id"], set())
        ]
        img["not_exhaustive_category_ids"] = []
    return data


def edit_json(path: str, fn):
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture
def cli():
    from cachedet_cli.main import app

    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


def reference_cocoeval(data: dict, detections: list[dict], iou_type: str = "bbox"):
    """pycocotools' COCOeval run directly (evaluated, accumulated, summarised), for comparisons."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture(scope="module")
def tiny_store(synthetic, tmp_path_factory):
    """A real StoreReader on 12 images x 1 view (test_resnet, canvas 64, shards of 4 views, masks)."""
    from cachedet.cache.store import StoreReader
    from cachedet.extraction.run import extract

    out = str(tmp_path_factory.mktemp("tiny") / "tiny.zarr")
    extract(
        small_config(
            synthetic, out, augment=AugmentConfig(size=64, seed=1), views=1, shard_views=4
        ),
        progress=False,
    )
    return StoreReader(out)


@pytest.fixture(scope="session")
def tiny_run(synthetic, tmp_path_factory):
    """tiny_run(head, masks=False) -> a run dir trained for 2 steps on a 96-px test_resnet cache
    (each built once per session)."""
    from cachedet.engine.train import train
    from cachedet.extraction.run import extract

    root = tmp_path_factory.mktemp("tiny_runs")
    cache = small_config(synthetic, str(root / "cache.zarr"), views=1)
    runs = {}

    def make(head: str = "faster-rcnn", masks: bool = False) -> str:
        if (head, masks) not in runs:
            if not runs:
                extract(cache, progress=False)
            out = root / f"{head}{'-masks' if masks else ''}"
            options = (
                {**TRAIN_LIGHT, "mask_convs": 1, "mask_channels": 16} if masks else TRAIN_LIGHT
            )
            train(
                train_config(
                    out,
                    cache.out,
                    head=head,
                    masks=masks,
                    epochs=1,
                    max_steps_per_epoch=2,
                    detector_options=options,
                ),
                progress=False,
            )
            runs[head, masks] = str(out)
        return runs[head, masks]

    return make
