"""A store written by today's pipeline equals, array for array, the reference written before the
extraction pipeline was reworked (issue 15): sha256 of every array's bytes, kept in
``data/reference_store.json``.

Features come from floating-point kernels, so their bytes are compared only under the torch
version (and CPU architecture) the reference was written with; every other array (views, boxes,
metadata, masks, quant params of uint8 stores go with the features) is compared everywhere.
Regenerate after an intended format change with ``python tests/unit/cache/test_reference_store.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import warnings

import numpy as np
import pytest
import torch
import zarr

from cachedet.cache.store import CHECKSUMS
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import extract

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "reference_store.json")
DTYPES = ("float16", "bfloat16", "uint8")


def store_digests(url: str) -> dict[str, str]:
    """sha256 of every array's bytes in the store, by path; plus the completion records (less their
    time and their checksums of those same arrays)."""
    group = zarr.open_group(url, mode="r")
    out = {}
    with warnings.catch_warnings():  # _shards/ holds JSON records, not zarr nodes
        warnings.simplefilter("ignore")
        members = sorted(group.members(max_depth=None))
    for path, arr in members:
        if isinstance(arr, zarr.Array):
            out[path] = hashlib.sha256(np.ascontiguousarray(arr[...]).tobytes()).hexdigest()
    records = sorted(os.listdir(os.path.join(url, "_shards")))
    for name in records:
        with open(os.path.join(url, "_shards", name)) as f:
            rec = json.load(f)
        rec.pop("seconds")
        for checksums in CHECKSUMS:  # derived from the array bytes compared above
            rec.pop(checksums, None)
        out[f"_shards/{name}"] = hashlib.sha256(
            json.dumps(rec, sort_keys=True).encode()
        ).hexdigest()
    return out


def write_reference_store(paths: dict, out: str, dtype: str) -> str:
    from conftest import small_config

    cfg = small_config(
        paths, out, augment=AugmentConfig(size=64, seed=5), views=2, shard_views=5, dtype=dtype
    )
    extract(cfg, progress=False)
    return out


def environment() -> dict:
    return {"torch": torch.__version__.split("+")[0], "machine": platform.machine()}


def float_dependent(path: str) -> bool:
    return path.startswith(("features/", "quant/", "_shards/"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_new_store_equals_the_reference_array_for_array(synthetic, tmp_path, dtype):
    with open(REFERENCE) as f:
        reference = json.load(f)
    got = store_digests(write_reference_store(synthetic, str(tmp_path / "s.zarr"), dtype))
    want = reference["stores"][dtype]
    assert sorted(got) == sorted(want)
    assert any(k.startswith("masks/") for k in got)  # the reference covers instance masks
    same_env = reference["environment"] == environment()
    for path in want:
        if same_env or not float_dependent(path):
            assert got[path] == want[path], f"{dtype} store: {path} differs from the reference"


if __name__ == "__main__":  # regenerate the reference (run from the repository root)
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from cachedet.data.synthetic import SyntheticSpec, make_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        spec = SyntheticSpec(num_train=12, num_val=4, min_side=96, max_side=180, max_objects=4)
        data = make_synthetic_dataset(os.path.join(tmp, "data"), spec)
        stores = {
            d: store_digests(write_reference_store(data, os.path.join(tmp, f"{d}.zarr"), d))
            for d in DTYPES
        }
    with open(REFERENCE, "w") as f:
        json.dump({"environment": environment(), "stores": stores}, f, indent=1, sort_keys=True)
    print(f"wrote {REFERENCE}")
