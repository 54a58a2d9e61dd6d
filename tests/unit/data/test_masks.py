"""Instance masks in the cache: geometry, Copy-Paste occlusion, storage, verification."""

import json

import numpy as np
import pytest
import torch
from conftest import edit_json, small_config
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from cachedet.cache.store import FeatureStore, StoreReader
from cachedet.core.structures import ViewParams
from cachedet.data.coco import load_detection_dataset
from cachedet.data.masks import decode_rles, encode_rle, mask_to_canvas
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import extract, plan_views


def reference_canvas(params: ViewParams, mask: np.ndarray) -> np.ndarray:
    """The image's own path through torchvision.transforms.v2: a tv_tensors.Mask resized, flipped, cropped."""
    m = tv_tensors.Mask(torch.from_numpy(mask)[None])
    m = F.resize(m, list(params.resized_size))
    if params.flip:
        m = F.horizontal_flip(m)
    m = F.crop(m, params.crop_offset[0], params.crop_offset[1], params.canvas, params.canvas)
    return m.as_subclass(torch.Tensor)[0].numpy().astype(bool)


def annotated_masks(path: str) -> dict[int, np.ndarray]:
    """annotation id -> uint8 (H, W) mask decoded straight from the JSON with pycocotools."""
    data = json.load(open(path))
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    out = {}
    for a in data["annotations"]:
        h, w = sizes[a["image_id"]]
        out[a["id"]] = mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
        )
    return out


def test_mask_to_canvas_equals_torchvision_on_random_geometry():
    rng = np.random.default_rng(0)
    for _ in range(150):
        h, w, s = (int(v) for v in rng.integers(8, 160, size=3))
        factor = (
            rng.uniform(0.1, 2.5) if rng.random() < 0.9 else 2 * s / max(h, w)
        )  # includes exact 2x
        rh, rw = (
            max(1, round(h * factor * s / max(h, w))),
            max(1, round(w * factor * s / max(h, w))),
        )
        params = ViewParams(
            image_id=0,
            view_index=0,
            orig_size=(h, w),
            resized_size=(rh, rw),
            crop_offset=(
                int(rng.integers(0, max(rh - s, 0) + 1)),
                int(rng.integers(0, max(rw - s, 0) + 1)),
            ),
            flip=bool(rng.random() < 0.5),
            canvas=s,
        )
        mask = (rng.random((h, w)) < rng.uniform(0.01, 0.6)).astype(np.uint8)
        np.testing.assert_array_equal(mask_to_canvas(params, mask), reference_canvas(params, mask))


def test_cached_masks_equal_a_reference_transform_of_the_source_masks(synthetic, tmp_path):
    augment = AugmentConfig(size=96, scale_range=(0.4, 2.0), seed=5, copy_paste=0.5)
    cfg = small_config(synthetic, str(tmp_path / "m.zarr"), augment=augment, views=3)
    extract(cfg, progress=False)
    fs = FeatureStore(cfg.out)
    assert fs.has_masks and fs.header.masks.objects == int(fs.box_offsets[-1])
    plan = plan_views(load_detection_dataset(cfg.annotations, cfg.images), augment, 3)
    source = annotated_masks(cfg.annotations)
    image_of = {a["id"]: a["image_id"] for a in json.load(open(cfg.annotations))["annotations"]}
    seen = {"flip": 0, "crop": 0, "shrunk": 0, "pasted": 0, "occluded": 0}
    for v in range(fs.num_views):
        params, paste = fs.view_params(v), plan.pastes[v]
        stored = fs.masks(v)
        assert stored.shape == (len(fs.ann_ids(v)), 96, 96) and stored.dtype == np.uint8
        own = [image_of[a] == params.image_id for a in fs.ann_ids(v).tolist()]
        occluder = None
        if paste is not None:  # the union of the pasted objects, moved with the paste's own view
            occluder = np.zeros((96, 96), dtype=bool)
            for a, mine in zip(fs.ann_ids(v).tolist(), own):
                if not mine:
                    occluder |= reference_canvas(paste.source_view, source[a])
            np.testing.assert_array_equal(paste.mask().numpy(), occluder)
        for row, (ann_id, mine) in enumerate(zip(fs.ann_ids(v).tolist(), own)):
            if mine:
                want = reference_canvas(params, source[ann_id])
                if occluder is not None:
                    seen["occluded"] += int((want & occluder).any())
                    want = want & ~occluder
            else:
                want = reference_canvas(paste.source_view, source[ann_id])
                seen["pasted"] += 1
            np.testing.assert_array_equal(
                stored[row].astype(bool), want, err_msg=f"view {v}, annotation {ann_id}"
            )
        seen["flip"] += params.flip
        seen["crop"] += params.crop_offset != (0, 0)
        seen["shrunk"] += max(params.resized_size) < 96
    assert all(seen.values()), (
        seen
    )  # flipped, cropped, shrunk, pasted and occluded views were all checked


def test_masks_bytes_verification_and_repair(synthetic, tmp_path, cli):
    cfg = small_config(synthetic, str(tmp_path / "m.zarr"))
    extract(cfg, progress=False)
    info = FeatureStore(cfg.out).info()
    assert info["masks"]["format"] == "coco-rle" and info["bytes_masks"] > 0
    out = cli("cache", "info", cfg.out)
    assert "instance masks:" in out.output and "COCO RLE" in out.output
    before = FeatureStore(cfg.out).masks(3)
    # damage one shard's masks: verify names it, --repair recomputes it
    target = tmp_path / "m.zarr" / "masks" / "000001" / "rle" / "c" / "0"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    report = StoreReader(cfg.out).verify()
    assert [(d["shard"], d["level"]) for d in report["damaged"]] == [(1, "masks")]
    from dataclasses import replace

    result = extract(replace(cfg, repair=True), progress=False)
    assert [d["shard"] for d in result.repaired] == [1]
    assert not StoreReader(cfg.out).verify()["damaged"]
    np.testing.assert_array_equal(FeatureStore(cfg.out).masks(3), before)


def test_no_segmentation_or_no_masks_stores_none(synthetic, dataset_copy, tmp_path):
    edit_json(dataset_copy["train"], lambda d: [a.pop("segmentation") for a in d["annotations"]])
    cfg = small_config(dataset_copy, str(tmp_path / "boxes.zarr"))
    assert extract(cfg, progress=False).masks is None
    fs = FeatureStore(cfg.out)
    assert not fs.has_masks and fs.info()["bytes_masks"] == 0
    with pytest.raises(Exception, match="no instance masks"):
        fs.masks(0)
    off = small_config(synthetic, str(tmp_path / "off.zarr"), masks=False)
    assert extract(off, progress=False).masks is None


def test_rle_round_trip():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 17, 23)) < 0.3
    np.testing.assert_array_equal(
        decode_rles([encode_rle(m) for m in masks], (17, 23)), masks.astype(np.uint8)
    )
    assert decode_rles([], (4, 5)).shape == (0, 4, 5)
