"""Augmented views: Large Scale Jittering + horizontal flip, deterministic per (seed, image, view).

A view is planned from the image *size* alone (``plan_view``), so every view's boxes can be
computed before any pixel is decoded, and any shard can be recomputed identically later.
The same ``apply_view`` moves images and boxes, through ``torchvision.transforms.v2``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors

from cachedet.core.errors import CachedetError, check_number
from cachedet.core.recipes import DEFAULT_CANVAS, get_recipe
from cachedet.core.structures import ViewParams


@dataclass(frozen=True)
class AugmentConfig:
    """How views are drawn.

    size: side of the square canvas. scale_range: LSJ factor range; the image is resized so its
    longer side is ``factor * size``; None: the recipe's (``cachedet.core.recipes``: the default
    recipe's here, the store's recipe inside an ``ExtractConfig``). augment=False gives one plain
    resize-to-fit-and-pad view.
    """

    size: int = DEFAULT_CANVAS
    scale_range: tuple[float, float] | None = None
    flip: bool = True
    augment: bool = True
    seed: int = 0
    copy_paste: float = 0.0  # probability that a view gets objects pasted from another image
    paste_min_visible: float = (
        0.3  # an occluded object keeps its box if this share of it stays visible
    )

    def __post_init__(self):
        given = (
            self.scale_range is not None
        )  # ExtractConfig fills a range not given from its recipe
        object.__setattr__(self, "range_given", given)
        if not given:
            object.__setattr__(self, "scale_range", get_recipe(None).scale_range)
        check_number("augment.size", self.size, integer=True, low=32, high=1 << 14)
        for bound in self.scale_range:
            check_number("augment.scale_range", bound, low=0, low_open=True)
        check_number("augment.seed", self.seed, integer=True, low=0)
        check_number("augment.copy_paste", self.copy_paste, low=0, high=1)
        check_number("augment.paste_min_visible", self.paste_min_visible)
        if self.size < 32:
            raise CachedetError(f"augment.size: expected at least 32 pixels, got {self.size}")
        lo, hi = self.scale_range
        if not (0 < lo <= hi):
            raise CachedetError(f"augment.scale_range: expected 0 < MIN <= MAX, got {lo} {hi}")
        if self.seed < 0:
            raise CachedetError(f"augment.seed: expected a non-negative integer, got {self.seed}")
        if not 0.0 <= self.copy_paste <= 1.0:
            raise CachedetError(
                f"augment.copy_paste: expected a probability in [0, 1], got {self.copy_paste}"
            )
        if not 0.0 < self.paste_min_visible <= 1.0:
            raise CachedetError(
                f"augment.paste_min_visible: expected a fraction in (0, 1], got {self.paste_min_visible}"
            )
        if self.copy_paste and not self.augment:
            raise CachedetError(
                "augment.copy_paste needs augmented views: a store without augmentation "
                "(augment.augment) has none"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale_range"] = list(self.scale_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        return cls(
            size=int(d["size"]),
            scale_range=tuple(float(v) for v in d["scale_range"]),
            flip=bool(d["flip"]),
            augment=bool(d["augment"]),
            seed=int(d["seed"]),
            copy_paste=float(d.get("copy_paste", 0.0)),
            paste_min_visible=float(d.get("paste_min_visible", 0.3)),
        )


def plan_view(
    cfg: AugmentConfig,
    image_id: int,
    view_index: int,
    height: int,
    width: int,
    rng: np.random.Generator | None = None,
) -> ViewParams:
    """Draw the parameters of view ``view_index`` of an image of size (height, width).

    A pure function of (cfg.seed, image_id, view_index, image size): the same call gives the
    same view in any process, on any machine. ``rng`` replaces that generator (Copy-Paste draws
    its source objects' own jitter with it).
    """
    if not cfg.augment:
        factor, flip = 1.0, False
    else:
        rng = rng or np.random.default_rng([cfg.seed, image_id, view_index])
        factor = float(rng.uniform(*cfg.scale_range))
        flip = bool(cfg.flip and rng.random() < 0.5)
    scale = factor * cfg.size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = left = 0
    if cfg.augment:
        top = int(rng.integers(0, max(new_h - cfg.size, 0) + 1))
        left = int(rng.integers(0, max(new_w - cfg.size, 0) + 1))
    return ViewParams(
        image_id=image_id,
        view_index=view_index,
        orig_size=(height, width),
        resized_size=(new_h, new_w),
        crop_offset=(top, left),
        flip=flip,
        canvas=cfg.size,
    )


_M32 = np.uint64(0xFFFFFFFF)
_PCG_MULT = (np.uint64(0x2360ED051FC65DA4), np.uint64(0x4385DF649FCCF645))  # PCG64's, (high, low)


def _mul128(ah, al, bh, bl):
    """(high, low) words of the 128-bit product mod 2**128 of (ah, al) and (bh, bl), uint64 arrays."""
    a0, a1, b0, b1 = al & _M32, al >> np.uint64(32), bl & _M32, bl >> np.uint64(32)
    p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
    mid = (p00 >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    carry = a1 * b1 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))
    return carry + ah * bl + al * bh, al * bl


def _add128(ah, al, bh, bl):
    low = al + bl
    return ah + bh + (low < al).astype(np.uint64), low


class _PCG64s:
    """Many ``np.random.default_rng([a, b, c])`` streams at once (a, b, c each below 2**32), as numpy
    arrays: numpy's SeedSequence mixing, PCG64 (XSL-RR 128/64) seeding and stepping, and the
    Generator's ``random()`` and ``integers(0, n)`` (Lemire's method on buffered 32-bit halves).
    Bit for bit numpy's own draws (tested against ``default_rng``)."""

    def __init__(self, words: np.ndarray):  # (V, 3) uint32 entropy words
        M = 0xFFFFFFFF
        hash_a = [0x43B0D7E5]

        def hashmix(value):
            value = (value ^ np.uint32(hash_a[0])).astype(np.uint32)
            hash_a[0] = (hash_a[0] * 0x931E8875) & M
            value = value * np.uint32(hash_a[0])
            return value ^ (value >> np.uint32(16))

        def mix(x, y):
            r = np.uint32(0xCA01F9DD) * x - np.uint32(0x4973F715) * y
            return r ^ (r >> np.uint32(16))

        zero = np.zeros(len(words), np.uint32)
        pool = [hashmix(words[:, i] if i < words.shape[1] else zero) for i in range(4)]
        for src in range(4):
            for dst in range(4):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        hash_b, state = 0x8B51F9DD, []
        for i in range(8):  # generate_state(4, uint64): 8 words, little-endian pairs
            value = pool[i % 4] ^ np.uint32(hash_b)
            hash_b = (hash_b * 0x58F38DED) & M
            value = value * np.uint32(hash_b)
            state.append((value ^ (value >> np.uint32(16))).astype(np.uint64))
        seed_hi, seed_lo = (
            state[0] | state[1] << np.uint64(32),
            state[2] | state[3] << np.uint64(32),
        )
        inc_hi, inc_lo = state[4] | state[5] << np.uint64(32), state[6] | state[7] << np.uint64(32)
        # pcg64_srandom_r: state = 0; inc = initseq << 1 | 1; step; state += initstate; step
        self.inc = (
            inc_hi << np.uint64(1) | inc_lo >> np.uint64(63),
            inc_lo << np.uint64(1) | np.uint64(1),
        )
        self.state = (np.zeros_like(seed_hi), np.zeros_like(seed_lo))
        self._step(np.ones(len(words), bool))
        self.state = _add128(*self.state, seed_hi, seed_lo)
        self._step(np.ones(len(words), bool))
        self.half = np.zeros(len(words), np.uint64)  # the buffered upper 32 bits
        self.has_half = np.zeros(len(words), bool)

    def _step(self, rows):
        hi, lo = _add128(*_mul128(*self.state, *_PCG_MULT), *self.inc)
        self.state = (np.where(rows, hi, self.state[0]), np.where(rows, lo, self.state[1]))

    def next64(self, rows) -> np.ndarray:
        """The next 64-bit output of the streams where ``rows`` (others do not move)."""
        self._step(rows)
        hi, lo = self.state
        x, rot = hi ^ lo, hi >> np.uint64(58)
        return (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))

    def random(self, rows) -> np.ndarray:
        """``Generator.random()``: float64 in [0, 1)."""
        return (self.next64(rows) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)

    def integers(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Generator.integers(0, n + 1)`` (no draw where n == 0): (values, rows whose draw was
        rejected by Lemire's method and must be redrawn by numpy itself)."""
        rows = n > 0
        fresh = rows & ~self.has_half
        word = self.next64(fresh)
        value = np.where(fresh, word & _M32, self.half)
        self.half = np.where(fresh, word >> np.uint64(32), self.half)
        self.has_half = np.where(rows, fresh, self.has_half)
        excl = n.astype(np.uint64) + np.uint64(1)
        m = value * excl
        leftover = m & _M32
        threshold = (np.uint64(0xFFFFFFFF) - n.astype(np.uint64)) % excl
        return np.where(rows, m >> np.uint64(32), 0).astype(np.int64), rows & (leftover < threshold)


def plan_views_many(
    cfg: AugmentConfig,
    image_ids: np.ndarray,
    view_indices: np.ndarray,
    heights: np.ndarray,
    widths: np.ndarray,
) -> list[ViewParams]:
    """``plan_view`` of many views at once (one per row of the (V,) int arrays), equal to it view
    for view: numpy's random streams of every (seed, image id, view index) drawn as arrays
    (``_PCG64s``), the sizes computed as ``plan_view`` computes them. Views whose ids do not fit
    in 32 bits, or whose crop draw numpy would redraw, are planned by ``plan_view`` itself."""
    ids = np.asarray(image_ids, dtype=np.int64)
    index = np.asarray(view_indices, dtype=np.int64)
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    n = len(ids)
    slow = (ids < 0) | (ids > 0xFFFFFFFF) | (index < 0) | (index > 0xFFFFFFFF)
    slow |= not 0 <= cfg.seed <= 0xFFFFFFFF
    factor, flip = np.ones(n), np.zeros(n, bool)
    top, left = np.zeros(n, np.int64), np.zeros(n, np.int64)
    if cfg.augment:
        words = np.stack([np.full(n, cfg.seed % 2**32), ids & 0xFFFFFFFF, index & 0xFFFFFFFF], 1)
        streams = _PCG64s(words.astype(np.uint32))
        every = np.ones(n, bool)
        lo, hi = (float(v) for v in cfg.scale_range)
        factor = lo + (hi - lo) * streams.random(every)
        if cfg.flip:
            flip = streams.random(every) < 0.5
    scale = factor * cfg.size / np.maximum(heights, widths)
    new_h = np.maximum(1, np.rint(heights * scale)).astype(np.int64)
    new_w = np.maximum(1, np.rint(widths * scale)).astype(np.int64)
    if cfg.augment:
        top, redraw_top = streams.integers(np.maximum(new_h - cfg.size, 0))
        left, redraw_left = streams.integers(np.maximum(new_w - cfg.size, 0))
        slow |= redraw_top | redraw_left
    rows = zip(
        ids.tolist(),
        index.tolist(),
        heights.tolist(),
        widths.tolist(),
        new_h.tolist(),
        new_w.tolist(),
        top.tolist(),
        left.tolist(),
        flip.tolist(),
        slow.tolist(),
    )
    return [
        plan_view(cfg, i, k, h, w)
        if bad
        else ViewParams(i, k, (h, w), (nh, nw), (t, le), f, cfg.size)
        for i, k, h, w, nh, nw, t, le, f, bad in rows
    ]


_XYXY = tv_tensors.BoundingBoxFormat.XYXY


def transform_boxes(
    params: ViewParams, boxes: np.ndarray, labels: np.ndarray, ann_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move boxes (float32 (N, 4) xyxy, original image pixels) into the view's canvas.

    Boxes cut by the crop are clipped; boxes left narrower or shorter than 1 pixel (or under 1
    square pixel) are removed together with their labels and annotation ids. torchvision's
    ``transforms.v2`` box kernels (resize, horizontal flip, crop with soft clamping, sanitize),
    called on plain tensors: the same results as the ``BoundingBoxes`` / ``SanitizeBoundingBoxes``
    transforms, bit for bit (tested), at under half the cost per view, which view planning pays
    once per view of the dataset.
    """
    bb = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    bb, size = F.resize_bounding_boxes(
        bb, params.orig_size, list(params.resized_size), format=_XYXY
    )
    if params.flip:
        bb = F.horizontal_flip_bounding_boxes(bb, _XYXY, size)
    top, left = params.crop_offset
    bb, size = F.crop_bounding_boxes(bb, _XYXY, top, left, params.canvas, params.canvas)
    bb, keep = F.sanitize_bounding_boxes(bb, _XYXY, size, min_size=1.0, min_area=1.0)
    keep = keep.numpy()
    return (
        bb.numpy().astype(np.float32),
        np.asarray(labels)[keep].astype(np.int64),
        np.asarray(ann_ids)[keep].astype(np.int64),
    )


def transform_boxes_many(
    views: list[ViewParams], boxes: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``transform_boxes`` of many views at once, bit for bit: one pass of the same torchvision
    box operations (float32 resize ratios, flip, crop offsets, clamping, the 1-pixel sanitize) over
    the boxes of every view, instead of one kernel call per view.

    boxes: float32 (N, 4) xyxy original-image pixels, view-major: the first ``counts[0]`` rows are
    ``views[0]``'s, and so on (``counts``: (V,) ints summing to N). Returns (float32 (M, 4) xyxy
    canvas pixels of the boxes kept, in input order; bool (N,) which input rows were kept).
    """
    bb = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4).clone()
    counts = np.asarray(counts, dtype=np.int64)
    if not len(views) or not len(bb):
        return np.zeros((0, 4), np.float32), np.zeros(len(bb), dtype=bool)
    per_view = np.asarray(
        [(*v.orig_size, *v.resized_size, *v.crop_offset, v.flip, v.canvas) for v in views],
        dtype=np.int64,
    ).reshape(-1, 8)
    oh, ow, rh, rw, top, left, flip, canvas = np.repeat(per_view, counts, axis=0).T
    # resize: torch.tensor([w_ratio, h_ratio, ...]) holds the float64 ratios rounded to float32
    ratio_w = torch.from_numpy((rw / ow).astype(np.float32))
    ratio_h = torch.from_numpy((rh / oh).astype(np.float32))
    bb = bb.mul(torch.stack([ratio_w, ratio_h, ratio_w, ratio_h], 1))
    flipped = torch.from_numpy(flip.astype(bool))
    width = torch.from_numpy(rw.astype(np.float32))
    x1 = torch.where(flipped, (bb[:, 2] - width).neg(), bb[:, 0])
    x2 = torch.where(flipped, (bb[:, 0] - width).neg(), bb[:, 2])
    bb = torch.stack([x1, bb[:, 1], x2, bb[:, 3]], 1)
    bb = bb - torch.from_numpy(np.stack([left, top, left, top], 1).astype(np.float32))
    keep = torch.zeros(len(bb), dtype=torch.bool)
    sides = np.unique(per_view[:, 7])
    for side in sides.tolist():  # the clamp and the sanitize take the canvas as a scalar
        rows = torch.from_numpy(canvas == side) if len(sides) > 1 else slice(None)
        part = bb[rows]
        part[..., 0::2].clamp_(min=0, max=side)
        part[..., 1::2].clamp_(min=0, max=side)
        bb[rows] = part
        ws, hs = part[:, 2] - part[:, 0], part[:, 3] - part[:, 1]
        valid = (ws >= 1.0) & (hs >= 1.0) & (part >= 0).all(dim=-1) & (ws * hs >= 1.0)
        valid &= (part[:, 0] <= side) & (part[:, 2] <= side)
        valid &= (part[:, 1] <= side) & (part[:, 3] <= side)
        keep[rows] = valid
    return bb[keep].numpy().astype(np.float32), keep.numpy()


def transform_image(params: ViewParams, image: torch.Tensor) -> torch.Tensor:
    """Make the view of a normalised image (float (3, H, W)) -> (3, size, size); padding is 0."""
    if tuple(image.shape[-2:]) != params.orig_size:
        raise ValueError(
            f"image is {tuple(image.shape[-2:])}, the view was planned for {params.orig_size}"
        )
    img = tv_tensors.Image(image)
    img = F.resize(img, list(params.resized_size), antialias=True)
    top, left = params.crop_offset  # in the flipped image when ``flip``
    if params.flip:  # crop the mirrored window, then flip: the same pixels, fewer of them moved
        left = params.resized_size[1] - left - params.canvas
    img = F.crop(img, top, left, params.canvas, params.canvas)
    if params.flip:
        img = F.horizontal_flip(img)
    return img.as_subclass(torch.Tensor)


def normalize(image_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (3, H, W) normalised with the backbone's mean/std."""
    x = F.to_dtype(image_uint8, torch.float32, scale=True)
    return F.normalize(x, list(mean), list(std))


def view_to_image_boxes(params: ViewParams, boxes: np.ndarray, clip: bool = True) -> np.ndarray:
    """Map boxes (N, 4) xyxy in the view's canvas back to original-image pixels (clipped to the image)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    top, left = params.crop_offset
    b[:, [0, 2]] += left
    b[:, [1, 3]] += top
    if params.flip:
        w = params.resized_size[1]
        b[:, [0, 2]] = w - b[:, [2, 0]]
    sy, sx = params.scale
    b[:, [0, 2]] /= sx
    b[:, [1, 3]] /= sy
    if not clip:
        return b.astype(np.float32)
    h0, w0 = params.orig_size
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w0)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h0)
    return b.astype(np.float32)
