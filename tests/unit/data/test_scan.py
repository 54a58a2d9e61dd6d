"""The header scan before work: sizes from headers (EXIF applied), one-line refusals, --skip-bad
counts, and eval / --online scanning before any backbone is built."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.data.decode import image_header
from cachedet.data.scan import scan_images


def _dataset(tmp_path, sizes: dict[str, tuple[int, int]], exif6: tuple[str, ...] = ()):
    """One 40x30 (stored) JPEG per name, annotated with ``sizes[name]`` = (width, height); names in
    ``exif6`` carry EXIF Orientation 6 (shown rotated: 30x40)."""
    (tmp_path / "img").mkdir()
    images, anns = [], []
    for i, (name, (w, h)) in enumerate(sizes.items()):
        exif = Image.Exif()
        if name in exif6:
            exif[0x0112] = 6
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "img" / name, exif=exif)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 5, 5]})
    path = tmp_path / "ann.json"
    path.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]})
    )
    return load_detection_dataset(str(path), str(tmp_path / "img"))


def test_header_size_is_upright(tmp_path):
    ds = _dataset(tmp_path, {"plain.jpg": (40, 30), "phone.jpg": (30, 40)}, exif6=("phone.jpg",))
    assert image_header(ds.image_path(ds.images[0])) == (40, 30, 1)
    assert image_header(ds.image_path(ds.images[1])) == (30, 40, 6)
    report = scan_images(ds, "ExtractConfig.images")
    assert report.bad == [] and report.summary().startswith("all 2 images found")


def test_mismatch_names_image_and_both_sizes(tmp_path):
    # the phone picture annotated in its stored (unrotated) frame, and a plain one off by a pixel
    ds = _dataset(
        tmp_path, {"phone.jpg": (40, 30), "plain.jpg": (41, 30), "ok.jpg": (40, 30)}, ("phone.jpg",)
    )
    with pytest.raises(CachedetError) as e:
        scan_images(ds, "ExtractConfig.images", "ExtractConfig.skip_bad")
    line = str(e.value)
    assert "\n" not in line and line.startswith(ds.image_path(ds.images[0]))
    assert "image is 30x40 (width x height)" in line and "say 40x30" in line
    assert "EXIF Orientation 6" in line
    assert "(2 of 3 images of" in line and "2 of another size" in line
    assert line.endswith("or set ExtractConfig.skip_bad to leave them out")

    (tmp_path / "img" / "ok.jpg").unlink()
    report = scan_images(ds, "ExtractConfig.images", "ExtractConfig.skip_bad", skip_bad=True)
    assert [b["problem"] for b in report.bad] == ["size", "size", "missing"]
    assert report.summary() == "3 of 3 images bad (1 missing, 2 of another size)"


def test_eval_and_online_scan_before_building_a_model(tmp_path, monkeypatch):
    from cachedet.engine import sources
    from cachedet.engine.config import LoaderConfig
    from cachedet.engine.distributed import DistInfo
    from cachedet.evaluation import evaluate
    from cachedet.evaluation.config import EvalConfig

    ds = _dataset(tmp_path, {"a.jpg": (40, 30), "b.jpg": (40, 31)})

    def no_model(*a, **k):
        raise AssertionError("model built before the scan")

    monkeypatch.setattr(evaluate, "Predictor", no_model)
    monkeypatch.setattr(sources, "build_backbone", no_model)
    with pytest.raises(CachedetError, match=r"b\.jpg: image is 40x30 .* under EvalConfig\.images"):
        evaluate.evaluate_run(
            EvalConfig(str(tmp_path), ds.annotation_path, ds.images_dir), progress=False
        )
    with pytest.raises(CachedetError, match=r"b\.jpg: image is 40x30 .* under source\.images"):
        sources.OnlineSource(
            ds.annotation_path, ds.images_dir, None, None, False, LoaderConfig(), DistInfo(0, 1, 0)
        )
