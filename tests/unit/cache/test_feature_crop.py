"""Feature-space crops keep features and boxes aligned at every level."""

import numpy as np
import pytest
import torch
from conftest import small_config
from conftest import train_config as tiny_train
from torchvision.ops import roi_align

from cachedet.cache.dataset import InMemoryViews, collate_views
from cachedet.cache.feature_crop import check_alignment, crop_batch
from cachedet.core.errors import CachedetError
from cachedet.data.views import AugmentConfig
from cachedet.engine.train import train
from cachedet.extraction.run import extract


@pytest.fixture(scope="module")
def store(synthetic, tmp_path_factory):
    cfg = small_config(synthetic, str(tmp_path_factory.mktemp("crop") / "s.zarr"), views=1)
    extract(cfg, progress=False)
    return cfg


def test_a_box_sees_the_same_features_before_and_after_the_crop(store):
    ds = InMemoryViews(store.out)
    batch = collate_views(list(ds))
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(5):
        cropped = crop_batch(batch, ds.specs, 0.5, rng)
        h, w = cropped["image_sizes"][0]
        for i, (before, after) in enumerate(zip(batch["targets"], cropped["targets"])):
            top, left = cropped["crop_offsets"][i]
            shifted = before["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
            inside = (
                (shifted[:, 0] >= 0)
                & (shifted[:, 1] >= 0)
                & (shifted[:, 2] <= w)
                & (shifted[:, 3] <= h)
            )
            # boxes are shifted by the offset, clipped to the window; slivers under a pixel are dropped
            clipped = torch.stack(
                [
                    shifted[:, 0].clamp(0, w),
                    shifted[:, 1].clamp(0, h),
                    shifted[:, 2].clamp(0, w),
                    shifted[:, 3].clamp(0, h),
                ],
                1,
            )
            kept = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
            torch.testing.assert_close(after["boxes"], clipped[kept])
            assert torch.equal(after["labels"], before["labels"][kept])
            for spec in ds.specs:
                if not inside.any():
                    continue
                scale = 1.0 / spec.stride
                a = roi_align(
                    batch["inputs"][spec.name][i : i + 1],
                    [before["boxes"][inside]],
                    3,
                    scale,
                    aligned=True,
                )
                b = roi_align(
                    cropped["inputs"][spec.name][i : i + 1],
                    [shifted[inside]],
                    3,
                    scale,
                    aligned=True,
                )
                # RoIAlign samples bilinearly; away from the window's edge both read the same cells
                interior = (
                    (shifted[inside][:, :2] >= spec.stride)
                    & (shifted[inside][:, 2:] <= torch.tensor([w, h]) - spec.stride)
                ).all(1)
                torch.testing.assert_close(a[interior], b[interior])
                checked += int(interior.sum())
            assert all(
                cropped["inputs"][s.name].shape[-2:] == (h // s.stride, w // s.stride)
                for s in ds.specs
            )
    assert checked > 10


def test_boxes_are_clipped_to_the_window_and_slivers_dropped(store):
    ds = InMemoryViews(store.out)
    batch = collate_views(list(ds))
    cropped = crop_batch(batch, ds.specs, 0.4, np.random.default_rng(1))
    h, w = cropped["image_sizes"][0]
    for t in cropped["targets"]:
        b = t["boxes"]
        assert len(b) == len(t["labels"])
        assert (
            (b[:, 0] >= 0).all()
            and (b[:, 2] <= w).all()
            and (b[:, 1] >= 0).all()
            and (b[:, 3] <= h).all()
        )
        assert ((b[:, 2] - b[:, 0]) >= 1).all() and ((b[:, 3] - b[:, 1]) >= 1).all()
    assert sum(len(t["boxes"]) for t in cropped["targets"]) < sum(
        len(t["boxes"]) for t in batch["targets"]
    )


def test_training_with_feature_crops(store, synthetic, tmp_path, cli):
    result = train(
        tiny_train(tmp_path / "run", store.out, epochs=2, feature_crop=True, feature_crop_min=0.5),
        progress=False,
    )
    assert result.steps == 6 and np.isfinite(result.last_loss)
    r = cli(
        "train-heads",
        "--online",
        "--annotations",
        synthetic["train"],
        "--images",
        synthetic["images"],
        "--out",
        tmp_path / "r2",
        "--feature-crop",
    )
    assert r.exit_code == 2 and "--feature-crop" in r.stderr


def test_a_canvas_that_the_coarsest_stride_does_not_divide_is_refused(synthetic, tmp_path):
    cfg = small_config(
        synthetic, str(tmp_path / "odd.zarr"), views=1, augment=AugmentConfig(size=100, seed=0)
    )
    extract(cfg, progress=False)
    from cachedet.cache.store import FeatureStore

    fs = FeatureStore(cfg.out)
    with pytest.raises(CachedetError, match="multiple of 32"):
        check_alignment(fs.specs, fs.shapes)
    with pytest.raises(CachedetError, match="source.feature_crop"):
        train(tiny_train(tmp_path / "run", cfg.out, epochs=1, feature_crop=True), progress=False)
