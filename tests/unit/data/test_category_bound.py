"""A category count too large for any head is refused up front in one line naming the field and
the bound (it used to end in an allocation traceback)."""

from __future__ import annotations

import json

import pytest

from cachedet.core.errors import CachedetError
from cachedet.core.structures import MAX_CATEGORIES, FeatureSpec
from cachedet.data.coco import CategoryMap, load_detection_dataset
from cachedet.models.detector import DetectorConfig, build_detector


def test_an_annotation_file_with_too_many_categories_is_refused(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
        "annotations": [],
        "categories": [{"id": i, "name": str(i)} for i in range(MAX_CATEGORIES + 1)],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CachedetError) as err:
        load_detection_dataset(path, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: categories: {MAX_CATEGORIES + 1} categories, more than the ")
    assert str(MAX_CATEGORIES) in msg and "\n" not in msg


def test_a_category_list_or_detector_too_large_is_refused_before_allocating():
    items = [{"id": i, "name": "x"} for i in range(MAX_CATEGORIES + 1)]
    with pytest.raises(CachedetError, match=r"^store: \d+ categories, more than"):
        CategoryMap.from_json(items, "store")
    assert len(CategoryMap.from_json(items[:MAX_CATEGORIES])) == MAX_CATEGORIES
    cfg = DetectorConfig(
        num_classes=10**9, canvas=64, in_specs=(FeatureSpec("c5", 8, 32),), neck_channels=8
    )
    with pytest.raises(CachedetError, match=r"^DetectorConfig.num_classes: 1000000000 categories"):
        build_detector(cfg)
