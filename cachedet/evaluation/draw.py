"""Pictures of detections (torchvision.utils.draw_bounding_boxes)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from cachedet.data.images import read_image

PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe"]


def draw_detections(paths: list[Path], detections: list[dict], out_dir: str) -> list[str]:
    """One PNG per image: boxes coloured by category, labelled 'name score'. Returns the files written."""
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
            image = draw_bounding_boxes(image, boxes, labels=labels, colors=colors, width=2)
        target = os.path.join(out_dir, f"{Path(path).stem}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    return written
