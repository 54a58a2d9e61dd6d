"""What ``cachedet predict`` does to an image before the model, in numpy and Pillow only.

This file imports neither torch nor cachedet: ``cachedet export`` copies it beside the exported model
as ``cachedet_preprocess.py``, so a runtime without torch feeds the graph what ``predict`` feeds the
model (equal within float32 rounding; tested against ``cachedet.tools.export.prepare_image``).
``cachedet.data.decode`` takes its RGB rules (``to_rgb``) from here, so both read pixels alike::

    import json, onnxruntime
    from cachedet_preprocess import image_boxes, load_image, preprocess

    meta = json.load(open("model.json"))                   # written beside model.onnx
    x, view = preprocess(load_image("photo.jpg"), meta)    # float32 (1, 3, S, S)
    session = onnxruntime.InferenceSession("model.onnx")
    boxes, scores, labels = session.run(None, {"image": x})
    boxes, keep = image_boxes(boxes, view)                  # xyxy pixels of the upright photo
    ids = [meta["category_ids"][i] for i in labels[keep]]

The steps (S = ``meta["canvas"]``, mean/std = ``meta["preprocess"]``, per RGB channel):

1. read: EXIF orientation applied (``ImageOps.exif_transpose``), then any Pillow mode to 8-bit RGB
   (``to_rgb``): high-bit-depth integers scaled by their bit depth (the smallest of 8, 10, 12, 14, 16,
   24 or 32 bits that holds the largest value), floats in [0, 1] by 255, transparency composited over
   ``TRANSPARENT_FILL``, every other mode through Pillow's ``convert("RGB")``.
2. normalise, in float32: ``pixel * float32(1 / 255)``, minus mean, divided by std.
3. resize: ``scale = S / max(H, W)``; the size is ``(max(1, round(H * scale)), max(1, round(W * scale)))``
   with Python's ``round`` (halves to even); the normalised float32 image is resampled with the
   antialiased bilinear (triangle) filter, widths first, then heights (``resize``): the weights of
   torch's ``interpolate(..., mode="bilinear", antialias=True)``, which ``predict`` uses, computed in
   float32 as torch computes them. Pillow's bilinear resize of a mode ``F`` image has the same filter
   in float64 and lands up to about 2e-5 away; resizing the uint8 image first and normalising after
   is about 0.017 away, enough to move boxes.
4. pad: a float32 (3, S, S) canvas of zeros (zero after normalisation) with the image at the top-left.

Boxes come back in canvas pixels; ``image_boxes`` divides x by ``w / W`` and y by ``h / H``, clips them
to the image and marks those left with an area.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

TRANSPARENT_FILL = (124, 116, 104)  # ImageNet mean (0.485, 0.456, 0.406) x 255
BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
EXIF_ORIENTATION = 0x0112


def bit_depth_scale(values: np.ndarray) -> float:
    """255 / (2**bits - 1) for the smallest bit depth in ``BIT_DEPTHS`` that holds ``values.max()``."""
    top = float(values.max()) if values.size else 0.0
    for bits in BIT_DEPTHS:
        if top <= 2**bits - 1:
            return 255.0 / (2**bits - 1)
    return 255.0 / top


def _scaled_gray(pil: Image.Image) -> Image.Image:
    """An ``I;16*`` / ``I`` / ``F`` image as 8-bit ``L``, scaled by its bit depth (floats in [0, 1] by 255)."""
    values = np.asarray(pil).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    scale = 255.0 if pil.mode == "F" and values.max(initial=0) <= 1.0 else bit_depth_scale(values)
    return Image.fromarray((values * scale).round().clip(0, 255).astype(np.uint8), mode="L")


def _has_alpha(pil: Image.Image) -> bool:
    return pil.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        pil.mode in ("P", "L", "RGB") and "transparency" in pil.info
    )


def to_rgb(pil: Image.Image) -> Image.Image:
    """Any Pillow mode -> ``RGB`` (step 1 of the module docstring)."""
    if pil.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _scaled_gray(pil).convert("RGB")
    if _has_alpha(pil):
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENT_FILL + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def upright_rgb(pil: Image.Image) -> np.ndarray:
    """An open Pillow image -> uint8 (H, W, 3) RGB, EXIF orientation applied (step 1)."""
    orientation = int(pil.getexif().get(EXIF_ORIENTATION, 1) or 1)
    return np.asarray(to_rgb(ImageOps.exif_transpose(pil) if orientation != 1 else pil))


def load_image(path: str) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) upright RGB, as ``cachedet``'s reader gives it (step 1).
    Pillow's own errors and size guard apply (``cachedet`` raises its pixel limit to 2**30)."""
    with Image.open(path) as pil:
        return upright_rgb(pil)


def resized_size(height: int, width: int, canvas: int) -> tuple[int, int]:
    """(h, w) of an image of (height, width) pixels fitted into a canvas x canvas square (step 3)."""
    scale = canvas / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _filter_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(source indices int64 (n_out, K), weights float32 (n_out, K)) of the antialiased bilinear
    resampling of one axis from n_in to n_out samples, computed as torch's CPU kernel does
    (``_compute_weights_aa`` in ATen's UpSampleKernel.cpp, align_corners=False), in float32."""
    scale = np.float32(n_in / n_out)
    support = scale if scale >= 1.0 else np.float32(1.0)
    invscale = np.float32(1.0 / float(scale)) if scale >= 1.0 else np.float32(1.0)
    center = scale * (np.arange(n_out) + 0.5).astype(np.float32)
    first = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    last = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), n_in)
    taps = np.arange(int((last - first).max()))
    index = first[:, None] + taps[None, :]
    offset = (index.astype(np.float32) - center[:, None]).astype(np.float64) + 0.5
    weights = np.maximum(np.float32(1.0) - np.abs((offset * invscale).astype(np.float32)), 0)
    weights = np.where(index < last[:, None], weights, np.float32(0.0)).astype(np.float32)
    total = np.zeros(n_out, dtype=np.float32)
    for t in taps:  # torch sums tap by tap
        total += weights[:, t]
    weights = np.where(total[:, None] != 0, weights / np.where(total == 0, 1, total)[:, None], 0)
    return np.minimum(index, n_in - 1), weights.astype(np.float32)


def resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """float32 array resampled to ``size`` samples along ``axis`` (step 3); unchanged when equal."""
    if x.shape[axis] == size:
        return x
    index, weights = _filter_taps(x.shape[axis], size)
    x = np.moveaxis(x, axis, -1)
    out = x[..., index[:, 0]] * weights[:, 0]
    for t in range(1, index.shape[1]):  # in torch's order, so float32 rounding matches
        out += x[..., index[:, t]] * weights[:, t]
    return np.moveaxis(out, -1, axis)


def resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (C, H, W) -> (C, height, width), antialiased bilinear as ``predict`` (step 3)."""
    return resize_axis(resize_axis(x, width, 2), height, 1)


def preprocess(rgb: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
    """uint8 (H, W, 3) RGB -> (float32 (1, 3, S, S) graph input, the view for ``image_boxes``).

    meta: the export's metadata (``canvas`` and ``preprocess.mean`` / ``preprocess.std``). The view is
    ``{"orig_size": (H, W), "resized_size": (h, w)}``. Raises ValueError for another array shape.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB array, got {rgb.dtype} {rgb.shape}")
    size = int(meta["canvas"])
    mean = np.asarray(meta["preprocess"]["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(meta["preprocess"]["std"], dtype=np.float32)[:, None, None]
    x = rgb.transpose(2, 0, 1).astype(np.float32) * np.float32(1.0 / 255)
    h, w = resized_size(rgb.shape[0], rgb.shape[1], size)
    x = resize((x - mean) / std, h, w)
    out = np.zeros((1, 3, size, size), dtype=np.float32)
    out[0, :, : min(h, size), : min(w, size)] = x[:, :size, :size]
    return out, {"orig_size": (rgb.shape[0], rgb.shape[1]), "resized_size": (h, w)}


def image_boxes(boxes: np.ndarray, view: dict) -> tuple[np.ndarray, np.ndarray]:
    """Canvas boxes (N, 4) xyxy -> (float32 (N, 4) xyxy pixels of the original image, clipped to it;
    bool (N,) the boxes left with an area). ``view`` from ``preprocess``."""
    (h0, w0), (h, w) = view["orig_size"], view["resized_size"]
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = (b[:, [0, 2]] / (w / w0)).clip(0, w0)
    b[:, [1, 3]] = (b[:, [1, 3]] / (h / h0)).clip(0, h0)
    b = b.astype(np.float32)
    return b, (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
