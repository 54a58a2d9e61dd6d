"""A small, deterministic, offline detection dataset in COCO format (for the demo and tests).

Objects are coloured shapes (squares, discs, triangles, crosses, rings, bars...) on textured
backgrounds, with varied sizes and a long-tailed class frequency, so that frequent / common /
rare reports mean something. Every object carries an exact polygon segmentation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

# name, shape, colour (RGB), relative frequency (long-tailed), LVIS-style frequency bucket
CLASSES = (
    ("red_square", "square", (220, 40, 40), 30, "f"),
    ("blue_disc", "disc", (40, 80, 220), 22, "f"),
    ("green_triangle", "triangle", (40, 180, 60), 14, "c"),
    ("yellow_cross", "cross", (230, 210, 40), 9, "c"),
    ("purple_ring", "ring", (150, 50, 190), 5, "c"),
    ("orange_bar", "bar", (245, 140, 20), 3, "r"),
    ("cyan_diamond", "diamond", (30, 200, 210), 2, "r"),
    ("white_star", "star", (245, 245, 245), 1, "r"),
)


@dataclass(frozen=True)
class SyntheticSpec:
    num_train: int = 160
    num_val: int = 40
    min_side: int = 160
    max_side: int = 320
    max_objects: int = 6
    seed: int = 0


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n, radius, phase=0.0):
        return [
            (
                cx + radius * math.cos(phase + angle + 2 * math.pi * k / n),
                cy + radius * math.sin(phase + angle + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape in ("disc", "ring"):
        return ring(32, r)
    if shape == "square":
        return ring(4, r * 1.3, math.pi / 4)
    if shape == "triangle":
        return ring(3, r * 1.2, -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r * 1.3), (cx + r * 0.8, cy), (cx, cy + r * 1.3), (cx - r * 0.8, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r * (1.2 if k % 2 == 0 else 0.5)
            a = angle - math.pi / 2 + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "bar":
        return [
            (cx - r * 1.4, cy - r * 0.4),
            (cx + r * 1.4, cy - r * 0.4),
            (cx + r * 1.4, cy + r * 0.4),
            (cx - r * 1.4, cy + r * 0.4),
        ]
    if shape == "cross":
        a, b = r * 1.2, r * 0.4
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    raise ValueError(shape)


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Smooth colour gradient + blurred noise + stripes: a texture, not a flat colour."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    grad = rng.uniform(-60, 60, size=(3, 2))
    img = np.stack([base[c] + grad[c, 0] * yy / h + grad[c, 1] * xx / w for c in range(3)], -1)
    period, phase, theta = rng.uniform(8, 40), rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)
    img += (
        18
        * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + phase)[
            ..., None
        ]
    )
    noise = Image.fromarray(rng.uniform(0, 255, size=(h, w, 3)).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1.5)
    )
    img = 0.8 * img + 0.2 * np.asarray(noise, dtype=np.float32)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _make_split(
    spec: SyntheticSpec, split: str, n: int, out_dir: str, first_image_id: int, ann_id: list[int]
) -> dict:
    rng = np.random.default_rng([spec.seed, {"train": 0, "val": 1}[split]])
    weights = np.array([c[3] for c in CLASSES], dtype=np.float64)
    weights /= weights.sum()
    images, annotations = [], []
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    for k in range(n):
        h, w = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
        img = _background(rng, h, w)
        draw = ImageDraw.Draw(img)
        image_id = first_image_id + k
        for _ in range(int(rng.integers(1, spec.max_objects + 1))):
            label = int(rng.choice(len(CLASSES), p=weights))
            name, shape, colour, _, _ = CLASSES[label]
            r = float(min(h, w) * rng.uniform(0.05, 0.3))  # small, medium and large objects
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            poly = _polygon(
                shape,
                cx,
                cy,
                r,
                float(rng.uniform(0, 2 * math.pi))
                if shape in ("square", "triangle", "star")
                else 0.0,
            )
            shade = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
            draw.polygon(poly, fill=shade)
            if (
                shape == "ring"
            ):  # a hole in the same place for image and mask is not needed; keep it filled
                draw.ellipse(
                    [cx - r * 0.45, cy - r * 0.45, cx + r * 0.45, cy + r * 0.45],
                    fill=tuple(c // 2 for c in shade),
                )
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            x1, y1 = max(0.0, min(xs)), max(0.0, min(ys))
            x2, y2 = min(float(w), max(xs)), min(float(h), max(ys))
            ann_id[0] += 1
            segmentation = [
                [round(v, 2) for p in poly for v in (min(max(p[0], 0), w), min(max(p[1], 0), h))]
            ]
            annotations.append(
                {
                    "id": ann_id[0],
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "area": float(
                        mask_utils.area(
                            mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
                        )
                    ),  # as COCO: mask area
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
        file_name = f"{split}/{image_id:06d}.png"
        img.save(os.path.join(out_dir, file_name))
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
    categories = [
        {"id": i + 1, "name": c[0], "supercategory": "shape"} for i, c in enumerate(CLASSES)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_synthetic_dataset(out_dir: str, spec: SyntheticSpec = SyntheticSpec()) -> dict[str, str]:
    """Write ``train.json``, ``val.json`` and the images under ``out_dir``; return their paths.

    File names in the JSON are relative to ``out_dir`` (pass it as the images directory).
    """
    os.makedirs(out_dir, exist_ok=True)
    ann_id = [0]
    paths = {}
    for split, n, first in (("train", spec.num_train, 1), ("val", spec.num_val, 100_000)):
        data = _make_split(spec, split, n, out_dir, first, ann_id)
        path = os.path.join(out_dir, f"{split}.json")
        with open(path, "w") as f:
            json.dump(data, f)
        paths[split] = path
    paths["images"] = out_dir
    return paths


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "demo_data"
    written = make_synthetic_dataset(target)
    print(f"wrote {written['train']}, {written['val']} and their images under {written['images']}")
