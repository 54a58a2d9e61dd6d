import numpy as np
import pytest
import torch
from helpers import reference_boxes

from cachedet.data.views import (
    AugmentConfig,
    plan_view,
    plan_views_many,
    transform_boxes,
    transform_boxes_many,
    transform_image,
    view_to_image_boxes,
)


def random_boxes(rng, h, w, n=12):
    x1, y1 = rng.uniform(0, w - 2, n), rng.uniform(0, h - 2, n)
    return np.stack(
        [
            x1,
            y1,
            np.minimum(x1 + rng.uniform(1, w / 2, n), w),
            np.minimum(y1 + rng.uniform(1, h / 2, n), h),
        ],
        1,
    ).astype(np.float32)


def test_plan_is_deterministic_and_varies_with_view():
    cfg = AugmentConfig(size=256, seed=11)
    a = plan_view(cfg, 42, 3, 300, 500)
    assert a == plan_view(cfg, 42, 3, 300, 500)
    others = {plan_view(cfg, 42, k, 300, 500) for k in range(8)}
    assert len(others) == 8
    assert plan_view(AugmentConfig(size=256, seed=12), 42, 3, 300, 500) != a


def test_scale_range_and_crop_bounds():
    cfg = AugmentConfig(size=128, scale_range=(0.5, 1.5), seed=0)
    for k in range(200):
        p = plan_view(cfg, 7, k, 90, 160)
        longer = max(p.resized_size)
        assert 0.5 * 128 - 1 <= longer <= 1.5 * 128 + 1
        assert 0 <= p.crop_offset[0] <= max(p.resized_size[0] - 128, 0)
        assert 0 <= p.crop_offset[1] <= max(p.resized_size[1] - 128, 0)
    flips = [plan_view(cfg, 7, k, 90, 160).flip for k in range(200)]
    assert 60 < sum(flips) < 140


def test_no_augment_fits_the_canvas():
    p = plan_view(AugmentConfig(size=128, augment=False), 1, 0, 90, 160)
    assert p.resized_size == (72, 128) and p.crop_offset == (0, 0) and not p.flip
    assert p.valid_size == (72, 128)


def test_boxes_match_an_independent_reference():
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(size=96, seed=5)
    checked_flip = checked_crop = checked_pad = 0
    for k in range(60):
        h, w = (int(v) for v in rng.integers(40, 200, 2))
        boxes = random_boxes(rng, h, w)
        labels = np.arange(len(boxes))
        p = plan_view(cfg, 3, k, h, w)
        got, got_labels, got_ids = transform_boxes(p, boxes, labels, labels + 100)
        want, keep = reference_boxes(p, boxes)
        np.testing.assert_allclose(got, want, atol=1e-3)
        assert got_labels.tolist() == labels[keep].tolist()
        assert got_ids.tolist() == (labels[keep] + 100).tolist()
        checked_flip += p.flip
        checked_crop += max(p.resized_size) > 96
        checked_pad += min(p.valid_size) < 96
    assert checked_flip and checked_crop and checked_pad


def test_image_and_boxes_stay_aligned():
    """Paint each box's area in the source image; the view's box area has that colour."""
    cfg = AugmentConfig(size=128, seed=2, scale_range=(0.8, 1.6))
    h, w = 120, 150
    boxes = np.array([[10, 20, 50, 70], [80, 30, 140, 100]], dtype=np.float32)
    image = torch.zeros(3, h, w)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        image[i, y1:y2, x1:x2] = 1.0
    for k in range(10):
        p = plan_view(cfg, 9, k, h, w)
        view = transform_image(p, image)
        assert view.shape == (3, 128, 128)
        got, labels, _ = transform_boxes(p, boxes, np.array([0, 1]), np.array([0, 1]))
        for (x1, y1, x2, y2), lab in zip(got, labels):
            inner = view[lab, int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
            if inner.numel():
                assert inner.mean() > 0.95
        assert view[:, p.valid_size[0] :, :].abs().sum() == 0  # padding below the image
        assert view[:, :, p.valid_size[1] :].abs().sum() == 0  # padding right of the image


def test_image_view_equals_resize_flip_crop():
    """The view is exactly the resized image, flipped, then cropped or padded to the canvas (the
    order LSJ is defined in), for crops inside the image and pads beyond it."""
    import torchvision.transforms.v2.functional as F

    cfg = AugmentConfig(size=64, seed=1, scale_range=(0.3, 2.0))
    image = torch.randn(3, 50, 90)
    seen = set()
    for k in range(40):
        p = plan_view(cfg, 4, k, 50, 90)
        want = F.resize(image, list(p.resized_size), antialias=True)
        want = F.horizontal_flip(want) if p.flip else want
        want = F.crop(want, *p.crop_offset, 64, 64)
        assert torch.equal(transform_image(p, image), want)
        seen.add((p.flip, max(p.resized_size) > 64, min(p.resized_size) < 64))
    assert {(True, True), (True, False), (False, True)} <= {s[:2] for s in seen}
    assert any(f and pad for f, _, pad in seen)  # a flipped view padded to the canvas


def test_view_boxes_map_back_to_the_image():
    rng = np.random.default_rng(2)
    cfg = AugmentConfig(size=160, seed=4, scale_range=(0.3, 2.0))
    mapped = 0
    for k in range(40):
        h, w = (int(v) for v in rng.integers(60, 220, 2))
        boxes = random_boxes(rng, h, w)
        p = plan_view(cfg, 5, k, h, w)
        got, _, ids = transform_boxes(p, boxes, np.zeros(len(boxes)), np.arange(len(boxes)))
        back = view_to_image_boxes(p, got)
        # boxes that were not clipped by the crop come back exactly (up to float rounding)
        ref, keep = reference_boxes(p, boxes)
        unclipped = [i for i, b in zip(ids, ref) if (b > 0).all() and (b < p.canvas).all()]
        for i in unclipped:
            j = ids.tolist().index(i)
            np.testing.assert_allclose(back[j], boxes[i], atol=1e-2)
            mapped += 1
    assert mapped > 50


def test_bad_options():
    from cachedet.core.errors import CachedetError

    with pytest.raises(CachedetError, match="augment.scale_range"):
        AugmentConfig(scale_range=(2.0, 0.5))
    with pytest.raises(CachedetError, match="augment.size"):
        AugmentConfig(size=8)


def test_box_kernels_equal_torchvisions_box_transforms_bit_for_bit():
    """transform_boxes calls torchvision's box kernels on plain tensors (planning speed); the
    BoundingBoxes + SanitizeBoundingBoxes transforms it replaced give the same bytes."""
    import torch
    import torchvision.transforms.v2 as v2
    import torchvision.transforms.v2.functional as F
    from torchvision import tv_tensors

    sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=lambda d: (d["l"], d["i"]))

    def reference(params, boxes, labels, ids):
        bb = tv_tensors.BoundingBoxes(
            torch.as_tensor(boxes), format="XYXY", canvas_size=params.orig_size
        )
        bb = F.resize(bb, list(params.resized_size))
        if params.flip:
            bb = F.horizontal_flip(bb)
        bb = F.crop(bb, *params.crop_offset, params.canvas, params.canvas)
        out = sanitize({"b": bb, "l": torch.as_tensor(labels), "i": torch.as_tensor(ids)})
        return out["b"].as_subclass(torch.Tensor).numpy(), out["l"].numpy(), out["i"].numpy()

    rng = np.random.default_rng(0)
    augments = (
        AugmentConfig(size=64, scale_range=(0.1, 2.0)),
        AugmentConfig(size=96),
        AugmentConfig(size=64, augment=False),
    )
    for k in range(300):
        aug = augments[k % 3]
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        n = int(rng.integers(0, 10))
        x, y = rng.uniform(0, w, n), rng.uniform(0, h, n)
        boxes = np.stack([x, y, x + rng.uniform(0, w / 2, n), y + rng.uniform(0, h / 2, n)], 1)
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        labels, ids = rng.integers(0, 80, n), np.arange(n) + 1
        params = plan_view(aug, k, int(rng.integers(0, 3)), h, w)
        ours = transform_boxes(params, boxes, labels, ids)
        for a, b in zip(ours, reference(params, boxes, labels, ids)):
            np.testing.assert_array_equal(a, b)


def test_boxes_of_many_views_at_once_equal_each_view_bit_for_bit():
    """The batched planner's kernel: every view's boxes as ``transform_boxes`` gives them, down to
    the sign of zero (a box at the right edge, flipped, starts at -0.0), across canvases, flips,
    crops, pads, boxes under one pixel and views with no boxes."""
    rng = np.random.default_rng(5)
    views, boxes, counts, expected = [], [], [], []
    for k in range(60):
        cfg = AugmentConfig(size=int(rng.choice([32, 64, 96])), scale_range=(0.05, 2.5), seed=k)
        h, w = int(rng.integers(8, 200)), int(rng.integers(8, 200))
        b = random_boxes(rng, h, w, n=int(rng.integers(0, 9)))
        edge = np.array([[0, 0, w, h], [w - 0.5, 0, w, 1.5], [0, h - 3, 2, h]], np.float32)
        b = np.concatenate([b, edge[: k % 4]])
        params = plan_view(cfg, k, k % 3, h, w)
        out, labels, ids = transform_boxes(params, b, np.arange(len(b)), np.arange(len(b)) + 100)
        views.append(params)
        boxes.append(b)
        counts.append(len(b))
        expected.append((out, ids - 100))
    got, keep = transform_boxes_many(views, np.concatenate(boxes), np.asarray(counts))
    want = np.concatenate([e[0] for e in expected])
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got.view(np.int32), want.view(np.int32))  # bits, signed zeros too
    assert np.signbit(want).any()  # the edge boxes did reach the -0.0 case
    starts = np.cumsum(counts) - counts
    assert np.array_equal(
        np.flatnonzero(keep), np.concatenate([s + e[1] for s, e in zip(starts, expected)])
    )


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(size=640),
        AugmentConfig(size=64, scale_range=(0.1, 3.0), seed=7),
        AugmentConfig(size=96, flip=False, seed=2**32 - 1, scale_range=(0.5, 2.5)),
        AugmentConfig(size=128, augment=False),
        AugmentConfig(size=32, seed=2**40),  # a seed of two 32-bit words: plan_view's own way
    ],
)
def test_many_views_planned_at_once_equal_plan_view_view_for_view(cfg):
    """numpy's random streams drawn as arrays (SeedSequence, PCG64, random(), integers()) give
    every view plan_view gives, including ids past 32 bits (planned one by one)."""
    rng = np.random.default_rng(3)
    n = 3000
    ids = rng.integers(0, 2**32, n)
    ids[:50], ids[50:55] = np.arange(50), 2**32 + np.arange(5)
    ks, hs, ws = rng.integers(0, 5, n), rng.integers(1, 3000, n), rng.integers(1, 3000, n)
    got = plan_views_many(cfg, ids, ks, hs, ws)
    want = [plan_view(cfg, int(i), int(k), int(h), int(w)) for i, k, h, w in zip(ids, ks, hs, ws)]
    assert got == want
    assert all(type(v.crop_offset[0]) is int and type(v.flip) is bool for v in got)
    assert len({v.crop_offset for v in got}) > (1 if cfg.augment else 0)
