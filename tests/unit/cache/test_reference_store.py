"""A store written by today's pipeline equals the reference written before the extraction pipeline
was reworked, on any CPU.

Two references, in ``data/``:

- ``reference_store.json``: sha256 of every array whose bytes do not depend on floating-point
  kernels (views, boxes, metadata, masks, the shards' completion records less their time and
  checksums). Those are compared byte for byte.
- ``reference_features.npz`` (about 140 KB): the float16 store's features, per level. Features come
  from the backbone's float32 kernels, whose sums are ordered differently on another CPU (AVX-512,
  AVX2 or the default kernels of ``ATEN_CPU_CAPABILITY``), so each store's decoded features are
  compared with this reference within a tolerance (``feature_mismatches``):

      |got - want| <= ulp_store / 2 + ulp_float16 / 2 + 2**-16 * max|want of the level|

  Both sides round the same float32 features to nearest: the store to its own dtype (half its ulp,
  or half a quantisation step for uint8), the reference to float16 (half a float16 ulp), both at
  the larger of the two magnitudes. The last term bounds the float32 kernels' own differences
  (reordered sums: a few float32 ulps of the level's largest value; measured about 2**-23 between
  AVX-512 and the default kernels; 2**-16 leaves 100x headroom). A real change moves features
  by far more: a changed augmentation or a weight changed by 1 % fails (tested below), while a
  one-ulp change of every float16 value passes.

Regenerate after an intended change with
``PYTHONPATH=tests python tests/unit/cache/test_reference_store.py`` (from the repository root).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import numpy as np
import pytest
import zarr

from cachedet.cache import schema
from cachedet.cache.store import CHECKSUMS
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import extract

DATA = os.path.join(os.path.dirname(__file__), "data")
REFERENCE = os.path.join(DATA, "reference_store.json")
FEATURES = os.path.join(DATA, "reference_features.npz")
DTYPES = ("float16", "bfloat16", "uint8")
KERNEL_TOLERANCE = 2.0**-16  # float32 kernel differences, relative to a level's largest value


def store_digests(url: str) -> dict[str, str]:
    """sha256 of the bytes of every array that floating-point kernels do not write, by path; plus
    the completion records (less their time, image file stamps and checksums of the feature arrays)."""
    group = zarr.open_group(url, mode="r")
    out = {}
    with warnings.catch_warnings():  # _shards/ holds JSON records, not zarr nodes
        warnings.simplefilter("ignore")
        members = sorted(group.members(max_depth=None))
    for path, arr in members:
        if isinstance(arr, zarr.Array) and not path.startswith(("features/", "quant/")):
            out[path] = hashlib.sha256(np.ascontiguousarray(arr[...]).tobytes()).hexdigest()
    for name in sorted(os.listdir(os.path.join(url, "_shards"))):
        with open(os.path.join(url, "_shards", name)) as f:
            rec = json.load(f)
        rec.pop("seconds")
        rec.pop("images", None)  # paths and modification times of the image files (for --update)
        for checksums in CHECKSUMS:  # derived from the feature bytes compared with a tolerance
            rec.pop(checksums, None)
        out[f"_shards/{name}"] = hashlib.sha256(
            json.dumps(rec, sort_keys=True).encode()
        ).hexdigest()
    return out


def store_features(url: str) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(dtype, {level: stored (V, C, H, W)}, {level: quant params (V, C, 2)} or None) of a store."""
    group = zarr.open_group(url, mode="r")
    levels = sorted(group["features"].array_keys())
    stored = {lv: group["features"][lv][...] for lv in levels}
    quant = {lv: group["quant"][lv][...] for lv in levels} if "quant" in group else None
    dtype = (
        "uint8" if quant else ("bfloat16" if stored[levels[0]].dtype == np.uint16 else "float16")
    )
    return dtype, stored, quant


def ulp(dtype: str, magnitude: np.ndarray, quant: np.ndarray | None = None) -> np.ndarray:
    """Spacing of ``dtype``'s values at ``magnitude`` (float32, >= 0); for uint8 the quantisation
    step of each view and channel (``quant`` (V, C, 2))."""
    if dtype == "float16":
        return np.spacing(magnitude.astype(np.float16)).astype(np.float32)
    if dtype == "bfloat16":  # 7 fraction bits against float32's 23
        return np.spacing(magnitude.astype(np.float32)) * np.float32(2.0**16)
    if dtype == "uint8":
        return np.broadcast_to(quant[..., 1, None, None], magnitude.shape)
    raise ValueError(dtype)


def feature_mismatches(
    dtype: str,
    stored: dict[str, np.ndarray],
    quant: dict[str, np.ndarray] | None,
    reference: dict[str, np.ndarray],
) -> list[str]:
    """Levels whose decoded features are outside the tolerance of the module docstring around the
    float16 ``reference`` ({level: (V, C, H, W) float16}); one line each, empty when all fit."""
    out = []
    for lv, want16 in sorted(reference.items()):
        if lv not in stored or stored[lv].shape != want16.shape:
            out.append(f"{lv}: shape {getattr(stored.get(lv), 'shape', None)} != {want16.shape}")
            continue
        q = quant[lv] if quant else None
        got = schema.decode(stored[lv], dtype, q)
        want = want16.astype(np.float32)
        mag = np.maximum(np.abs(got), np.abs(want))
        tol = (
            ulp(dtype, mag, q) / 2
            + ulp("float16", mag) / 2
            + KERNEL_TOLERANCE * float(np.abs(want).max())
        )
        bad = ~(np.abs(got - want) <= tol)  # NaN is off too
        if bad.any():
            worst = float((np.abs(got - want) / tol).max())
            out.append(f"{lv}: {int(bad.sum())} of {bad.size} values off, worst {worst:.3g}x tol")
    return out


def reference_features() -> dict[str, np.ndarray]:
    with np.load(FEATURES) as z:
        return {k: z[k] for k in z.files}


def write_reference_store(paths: dict, out: str, dtype: str, seed: int = 5) -> str:
    from conftest import small_config

    cfg = small_config(
        paths, out, augment=AugmentConfig(size=64, seed=seed), views=2, shard_views=5, dtype=dtype
    )
    extract(cfg, progress=False)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_new_store_equals_the_reference_array_for_array(synthetic, tmp_path, dtype):
    with open(REFERENCE) as f:
        want = json.load(f)["stores"][dtype]
    url = write_reference_store(synthetic, str(tmp_path / "s.zarr"), dtype)
    got = store_digests(url)
    assert sorted(got) == sorted(want)
    assert any(k.startswith("masks/") for k in got)  # the reference covers instance masks
    for path in want:
        assert got[path] == want[path], f"{dtype} store: {path} differs from the reference"
    assert feature_mismatches(*store_features(url), reference_features()) == []


def test_features_one_ulp_away_pass_and_a_nan_does_not():
    ref = reference_features()
    for direction in (np.inf, -np.inf):  # every value one float16 ulp up, then down
        moved = {lv: np.nextafter(a, np.float16(direction)) for lv, a in ref.items()}
        assert feature_mismatches("float16", moved, None, ref) == []
    as_bf16, _ = zip(*(schema.encode(a.astype(np.float32), "bfloat16") for a in ref.values()))
    assert feature_mismatches("bfloat16", dict(zip(ref, as_bf16)), None, ref) == []
    nan = {lv: np.where(a == a.max(), np.float16(np.nan), a) for lv, a in ref.items()}
    assert len(feature_mismatches("float16", nan, None, ref)) == len(ref)


def test_a_changed_augmentation_fails_the_feature_comparison(synthetic, tmp_path):
    url = write_reference_store(synthetic, str(tmp_path / "s.zarr"), "float16", seed=6)
    assert feature_mismatches(*store_features(url), reference_features()) != []


def test_a_weight_changed_by_one_percent_fails_the_feature_comparison(
    synthetic, tmp_path, monkeypatch
):
    import torch

    from cachedet.extraction import shards

    build = shards.build_backbone

    def perturbed(cfg, warn=True):
        backbone = build(cfg, warn=warn)
        with torch.no_grad():
            next(p for p in backbone.parameters() if p.dim() == 4).mul_(1.01)  # the stem conv
        return backbone

    monkeypatch.setattr(shards, "build_backbone", perturbed)
    url = write_reference_store(synthetic, str(tmp_path / "s.zarr"), "float16")
    assert feature_mismatches(*store_features(url), reference_features()) != []
    with open(REFERENCE) as f:  # only the features moved: the tolerance check is what caught it
        assert store_digests(url) == json.load(f)["stores"]["float16"]


if __name__ == "__main__":  # regenerate the references (run from the repository root)
    import tempfile

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from cachedet.data.synthetic import SyntheticSpec, make_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        spec = SyntheticSpec(num_train=12, num_val=4, min_side=96, max_side=180, max_objects=4)
        data = make_synthetic_dataset(os.path.join(tmp, "data"), spec)
        urls = {d: write_reference_store(data, os.path.join(tmp, f"{d}.zarr"), d) for d in DTYPES}
        stores = {d: store_digests(url) for d, url in urls.items()}
        np.savez_compressed(FEATURES, **store_features(urls["float16"])[1])
    with open(REFERENCE, "w") as f:
        json.dump({"stores": stores}, f, indent=1, sort_keys=True)
    print(f"wrote {REFERENCE} and {FEATURES}")
