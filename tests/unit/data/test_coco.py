import json

import numpy as np
import pytest
from conftest import edit_json
from helpers import extract_args

from cachedet.core.errors import CachedetError
from cachedet.data.coco import CategoryMap, load_detection_dataset


def write(tmp_path, data, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(p)


def base():
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [],
    }


def ann(i, bbox, cat=7, image=1, **kw):
    return {"id": i, "image_id": image, "category_id": cat, "bbox": bbox, **kw}


def test_category_map_is_contiguous_and_round_trips():
    cmap = CategoryMap.from_json(
        [{"id": 90, "name": "z"}, {"id": 1, "name": "a"}, {"id": 5, "name": "m"}]
    )
    assert cmap.ids == (1, 5, 90)
    assert [cmap.to_label(i) for i in (1, 5, 90)] == [0, 1, 2]
    assert all(cmap.to_id(cmap.to_label(i)) == i for i in cmap.ids)
    assert CategoryMap.from_json(cmap.to_json()) == cmap


def test_unusable_annotations_are_dropped_and_counted(tmp_path):
    data = base()
    data["annotations"] = [
        ann(1, [10, 10, 20, 20]),  # kept
        ann(2, [90, 40, 30, 30], cat=3),  # kept, clipped to the image
        ann(3, [10, 10, 20, 20], iscrowd=1),  # crowd
        ann(4, [10, 10, 0, 5]),  # degenerate
        ann(5, [200, 10, 5, 5]),  # outside the image
        ann(6, [10, 10, 5, 5], cat=99),  # unknown category
        ann(7, [10, 10, 5, 5], image=42),  # unknown image
        ann(8, [10, 10, 5, 6]),  # NaN below (JSON has no NaN literal; Python writes one)
    ]
    path = write(tmp_path, json.dumps(data).replace("[10, 10, 5, 6]", "[NaN, 10, 5, 6]"))
    ds = load_detection_dataset(path, tmp_path)
    assert ds.dropped == {
        "crowd": 1,
        "degenerate": 1,
        "outside_image": 1,
        "unknown_category": 1,
        "unknown_image": 1,
        "non_finite": 1,
        "duplicate_image": 0,
    }
    rec = ds.images[0]
    np.testing.assert_allclose(rec.boxes, [[10, 10, 30, 30], [90, 40, 100, 50]])
    assert rec.labels.tolist() == [1, 0]  # category 7 -> label 1, 3 -> label 0
    assert rec.ann_ids.tolist() == [1, 2]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("images"), "images: missing"),
        (
            lambda d: d["images"][0].update(width="100"),
            "images[0].width: expected an integer, got '100'",
        ),
        (lambda d: d["images"][0].update(height=0), "images[0].height: expected an integer >= 1"),
        (  # an identical entry twice is dropped and counted (test_drop_counts); other files not
            lambda d: d["images"].append(dict(d["images"][0], file_name="b.png")),
            "images[1].id: ids must be unique",
        ),
        (lambda d: d["categories"][0].pop("name"), "categories[0].name: expected a string"),
        (
            lambda d: d["annotations"].append(
                ann(1, [1, 2, 3]),
            ),
            "annotations[0].bbox: expected [x, y, width, height]",
        ),
        (lambda d: d["annotations"].append(ann(1, "1,2,3,4")), "annotations[0].bbox"),
        (
            lambda d: d["annotations"].extend([ann(1, [1, 1, 2, 2]), ann(1, [1, 1, 3, 3])]),
            "annotations[].id: ids must be unique",
        ),
        (
            lambda d: d["annotations"].append({"id": 1, "image_id": 1, "bbox": [1, 1, 2, 2]}),
            "annotations[0].category_id: missing",
        ),
        (
            lambda d: d["annotations"].append(ann(1, [1, 1, 2, 2], image=10**30)),
            "annotations[0].image_id: integer",
        ),
        (lambda d: d.update(images={"id": 1}), "images: expected a list, got dict"),
        (lambda d: d["images"].append("img.png"), "images[1]: expected an object, got str"),
        (
            lambda d: d["categories"].append(dict(d["categories"][0])),
            "categories[].id: ids must be unique",
        ),
        (
            lambda d: d["images"][0].update(file_name="../../etc/passwd"),
            "images[0].file_name: '../../etc/passwd' leaves the images folder",
        ),
        (lambda d: d["images"][0].update(file_name="/etc/passwd"), "leaves the images folder"),
        (
            lambda d: d["images"][0].update(width=2**60),
            "images[0].width: integer 1152921504606846976 is out of range",
        ),
        (
            lambda d: d["annotations"].append(ann(1, [1, 1, 2, 2]) | {"category_id": 1.5}),
            "annotations[0].category_id: expected an integer, got 1.5",
        ),
    ],
)
def test_bad_files_name_file_and_field(tmp_path, mutate, message):
    data = base()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(CachedetError) as e:
        load_detection_dataset(path, tmp_path)
    assert str(e.value).startswith(path)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_json_and_missing_file(tmp_path):
    path = write(tmp_path, '{"images": [')
    with pytest.raises(CachedetError, match="not valid JSON"):
        load_detection_dataset(path, tmp_path)
    with pytest.raises(CachedetError, match="annotation file not found"):
        load_detection_dataset(tmp_path / "nope.json", tmp_path)
    with pytest.raises(CachedetError, match="top level: expected a JSON object"):
        load_detection_dataset(write(tmp_path, "[1, 2]"), tmp_path)


def test_lvis_shaped_file(tmp_path):
    data = {
        "images": [
            {
                "id": 5,
                "coco_url": "http://images.cocodataset.org/val2017/000000000005.jpg",
                "width": 64,
                "height": 48,
                "not_exhaustive_category_ids": [],
                "neg_category_ids": [2],
            }
        ],
        "categories": [
            {"id": 1, "name": "aerosol", "frequency": "r", "synset": "a.n.01"},
            {"id": 2, "name": "apple", "frequency": "f", "synset": "b.n.01"},
        ],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 2, "bbox": [1, 2, 10, 20], "area": 200}
        ],
    }
    ds = load_detection_dataset(write(tmp_path, data), tmp_path)
    assert ds.is_lvis
    assert ds.images[0].file_name == "000000000005.jpg"
    assert ds.categories.frequency == ("r", "f")
    assert ds.images[0].labels.tolist() == [1]


def test_synthetic_dataset_loads_with_pycocotools(synthetic):
    ds = load_detection_dataset(synthetic["train"], synthetic["images"])
    coco = ds.to_coco()
    assert len(coco.getImgIds()) == len(ds.images) == 12
    assert ds.num_boxes == len(coco.getAnnIds())
    assert sum(ds.dropped.values()) == 0


def test_cli_bad_json_is_one_line_exit_2(cli, dataset_copy, tmp_path):
    edit_json(dataset_copy["train"], lambda d: d["images"][0].update(width="wide"))
    r = cli(
        *extract_args(dataset_copy, tmp_path / "s.zarr"),
        "--backbone",
        "test_resnet",
        "--size",
        64,
    )
    assert r.exit_code == 2
    assert r.stderr.strip().count("\n") == 0
    assert "images[0].width" in r.stderr and dataset_copy["train"] in r.stderr
    assert "Traceback" not in r.output


def test_vectorised_polygon_check_accepts_and_refuses_what_the_per_coordinate_one_did():
    """polygon_points (one numpy pass) against the per-coordinate rule it replaced."""
    import math

    from cachedet.data.coco import polygon_points

    def per_coordinate(seg):  # the rule before vectorisation
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        return isinstance(seg, list) and all(
            isinstance(p, list)
            and len(p) >= 6
            and len(p) % 2 == 0
            and all(number(v) and math.isfinite(v) for v in p)
            for p in seg
        )

    ok = [0, 0, 10, 0, 10.5, 10]
    cases = [
        [ok],
        [ok, [1, 2, 3, 4, 5, 6, 7, 8]],
        [ok + [1]],  # odd count
        [[0, 0, 1, 1]],  # under 3 points
        [[0, 0, 10, 0, True, 10]],  # a bool is not a number
        [[0, 0, 10, 0, "10", 10]],
        [[0, 0, 10, 0, float("nan"), 10]],
        [[0, 0, 10, 0, float("inf"), 10]],
        [[0, 0, 10, 0, None, 10]],
        [ok, "polygon"],
        "polygon",
        [[0, 0, 10, 0, [10], 10]],
    ]
    for seg in cases:
        assert (polygon_points(seg) is not None) == per_coordinate(seg), seg
    assert polygon_points([[0, 0, 10, 0, 10**400, 10]]) is None  # beyond float64: refused, no crash
    np.testing.assert_array_equal(polygon_points([ok]), np.array(ok, dtype=float).reshape(-1, 2))


def _rich():
    """Every drop reason, RLE and polygon masks, boxes at and past the edges (-0.0 included),
    crowd flags as 0.0 / True, images with no annotations, a duplicate image entry."""
    data = base()
    data["images"] += [
        {"id": 5, "file_name": "c.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 30, "height": 90},
        {"id": 9, "file_name": "./b.png", "width": 30, "height": 90},  # b.png again
        {"id": 4, "file_name": "d.png", "width": 8, "height": 8},
    ]
    poly = [[1, 1, 20.5, 1, 20, 30]]
    rle = {"size": [48, 64], "counts": "PPYo0"}
    data["annotations"] = [
        ann(11, [-0.0, 3, 20, 20], image=5, segmentation=poly),
        ann(12, [60, 40, 30, 30], cat=3, image=5, iscrowd=0.0),
        ann(3, [10, 10, 20, 20], iscrowd=True, image=2),
        ann(4, [10, 10, 0, 5], image=2),
        ann(5, [200, 10, 5, 5]),
        ann(6, [10, 10, 5, 5], cat=99),
        ann(7, [10, 10, 5, 5], image=42),
        ann(8, [1, 2, 5, 7], image=9),
        ann(9, [1, 2, 5, 6], image=5, segmentation=rle),  # NaN below
        ann(14, [1, 2, 5, 7], image=5, segmentation=rle),
        ann(10, [2, 2, 3, 3], image=2, segmentation=[]),
        ann(1, [10, 10, 20, 20], segmentation=None),
        ann(2, [1.25, 2, 3, 4.5], image=5, segmentation=[[0, 0, 4, 0, 4, 4], [1, 1, 2, 2, 1, 3]]),
        ann(13, [5, 5, 1e-9, 1], image=2),
    ]
    return data


def _both(tmp_path, text):
    """(the result or error of load_detection_dataset, of the per-annotation loop on json's data)."""
    from cachedet.data import coco

    path = write(tmp_path, text)
    out = []
    for run in (
        lambda: load_detection_dataset(path, tmp_path),
        lambda: coco._dataset(
            path, str(tmp_path), coco._parse(path, open(path, "rb").read()), "", False
        ),
    ):
        try:
            out.append(run())
        except CachedetError as e:
            out.append(str(e))
    return out


def test_whole_array_checks_build_what_the_per_annotation_loop_builds(tmp_path):
    fast, loop = _both(tmp_path, json.dumps(_rich()).replace("[1, 2, 5, 6]", "[1, 2, NaN, 6]", 1))
    assert fast.dropped == loop.dropped and fast.dropped_images == loop.dropped_images
    assert fast.dropped["non_finite"] == 1 and fast.dropped["duplicate_image"] == 1
    assert sum(fast.dropped.values()) == 7
    assert [r.id for r in fast.images] == [r.id for r in loop.images] == [1, 2, 4, 5]
    for a, b in zip(fast.images, loop.images):
        assert (a.file_name, a.height, a.width) == (b.file_name, b.height, b.width)
        assert a.boxes.dtype == b.boxes.dtype == np.float32 and a.boxes.shape == b.boxes.shape
        assert a.boxes.tobytes() == b.boxes.tobytes()  # bits: -0.0 stays -0.0
        assert a.labels.dtype == b.labels.dtype and a.labels.tolist() == b.labels.tolist()
        assert a.ann_ids.dtype == b.ann_ids.dtype and a.ann_ids.tolist() == b.ann_ids.tolist()
        assert a.segmentations == b.segmentations
    assert np.signbit(fast.images[3].boxes).any()
    assert fast.images[3].ann_ids.tolist() == [11, 12, 14, 2]  # file order within an image


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["annotations"][0].update(segmentation=[[1, 1, 200, 1, 20, 30]]),  # far outside
        lambda d: d["annotations"][1].update(segmentation=[[1, 1, 2]]),
        lambda d: d["annotations"][1].update(segmentation=[[1, 1, 2, 2, True, 3]]),
        lambda d: d["annotations"][8].update(segmentation={"size": [64, 48], "counts": "x"}),
        lambda d: d["annotations"][8].update(segmentation="polygon"),
        lambda d: d["annotations"][-1].update(id=11),  # a colliding id
        lambda d: d["annotations"][-1].update(bbox=[1, 2, 3, True]),
        lambda d: d["annotations"][-1].update(iscrowd=[0]),
        lambda d: d["annotations"][-1].update(iscrowd=0.5),
        lambda d: d["annotations"][-1].update(id=2**64),  # past 64 bits
        lambda d: d["annotations"][-1].update(bbox=[1, 2, 3, 2**60]),
        lambda d: d["annotations"][-1].update(image_id=-(2**63) - 1),
    ],
)
def test_whole_array_checks_raise_what_the_per_annotation_loop_raises(tmp_path, mutate):
    data = _rich()
    mutate(data)
    fast, loop = _both(tmp_path, json.dumps(data))
    if isinstance(loop, str):
        assert fast == loop
    else:
        assert isinstance(fast, str) is False and fast.dropped == loop.dropped
