"""Copy-Paste (Ghiasi et al., CVPR 2021) planned from annotations, applied at extraction.

For a view chosen with probability ``copy_paste``, another image of the dataset is jittered with
its own LSJ draw onto the same canvas and a random subset of its objects is pasted over the view,
through their instance masks (COCO polygons or RLE) or, for box-only annotations, their boxes.
Objects of the view that the paste covers are shrunk to their visible part, or lose their box
when less than ``paste_min_visible`` of them stays visible.

Everything is decided from the annotations and (seed, image id, view index), so the driver plans
every view's boxes before any pixel is read, and a shard writer reproduces the same paste mask.
Masks are moved into the canvas with the image's geometry (``cachedet.data.masks.mask_to_canvas``,
pixel-equal to ``tv_tensors.Mask`` through ``torchvision.transforms.v2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils

from cachedet.core.structures import ViewParams
from cachedet.data.coco import DetectionDataset, ImageRecord
from cachedet.data.masks import mask_box, mask_source, mask_to_canvas
from cachedet.data.views import AugmentConfig, plan_view

PASTE_STREAM = 0xC0FFEE  # keeps Copy-Paste's random draws apart from the view's own LSJ draw


@dataclass(frozen=True)
class PastePlan:
    """What a shard writer needs to composite a paste: the source image, its view, the mask."""

    source_image_id: int
    source_path: str
    source_view: ViewParams
    mask_rle: dict  # union of the pasted objects' canvas masks, pycocotools RLE (counts as str)

    def mask(self) -> torch.Tensor:
        """bool (S, S): where the pasted pixels replace the view's."""
        rle = {"size": self.mask_rle["size"], "counts": self.mask_rle["counts"].encode()}
        return torch.from_numpy(mask_utils.decode(rle).astype(bool))


def instance_mask(record: ImageRecord, i: int) -> np.ndarray:
    """uint8 (H, W) mask of the record's i-th kept object: its segmentation, else its box."""
    return mask_source(record, i).decode()


def plan_copy_paste(
    cfg: AugmentConfig,
    dataset: DetectionDataset,
    index: int,
    params: ViewParams,
    boxes: np.ndarray,
    labels: np.ndarray,
    ann_ids: np.ndarray,
) -> tuple[PastePlan | None, np.ndarray, np.ndarray, np.ndarray]:
    """Decide the paste of one view and return (plan or None, boxes, labels, ann_ids) after it.

    ``boxes`` (N, 4) xyxy canvas pixels, ``labels`` and ``ann_ids`` are the view's own objects
    (``transform_boxes`` output). Pasted objects are appended after them.
    """
    rng = np.random.default_rng([cfg.seed, params.image_id, params.view_index, PASTE_STREAM])
    if len(dataset.images) < 2 or rng.random() >= cfg.copy_paste:
        return None, boxes, labels, ann_ids
    others = [j for j in range(len(dataset.images)) if j != index]
    source = dataset.images[others[int(rng.integers(len(others)))]]
    if not len(source.labels):
        return None, boxes, labels, ann_ids
    chosen = np.flatnonzero(rng.random(len(source.labels)) < 0.5)
    if not len(chosen):
        chosen = np.array([int(rng.integers(len(source.labels)))])
    source_view = plan_view(cfg, source.id, params.view_index, source.height, source.width, rng=rng)

    paste = np.zeros((cfg.size, cfg.size), dtype=bool)
    pasted_boxes, pasted_labels, pasted_ids = [], [], []
    for j in chosen.tolist():
        m = mask_to_canvas(source_view, instance_mask(source, j))
        box = mask_box(m)
        if box is None or min(box[2] - box[0], box[3] - box[1]) < 1:
            continue  # the source's own jitter cropped it away
        paste |= m
        pasted_boxes.append(box)
        pasted_labels.append(source.labels[j])
        pasted_ids.append(source.ann_ids[j])
    if not pasted_boxes:
        return None, boxes, labels, ann_ids

    keep, new_boxes = [], []
    rows = dataset.annotation_rows()
    for b, a in zip(boxes, ann_ids.tolist()):
        own = mask_to_canvas(params, instance_mask(*rows[a]))
        area = own.sum()
        visible = own & ~paste
        if (
            area == 0 or visible.sum() == area
        ):  # untouched (or too small to rasterise): box unchanged
            keep.append(True)
            new_boxes.append(b)
        elif visible.sum() >= cfg.paste_min_visible * area:
            keep.append(True)
            new_boxes.append(mask_box(visible))
        else:
            keep.append(False)
    keep = np.asarray(keep, dtype=bool)
    out_boxes = np.concatenate(
        [np.asarray(new_boxes, dtype=np.float32).reshape(-1, 4), np.stack(pasted_boxes)]
    )
    out_labels = np.concatenate([labels[keep], np.asarray(pasted_labels, dtype=np.int64)])
    out_ids = np.concatenate([ann_ids[keep], np.asarray(pasted_ids, dtype=np.int64)])
    rle = mask_utils.encode(np.asfortranarray(paste.astype(np.uint8)))
    plan = PastePlan(
        source_image_id=source.id,
        source_path=dataset.image_path(source),
        source_view=source_view,
        mask_rle={"size": list(rle["size"]), "counts": rle["counts"].decode()},
    )
    return plan, out_boxes, out_labels, out_ids


def composite(view: torch.Tensor, source_view: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste: float (3, S, S) view, float (3, S, S) source view, bool (S, S) mask -> (3, S, S)."""
    return torch.where(mask[None], source_view, view)
