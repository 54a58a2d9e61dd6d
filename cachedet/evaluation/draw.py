"""Pictures of detections that people can read.

Each class gets one colour from a fixed palette by its class index (its place in the run's category
list, not its dataset id), masks are filled at 40% opacity with a solid outline, boxes carry a
'name score' label on a filled background kept inside the image, and a legend panel on the right
lists the classes drawn with their counts.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_segmentation_masks

from cachedet.data.images import read_image
from cachedet.data.masks import decode_rles

# Sasha Trubetskoy's 20 distinct colours (most distinct first), as RGB
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 225, 25),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
    (0, 0, 0),
]


def class_color(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (0-based place in the category list); the palette repeats after 20."""
    return PALETTE[index % len(PALETTE)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _text_color(rgb) -> tuple[int, int, int]:
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (255, 255, 255)


def mask_outlines(masks: torch.Tensor, width: int = 1) -> torch.Tensor:
    """bool (N, H, W) masks -> bool (N, H, W) of their boundary pixels (the mask minus its erosion)."""
    x = masks.float().unsqueeze(1)
    eroded = -torch.nn.functional.max_pool2d(-x, 2 * width + 1, stride=1, padding=width)
    return (x > 0.5).squeeze(1) & (eroded < 0.5).squeeze(1)


def _draw_masks(image: torch.Tensor, dets: list[dict], colors: list) -> torch.Tensor:
    with_mask = [k for k, d in enumerate(dets) if "segmentation" in d]
    if not with_mask:
        return image
    rles = [dets[k]["segmentation"]["counts"].encode() for k in with_mask]
    masks = torch.from_numpy(decode_rles(rles, tuple(image.shape[-2:]))).bool()
    image = draw_segmentation_masks(image, masks, alpha=0.4, colors=[colors[k] for k in with_mask])
    edges = mask_outlines(masks, width=max(1, min(image.shape[-2:]) // 300))
    for k, edge in zip(with_mask, edges):
        image[:, edge] = torch.tensor(colors[k], dtype=image.dtype).view(3, 1)
    return image


def _draw_boxes(
    canvas: Image.Image, dets: list[dict], colors: list, labels: list[str], font, line: int
) -> None:
    draw = ImageDraw.Draw(canvas)
    W, H = canvas.size
    for d, color, label in zip(dets, colors, labels):
        x, y, w, h = d["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=color, width=line)
    for d, color, label in zip(dets, colors, labels):  # labels last, over every box
        x, y, w, h = d["bbox"]
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        tx = min(max(0, x), max(0, W - tw))
        ty = (
            y - th if y - th >= 0 else min(max(0, y), max(0, H - th))
        )  # above the box, else inside it
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        draw.text((tx + 2 - left, ty + 2 - top), label, fill=_text_color(color), font=font)


def _legend(canvas: Image.Image, entries: list[tuple[str, tuple, int]], font) -> Image.Image:
    """The picture with a white panel on its right: a swatch, the class name and its count per entry."""
    probe = ImageDraw.Draw(canvas)
    rows = [f"{name} ({n})" for name, _, n in entries] or ["no detections"]
    line_h = max(probe.textbbox((0, 0), r, font=font)[3] for r in rows) + 6
    text_w = max(probe.textlength(r, font=font) for r in rows)
    swatch = line_h - 6
    width = int(text_w + swatch + 24)
    out = Image.new(
        "RGB", (canvas.width + width, max(canvas.height, line_h * len(rows) + 12)), "white"
    )
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        y = 6 + i * line_h
        if entries:
            draw.rectangle(
                [canvas.width + 8, y, canvas.width + 8 + swatch, y + swatch], fill=entries[i][1]
            )
        draw.text((canvas.width + 16 + swatch, y), row, fill=(0, 0, 0), font=font)
    return out


def draw_detections(
    paths: list[Path],
    detections: list[dict],
    out_dir: str,
    category_ids: list[int] | None = None,
    names: list[str] | None = None,
) -> list[str]:
    """One PNG per image in ``out_dir`` (named after the image): masks (COCO RLE ``segmentation``, when
    present) with outlines, boxes (``bbox`` [x, y, w, h] image pixels) labelled '``category_name``
    score', and a legend. ``detections[i]["image_id"]`` is the index of its image in ``paths``;
    ``category_ids``: the run's category ids in label order (colour = place in it; default: sorted ids
    seen); ``names``: each image's name relative to its input folder, mirrored under ``out_dir`` (default:
    the file name); a name drawn twice gets a ``-2``, ``-3`` ... suffix. Returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    image_names = names
    order = (
        list(category_ids)
        if category_ids is not None
        else sorted({d["category_id"] for d in detections})
    )
    index = {cid: i for i, cid in enumerate(order)}
    by_image = defaultdict(list)
    for d in detections:
        by_image[d["image_id"]].append(d)
    written = []
    for i, path in enumerate(paths):
        image = read_image(str(path))
        dets = sorted(by_image.get(i, []), key=lambda d: d["score"])  # best drawn last, on top
        classes = [index.get(d["category_id"], len(order)) for d in dets]
        colors = [class_color(k) for k in classes]
        names = [str(d.get("category_name", d["category_id"])) for d in dets]
        image = _draw_masks(image, dets, colors)
        canvas = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        font = _font(max(11, min(canvas.size) // 40))
        _draw_boxes(
            canvas,
            dets,
            colors,
            [f"{n} {d['score']:.2f}" for n, d in zip(names, dets)],
            font,
            line=max(2, min(canvas.size) // 250),
        )
        counts = Counter(zip(classes, names))
        entries = [(name, class_color(k), n) for (k, name), n in sorted(counts.items())]
        stem = os.path.splitext(image_names[i] if image_names else Path(path).name)[0]
        target, n = os.path.join(out_dir, f"{stem}.png"), 1
        while target in written:
            n += 1
            target = os.path.join(out_dir, f"{stem}-{n}.png")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _legend(canvas, entries, font).save(target)
        written.append(target)
    return written
