"""Every drop counted: duplicated image entries, objects that reach no view at the canvas, and
missing or unreadable image files left out with skip_bad are counted by reason in the dataset,
the store header and extract's result, as crowd and degenerate boxes are."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from conftest import small_config

from cachedet.cache.store import open_header
from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.data.views import AugmentConfig, plan_view
from cachedet.extraction.run import extract, plan_views


def _write(tmp_path, images, annotations, name="ann.json") -> str:
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def _img(i, name, w=100, h=80):
    return {"id": i, "file_name": name, "width": w, "height": h}


def _ann(i, image, bbox):
    return {"id": i, "image_id": image, "category_id": 1, "bbox": bbox}


def test_duplicated_images_are_dropped_and_counted(tmp_path):
    images = [_img(1, "a.png"), _img(2, "./a.png"), _img(1, "a.png"), _img(3, "b.png")]
    anns = [_ann(1, 1, [1, 1, 9, 9]), _ann(2, 2, [1, 1, 9, 9]), _ann(3, 3, [1, 1, 9, 9])]
    ds = load_detection_dataset(_write(tmp_path, images, anns), tmp_path)
    assert [r.id for r in ds.images] == [1, 3]
    assert ds.dropped_images == {"duplicate": 2}
    assert ds.dropped["duplicate_image"] == 1  # the annotation of image 2 (a.png again)
    assert ds.fingerprint()["dropped_images"] == {"duplicate": 2}
    images[2] = _img(1, "c.png")  # one id for two files: which one the boxes belong to is unknown
    with pytest.raises(CachedetError, match=r"images\[2\].id: .*appears twice"):
        load_detection_dataset(_write(tmp_path, images, anns), tmp_path)


def test_objects_that_reach_no_view_are_counted_by_reason(tmp_path):
    plain = AugmentConfig(size=64, augment=False, flip=False)
    images = [_img(1, "a.png", 1000, 800)]
    anns = [_ann(1, 1, [10, 10, 300, 300]), _ann(2, 1, [500, 500, 4, 4])]  # 4 px -> 0.26 px
    ds = load_detection_dataset(_write(tmp_path, images, anns), tmp_path)
    plan = plan_views(ds, plain, 1)
    assert plan.dropped == {"degenerate_at_canvas": 1, "outside_views": 0}
    assert plan.boxes["ann_ids"].tolist() == [1]
    # zoomed in 4x, the 64-px view shows a corner of the image: an object far from it is cut out
    zoom = AugmentConfig(size=64, scale_range=(4.0, 4.0), flip=False, seed=0)
    v = plan_view(zoom, 1, 0, 80, 100)
    top, left = (c / s for c, s in zip(v.crop_offset, v.scale))  # the window in the image
    far_x = 90.0 if left < 50 else 1.0
    far_y = 70.0 if top < 40 else 1.0
    anns = [_ann(1, 1, [far_x, far_y, 8, 8])]
    ds = load_detection_dataset(_write(tmp_path, [_img(1, "a.png")], anns, "b.json"), tmp_path)
    assert plan_views(ds, zoom, 1).dropped == {"degenerate_at_canvas": 0, "outside_views": 1}


def test_extract_counts_every_drop_in_its_result_and_the_header(dataset_copy, tmp_path):
    data = json.load(open(dataset_copy["train"]))
    first, second, third = data["images"][:3]
    data["images"].append({**first, "id": 9001})  # the same file again, under another id
    data["annotations"].append({**data["annotations"][0], "id": 9001, "image_id": 9001})
    os.remove(os.path.join(dataset_copy["images"], second["file_name"]))  # missing
    with open(os.path.join(dataset_copy["images"], third["file_name"]), "wb") as f:
        f.write(b"not an image")  # unreadable
    json.dump(data, open(dataset_copy["train"], "w"))
    cfg = small_config(
        dataset_copy, str(tmp_path / "s.zarr"), augment=AugmentConfig(size=64, seed=1), views=1
    )
    result = extract(replace(cfg, skip_bad=True), progress=False)
    assert result.dropped_images == {"duplicate": 1, "missing": 1, "unreadable": 2}
    assert result.dropped["duplicate_image"] == 1
    header = open_header(cfg.out)
    assert header.dataset["dropped_images"] == {"duplicate": 1, "missing": 1}
    assert header.dataset["dropped"] == result.dropped
    assert {"degenerate_at_canvas", "outside_views"} <= set(result.dropped)
