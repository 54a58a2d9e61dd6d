"""Features a store's dtype cannot hold are refused at extraction, naming the image, view and
level, before a store that would hold inf is left behind; a wider dtype stores them."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

import cachedet.extraction.shards as shards
from cachedet.cache.store import StoreReader
from cachedet.core.errors import NonFiniteFeatures
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import extract


@pytest.fixture
def loud_backbone(monkeypatch):
    """The backbone's c5 beyond float16's largest finite value (65504) for every view."""
    plain = shards.forward

    def loud(backbone, images):
        feats = plain(backbone, images)
        last = backbone.specs[-1].name
        return {**feats, last: feats[last] * 0 + 1e5}

    monkeypatch.setattr(shards, "forward", loud)


def _config(synthetic, out, dtype):
    from conftest import small_config

    return small_config(
        synthetic, out, augment=AugmentConfig(size=64, seed=1), views=1, dtype=dtype
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "uint8"])
def test_features_beyond_the_dtype_are_refused_naming_image_view_and_level(
    synthetic, tmp_path, loud_backbone, dtype
):
    out = str(tmp_path / "s.zarr")
    if dtype != "float16":  # bfloat16 and uint8 hold 1e5: stored, and read back finite
        extract(_config(synthetic, out, dtype), progress=False)
        assert np.isfinite(StoreReader(out).read_level("c5", slice(None))).all()
        return
    with pytest.raises(NonFiniteFeatures) as err:
        extract(_config(synthetic, out, dtype), progress=False)
    msg = str(err.value)
    assert "view 0, level c5: features beyond float16's range" in msg and "\n" not in msg
    assert msg.split(":")[0].endswith((".jpg", ".png")) and "image " in msg
    assert not os.path.exists(out)  # made by this run and holding nothing: removed


def test_float32_stores_what_float16_cannot(synthetic, tmp_path, loud_backbone):
    out = str(tmp_path / "s.zarr")
    extract(_config(synthetic, out, "float32"), progress=False)
    c5 = zarr.open_array(os.path.join(out, "features", "c5"), mode="r")[:]
    assert np.isfinite(c5).all() and c5.max() == pytest.approx(1e5)
