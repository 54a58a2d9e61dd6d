"""Pictures of detections (torchvision.utils.draw_segmentation_masks, then draw_bounding_boxes)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from cachedet.data.images import read_image
from cachedet.data.masks import decode_rles

PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe"]


def draw_detections(paths: list[Path], detections: list[dict], out_dir: str) -> list[str]:
    """One PNG per image: masks (COCO RLE ``segmentation``, when present) filled at 45% opacity and boxes,
    coloured by category and labelled 'name score'. Returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    by_image = defaultdict(list)
    for d in detections:
        by_image[d["image_id"]].append(d)
    written = []
    for i, path in enumerate(paths):
        image = read_image(str(path))
        dets = by_image.get(i, [])
        if dets:
            boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]] for d in dets])
            labels = [f"{d.get('category_name', d['category_id'])} {d['score']:.2f}" for d in dets]
            colors = [PALETTE[d["category_id"] % len(PALETTE)] for d in dets]
            with_mask = [k for k, d in enumerate(dets) if "segmentation" in d]
            if with_mask:
                rles = [dets[k]["segmentation"]["counts"].encode() for k in with_mask]
                masks = torch.from_numpy(decode_rles(rles, tuple(image.shape[-2:]))).bool()
                image = draw_segmentation_masks(image, masks, alpha=0.45, colors=[colors[k] for k in with_mask])
            image = draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=2)
        target = os.path.join(out_dir, f"{Path(path).stem}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    return written
