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
