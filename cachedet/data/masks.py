"""Instance masks: from annotations (COCO polygons / RLE) into a view's canvas, and back out as RLE.

A view's masks follow its box rows (``boxes/ann_ids``): the view's own objects, each cut by the
Copy-Paste occluder when the view has one, then the pasted objects. The geometry is the image's:
``mask_to_canvas`` gives exactly what ``torchvision.transforms.v2`` does to a ``tv_tensors.Mask``
(nearest resize, flip, crop; tested pixel for pixel), but gathers only the rows and columns the
object covers, so it costs a fraction of a full-image resize.

Masks travel as pycocotools RLE (canvas-sized, compressed ``counts`` strings): one ``bytes`` blob
per object, decoded to uint8 (N, S, S) for the mask loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.transforms.v2 import functional as F

from cachedet.core.structures import ViewParams


@dataclass(frozen=True)
class MaskSource:
    """One object's annotated mask: ``segmentation`` (polygons, RLE, or None for its box) on an
    image of (height, width); ``pasted`` when Copy-Paste brings it from another image."""

    segmentation: object
    height: int
    width: int
    box: tuple[float, float, float, float]  # xyxy original pixels, the fallback mask
    pasted: bool = False

    def decode(self) -> np.ndarray:
        """uint8 (height, width) mask of the object in its image."""
        return decode_segmentation(self.segmentation, self.height, self.width, self.box)


def decode_segmentation(seg, height: int, width: int, box) -> np.ndarray:
    """uint8 (H, W) from COCO polygons or RLE (compressed or not); None -> the filled box."""
    if seg is None:
        m = np.zeros((height, width), dtype=np.uint8)
        x1, y1, x2, y2 = box
        m[int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))] = 1
        return m
    if isinstance(seg, dict):
        counts = seg["counts"]
        rle = (
            mask_utils.frPyObjects(seg, height, width)
            if isinstance(counts, list)
            else {
                "size": seg["size"],
                "counts": counts.encode() if isinstance(counts, str) else counts,
            }
        )
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    m = mask_utils.decode(rle)
    if m.shape != (height, width):  # an RLE made for another image size
        m = F.resize(
            torch.from_numpy(m)[None], [height, width], interpolation=F.InterpolationMode.NEAREST
        )[0].numpy()
    return m


def nearest_source_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of every output pixel of a nearest resize, as PyTorch computes it
    (``floor(i * in / out)`` in float32; exact copies for 1x and 2x)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(
        np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1
    )


def mask_to_canvas(params: ViewParams, mask: np.ndarray) -> np.ndarray:
    """uint8/bool (H, W) mask of the original image -> bool (S, S) mask of the view.

    Equal to resize (nearest) -> horizontal flip -> crop of ``tv_tensors.Mask`` with
    ``torchvision.transforms.v2.functional``; pixels outside the resized image are False.
    """
    s = params.canvas
    out = np.zeros((s, s), dtype=bool)
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(ys):
        return out
    top, left = params.crop_offset
    rows = nearest_source_index(params.resized_size[0], mask.shape[0])[top : top + s]
    cols = nearest_source_index(params.resized_size[1], mask.shape[1])
    if params.flip:
        cols = cols[::-1]
    cols = cols[left : left + s]
    ry = np.flatnonzero((rows >= ys[0]) & (rows <= ys[-1]))
    cx = np.flatnonzero((cols >= xs[0]) & (cols <= xs[-1]))
    if len(ry) and len(cx):  # only the object's rows and columns are gathered
        y0, y1, x0, x1 = ry[0], ry[-1] + 1, cx[0], cx[-1] + 1
        out[y0:y1, x0:x1] = mask[np.ix_(rows[y0:y1], cols[x0:x1])] != 0
    return out


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight xyxy box (pixel edges) of a bool mask; None when it is empty."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(ys):
        return None
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=np.float32)


def view_masks(params: ViewParams, sources: tuple[MaskSource, ...], paste=None) -> list[np.ndarray]:
    """bool (S, S) masks of a view's objects, in box-row order.

    ``paste`` (a ``PastePlan`` or None): own objects lose the pixels the paste covers, pasted
    objects are moved with the paste's own source view.
    """
    occluder = paste.mask().numpy() if paste is not None else None
    out = []
    for src in sources:
        if src.pasted:
            out.append(mask_to_canvas(paste.source_view, src.decode()))
        else:
            m = mask_to_canvas(params, src.decode())
            out.append(m & ~occluder if occluder is not None else m)
    return out


def encode_rle(mask: np.ndarray) -> bytes:
    """bool (H, W) -> compressed COCO RLE counts (ASCII bytes)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def decode_rles(blobs: list[bytes], size: tuple[int, int]) -> np.ndarray:
    """Compressed COCO RLE counts of one size (H, W) -> uint8 (N, H, W)."""
    if not blobs:
        return np.zeros((0, *size), dtype=np.uint8)
    rles = [{"size": list(size), "counts": b} for b in blobs]
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


def rle_json(mask: np.ndarray) -> dict:
    """bool (H, W) -> a COCO results ``segmentation``: {"size": [H, W], "counts": str}."""
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": encode_rle(mask).decode()}


def mask_source(record, i: int, pasted: bool = False) -> MaskSource:
    """The ``MaskSource`` of an ``ImageRecord``'s i-th kept object."""
    seg = record.segmentations[i] if i < len(record.segmentations) else None
    return MaskSource(
        seg, record.height, record.width, tuple(float(v) for v in record.boxes[i]), pasted
    )


def mask_sources(dataset, plan, start: int, end: int) -> tuple[tuple[MaskSource, ...], ...]:
    """Per view in [start, end) of ``plan`` (extraction's ViewPlan: ``views[v].image_id`` and
    ``boxes["offsets"/"ann_ids"]``): the annotated mask of each of its box rows of ``dataset``
    (a DetectionDataset; own objects, then pasted ones)."""
    where = dataset.annotation_rows()
    out = []
    for v in range(start, end):
        a, b = plan.boxes["offsets"][v], plan.boxes["offsets"][v + 1]
        own = plan.views[v].image_id
        rows = []
        for ann_id in plan.boxes["ann_ids"][a:b].tolist():
            rec, i = where[ann_id]
            rows.append(mask_source(rec, i, pasted=rec.id != own))
        out.append(tuple(rows))
    return tuple(out)
