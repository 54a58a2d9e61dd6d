"""Masks drawn for another image size are refused naming the annotation, not resized into the mask."""

from __future__ import annotations

import json

import pytest
from pycocotools import mask as mask_utils

from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset


def _file(tmp_path, segmentation) -> str:
    data = {
        "images": [{"id": 7, "file_name": "a.png", "height": 48, "width": 64}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 3, "image_id": 7, "category_id": 1, "bbox": [10, 5, 30, 20], "area": 600,
             "iscrowd": 0, "segmentation": segmentation}
        ],
    }  # fmt: skip
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


def _rle(h, w):
    import numpy as np

    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[5:25, 10:40] = 1
    rle = mask_utils.encode(m)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def test_a_matching_rle_and_polygon_load(tmp_path):
    assert load_detection_dataset(_file(tmp_path, _rle(48, 64)), str(tmp_path)).has_masks
    square = [[10, 5, 40, 5, 40, 25, 10, 25]]
    assert load_detection_dataset(_file(tmp_path, square), str(tmp_path)).has_masks


@pytest.mark.parametrize(
    "size, hint", [((64, 48), "it is [width, height]"), ((96, 128), ""), ((48, 65), "")]
)
def test_an_rle_of_another_size_is_refused_naming_the_annotation(tmp_path, size, hint):
    with pytest.raises(CachedetError) as err:
        load_detection_dataset(_file(tmp_path, _rle(*size)), str(tmp_path))
    msg = str(err.value)
    assert "annotations[0].segmentation.size: annotation 3 of image 7" in msg
    assert "[height, width] [48, 64]" in msg and hint in msg


def test_polygons_of_another_scale_are_refused(tmp_path):
    doubled = [[20, 10, 80, 10, 80, 50, 20, 50], [100, 90, 140, 90, 140, 96]]
    with pytest.raises(CachedetError, match=r"annotation 3 of image 7: polygon point \(80, 10\)"):
        load_detection_dataset(_file(tmp_path, doubled), str(tmp_path))
    slightly_out = [[-1.5, 5, 64.5, 5, 64.5, 48.5, -1.5, 48.5]]  # as real COCO polygons can be
    load_detection_dataset(_file(tmp_path, slightly_out), str(tmp_path))
