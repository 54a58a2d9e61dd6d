"""Online views: decode and augment images at training time (fresh LSJ draw every epoch).

Epoch e uses view index e of every image, so the online regime never repeats a view, and its
first K epochs see exactly the K views that ``extract --views K`` caches (same plan, same seed).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from cachedet.core.errors import CachedetError
from cachedet.core.structures import targets_of
from cachedet.data.coco import DetectionDataset
from cachedet.data.images import read_image
from cachedet.data.masks import mask_source, view_masks
from cachedet.data.views import (
    AugmentConfig,
    normalize,
    plan_view,
    transform_boxes,
    transform_image,
)


class OnlineViews(Dataset):
    """Items: dict(image float32 (3, S, S) normalised, boxes (N, 4) xyxy, labels (N,), view=image index),
    and with ``masks`` masks uint8 (N, S, S) moved with the image."""

    def __init__(
        self, dataset: DetectionDataset, augment: AugmentConfig, mean, std, masks: bool = False
    ):
        self.dataset, self.augment, self.masks = dataset, augment, masks
        self.mean, self.std = tuple(mean), tuple(std)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset.images)

    def __getitem__(self, i: int) -> dict:
        rec = self.dataset.images[i]
        params = plan_view(
            self.augment, rec.id, self.epoch if self.augment.augment else 0, rec.height, rec.width
        )
        image = read_image(self.dataset.image_path(rec), (rec.height, rec.width))
        boxes, labels, ann_ids = transform_boxes(params, rec.boxes, rec.labels, rec.ann_ids)
        item = {
            "image": transform_image(params, normalize(image, self.mean, self.std)),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "view": i,
        }
        if self.masks:
            rows = self.dataset.annotation_rows()
            masks = view_masks(params, tuple(mask_source(*rows[a]) for a in ann_ids.tolist()))
            item["masks"] = torch.from_numpy(
                np.stack(masks).astype(np.uint8)
                if masks
                else np.zeros((0, params.canvas, params.canvas), dtype=np.uint8)
            )
        return item


def rank_indices(n: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """A shuffled, disjoint share of range(n) for one rank in one epoch."""
    order = np.random.default_rng([seed, epoch, 23]).permutation(n)
    return order[rank::world].tolist()


def collate_images(samples: list[dict]) -> dict:
    if not samples:
        raise CachedetError("empty batch")
    return {
        "inputs": torch.stack([s["image"] for s in samples]),
        "targets": targets_of(samples),
        "views": [s["view"] for s in samples],
    }
