"""Helpers shared by test modules in different folders (import: ``from helpers import ...``)."""

from __future__ import annotations

import numpy as np

from cachedet.cache.store import FeatureStore


def extract_args(data: dict, out) -> list:
    """The start of a ``cachedet extract`` command line for a test dataset ({"train", "images"})
    writing the store ``out``; the caller adds the rest."""
    return ["extract", "--annotations", data["train"], "--images", data["images"], "--out", out]


def reference_boxes(params, boxes):
    """Independent numpy re-statement of resize -> flip -> crop/pad -> clip -> drop (< 1 px)."""
    sy, sx = (
        params.resized_size[0] / params.orig_size[0],
        params.resized_size[1] / params.orig_size[1],
    )
    b = boxes.astype(np.float64) * [sx, sy, sx, sy]
    if params.flip:
        b[:, [0, 2]] = params.resized_size[1] - b[:, [2, 0]]
    b -= [params.crop_offset[1], params.crop_offset[0]] * 2
    b = b.clip(0, params.canvas)
    keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
    return b[keep], keep


def all_arrays(url):
    fs = FeatureStore(url)
    out = {f"features/{s.name}": fs.features_array(s.name)[...] for s in fs.specs}
    out.update({f"meta/{k}": v for k, v in fs.meta.items()})
    out["boxes/offsets"] = fs.box_offsets
    out.update({f"boxes/{k}": v for k, v in fs._boxes.items()})
    if fs.has_masks:  # every shard's packed instance masks
        for shard in range(fs.num_shards):
            out[f"masks/{shard}/rle"], out[f"masks/{shard}/offsets"] = fs.read_shard_masks(shard)
    return out


def assert_same_store(a_url: str, b_url: str):
    """Same views, boxes and metadata; features equal up to float16 rounding."""
    a, b = all_arrays(a_url), all_arrays(b_url)
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("features/"):
            np.testing.assert_allclose(
                a[k].astype(np.float32), b[k].astype(np.float32), rtol=1e-3, atol=1e-3, err_msg=k
            )
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def reference_lvis_eval(path, detections: list[dict], iou_type: str = "bbox") -> dict:
    """lvis-api's LVISEval run directly on the file at ``path`` (its printout silenced): the
    reference results ({"AP": fraction, ...}) cachedet's LVIS scores are compared with."""
    import contextlib
    import copy
    import io

    from lvis import LVIS, LVISEval

    np.float = float  # lvis 0.5.3 on numpy >= 1.24, only for this reference run
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ev = LVISEval(LVIS(str(path)), copy.deepcopy(detections), iou_type)
            ev.run()
        return ev.get_results()
    finally:
        del np.float


def load_benchmark(name: str):
    """The module of ``benchmarks/NAME.py`` (benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
