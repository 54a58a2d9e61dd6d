"""Copy-Paste: pasted objects, occlusion, masks vs boxes, pixels, and the extract path."""

import json

import numpy as np
import pytest
import torch
from conftest import small_config
from helpers import extract_args
from PIL import Image

from cachedet.cache.store import FeatureStore
from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.data.copy_paste import instance_mask, mask_to_canvas
from cachedet.data.images import ViewDataset
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import extract, plan_views

# no jitter, no flip: every view is the 64x64 image itself, so expected boxes are easy to write
PLAIN = dict(size=64, scale_range=(1.0, 1.0), flip=False, copy_paste=1.0)


def write_dataset(tmp_path, objects_a, objects_b, colours=((0, 0, 0), (255, 255, 255))):
    """Two 64x64 images: A (id 1) and B (id 2), each a flat colour. objects_*: [(bbox xywh, polygon or None)]."""
    anns = []
    for image_id, objects in ((1, objects_a), (2, objects_b)):
        for bbox, poly in objects:
            ann = {
                "id": len(anns) + 1,
                "image_id": image_id,
                "category_id": 10 * image_id,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            }
            if poly is not None:
                ann["segmentation"] = [poly]
            anns.append(ann)
    for name, colour in zip(("a.png", "b.png"), colours):
        Image.fromarray(np.full((64, 64, 3), colour, dtype=np.uint8)).save(tmp_path / name)
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 64},
            {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
        ],
        "annotations": anns,
        "categories": [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return load_detection_dataset(path, tmp_path)


def view_of(plan, image_id):
    i = next(i for i, v in enumerate(plan.views) if v.image_id == image_id)
    a, b = plan.boxes["offsets"][i], plan.boxes["offsets"][i + 1]
    return i, plan.boxes["xyxy"][a:b], plan.boxes["labels"][a:b], plan.boxes["ann_ids"][a:b]


def test_pasted_objects_get_boxes_with_their_labels_and_pixels(tmp_path):
    ds = write_dataset(tmp_path, [([4, 4, 10, 10], None)], [([40, 20, 16, 30], None)])
    plan = plan_views(ds, AugmentConfig(**PLAIN), 1)
    i, boxes, labels, ann_ids = view_of(plan, 1)
    assert plan.pastes[i].source_image_id == 2
    assert ann_ids.tolist() == [1, 2]  # A's own object, then B's pasted one
    assert labels.tolist() == [ds.categories.to_label(10), ds.categories.to_label(20)]
    np.testing.assert_allclose(boxes, [[4, 4, 14, 14], [40, 20, 56, 50]])
    view, err, _ = ViewDataset(
        [plan.views[i]], [plan.paths[i]], (0, 0, 0), (1, 1, 1), pastes=[plan.pastes[i]]
    )[0]
    assert err == ""
    assert torch.all(view[:, 20:50, 40:56] == 1.0) and torch.all(
        view[:, :20] == 0.0
    )  # B's white box over black A


def test_an_object_fully_covered_by_a_paste_loses_its_box(tmp_path):
    ds = write_dataset(tmp_path, [([20, 20, 10, 10], None)], [([0, 0, 64, 64], None)])
    plan = plan_views(ds, AugmentConfig(**PLAIN), 1)
    _, boxes, labels, ann_ids = view_of(plan, 1)
    assert ann_ids.tolist() == [2] and labels.tolist() == [ds.categories.to_label(20)]


def test_a_partly_covered_object_shrinks_to_its_visible_part_or_goes_below_the_threshold(tmp_path):
    ds = write_dataset(tmp_path, [([10, 10, 40, 40], None)], [([0, 0, 30, 64], None)])
    _, boxes, _, ann_ids = view_of(plan_views(ds, AugmentConfig(**PLAIN), 1), 1)
    assert ann_ids.tolist() == [1, 2]
    np.testing.assert_allclose(boxes[0], [30, 10, 50, 50])  # half of it stays visible
    _, _, _, ann_ids = view_of(plan_views(ds, AugmentConfig(**PLAIN, paste_min_visible=0.6), 1), 1)
    assert ann_ids.tolist() == [2]


def test_masks_paste_the_shape_and_boxes_paste_the_rectangle(tmp_path):
    triangle = [8, 8, 56, 8, 8, 56]
    with_mask = write_dataset(tmp_path, [([2, 2, 4, 4], None)], [([8, 8, 48, 48], triangle)])
    plan = plan_views(with_mask, AugmentConfig(**PLAIN), 1)
    i = view_of(plan, 1)[0]
    area = int(plan.pastes[i].mask().sum())
    assert abs(area - 48 * 48 / 2) < 60  # the triangle, not its box
    assert not plan.pastes[i].mask()[50, 50] and plan.pastes[i].mask()[10, 10]

    box_only = write_dataset(tmp_path, [([2, 2, 4, 4], None)], [([8, 8, 48, 48], None)])
    plan = plan_views(box_only, AugmentConfig(**PLAIN), 1)
    assert int(plan.pastes[view_of(plan, 1)[0]].mask().sum()) == 48 * 48


def test_a_polygon_mask_follows_the_view_geometry(tmp_path):
    ds = write_dataset(
        tmp_path, [([8, 8, 20, 10], [8, 8, 28, 8, 28, 18, 8, 18])], [([0, 0, 4, 4], None)]
    )
    rec = ds.images[0]
    from cachedet.core.structures import ViewParams

    # 2x larger, flipped, cropped at (top 4, left 60): x -> 128 - 2x - 60, y -> 2y - 4
    params = ViewParams(
        image_id=1,
        view_index=0,
        orig_size=(64, 64),
        resized_size=(128, 128),
        crop_offset=(4, 60),
        flip=True,
        canvas=64,
    )
    m = mask_to_canvas(params, instance_mask(rec, 0))
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (
        128 - 56 - 60,
        128 - 16 - 60,
        12,
        32,
    )


def test_options_are_checked():
    with pytest.raises(CachedetError, match="augment.copy_paste"):
        AugmentConfig(copy_paste=1.5)
    with pytest.raises(CachedetError, match="augment.paste_min_visible"):
        AugmentConfig(copy_paste=0.5, paste_min_visible=0)
    with pytest.raises(CachedetError, match="augment.augment"):
        AugmentConfig(copy_paste=0.5, augment=False)


def test_extract_with_copy_paste_on_masks(synthetic, tmp_path, cli):
    cfg = small_config(
        synthetic, str(tmp_path / "cp.zarr"), augment=AugmentConfig(size=96, seed=3, copy_paste=0.5)
    )
    extract(cfg, progress=False)
    fs = FeatureStore(cfg.out)
    pasted = fs.meta["paste_image_id"] >= 0
    assert 0 < pasted.sum() < fs.num_views
    ds = load_detection_dataset(synthetic["train"], synthetic["images"])
    own = {int(r.id): set(r.ann_ids.tolist()) for r in ds.images}
    for v in np.flatnonzero(pasted).tolist():
        foreign = set(fs.ann_ids(v).tolist()) - own[int(fs.meta["image_id"][v])]
        assert foreign and foreign <= own[int(fs.meta["paste_image_id"][v])]
    plain = small_config(synthetic, str(tmp_path / "plain.zarr"))
    extract(plain, progress=False)
    assert not np.array_equal(
        FeatureStore(plain.out).read_features(0, 24)["c3"][pasted],
        fs.read_features(0, 24)["c3"][pasted],
    )  # the pixels were pasted, too
    r = cli(
        *extract_args(synthetic, tmp_path / "x.zarr"),
        "--copy-paste",
        2,
        "--quiet",
    )
    assert r.exit_code == 2 and "--copy-paste" in r.stderr
