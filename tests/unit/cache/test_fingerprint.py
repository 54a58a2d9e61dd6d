"""The one compatibility check of features and heads: Fingerprint (sources, resume, eval)."""

import dataclasses

import pytest

from cachedet.cache.header import Fingerprint, check_fingerprint, check_weights
from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec
from cachedet.engine.config import LoaderConfig
from cachedet.engine.distributed import DistInfo
from cachedet.engine.sources import CacheSource


def test_the_cache_source_saves_the_store_fingerprint(tiny_store):
    source = CacheSource(
        tiny_store.url,
        LoaderConfig(batch_size=2, workers=0, in_memory=True, shuffle_buffer=4),
        DistInfo(0, 1, 0),
    )
    fp = tiny_store.header.fingerprint()
    assert source.fingerprint == fp.to_dict() and Fingerprint.from_dict(source.fingerprint) == fp
    assert list(fp.to_dict()) == ["feature_specs", "backbone", "canvas", "categories"]
    assert (
        set(fp.backbone) == {"name", "out_indices", "weights_sha256", "mean", "std"}
        and fp.canvas == 64
    )
    assert [c["id"] for c in fp.to_dict()["categories"]] == list(tiny_store.header.categories.ids)


def test_check_names_every_difference_with_both_values(tiny_store):
    fp = tiny_store.header.fingerprint()
    other = dataclasses.replace(
        fp,
        canvas=96,
        specs=fp.specs[:-1] + (FeatureSpec("c5", 1, 32),),
        backbone={**fp.backbone, "weights_sha256": "x"},
    )
    fp.check(fp, "same", found_label="checkpoint")
    with pytest.raises(CachedetError) as err:
        fp.check(other, "--cache S (checkpoint C) does not fit this run", found_label="checkpoint")
    msg = str(err.value)
    assert msg.startswith("--cache S (checkpoint C) does not fit this run: ") and "\n" not in msg
    assert "canvas: checkpoint has 64, asked for 96" in msg
    # values shown whole (no cut hashes), lists of dicts compared item by item
    assert f"backbone.weights_sha256: checkpoint has '{fp.backbone['weights_sha256']}'" in msg
    assert "…" not in msg
    assert "feature_specs[2].channels: checkpoint has 96, asked for 1" in msg


def test_saved_dicts_and_objects_check_alike(tiny_store):
    fp = tiny_store.header.fingerprint()
    check_fingerprint(fp.to_dict(), fp, "m", found_label="store")
    changed = {**fp.to_dict(), "categories": [{"id": 1, "name": "other"}]}
    with pytest.raises(CachedetError, match=r"^m: categories: store has 1 category: 1 'other', "):
        check_fingerprint(changed, fp, "m", found_label="store")


def test_check_weights():
    check_weights({"weights_sha256": "a"}, {"weights_sha256": "a"}, "unused")
    with pytest.raises(CachedetError, match="^run R: other weights$"):
        check_weights({"weights_sha256": "a"}, {"weights_sha256": "b"}, "run R: other weights")
