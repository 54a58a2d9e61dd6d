"""Feature-space crops: a backbone-free augmentation of cached views at training time.

Each batch gets one crop size (side = f x canvas, f ~ U(min_fraction, 1), whole cells of the
coarsest stride) and each view its own offset, also in whole coarsest-stride cells, so every
level is cut at the same image-space window. Boxes are shifted by the offset, clipped to the
window, and dropped when thinner than one pixel.

This is an approximation of cropping the image: a convnet is translation-equivariant only in its
interior. Near the window's border the cached features still hold what the backbone computed
from pixels outside the window (receptive fields reach past it), and the zero padding that a
real crop would put at the border never reached the backbone. Cropping cached features is
therefore closest to a crop of a larger image, not to a smaller image.
"""

from __future__ import annotations

import numpy as np
import torch

from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec


def check_alignment(specs: list[FeatureSpec], shapes: dict[str, tuple[int, int, int]]) -> int:
    """The coarsest stride, after checking that every level tiles the same canvas exactly."""
    coarse = max(specs, key=lambda s: s.stride)
    ch, cw = shapes[coarse.name][1:]
    for s in specs:
        f = coarse.stride // s.stride
        if coarse.stride % s.stride or tuple(shapes[s.name][1:]) != (ch * f, cw * f):
            raise CachedetError(
                f"source.feature_crop: level {s.name} is {shapes[s.name][1]}x{shapes[s.name][2]}, not {f}x the coarsest "
                f"level's {ch}x{cw}; extract with a canvas (augment.size) that is a multiple of {coarse.stride}"
            )
    return coarse.stride


def crop_batch(
    batch: dict, specs: list[FeatureSpec], min_fraction: float, rng: np.random.Generator
) -> dict:
    """Crop a collated batch (inputs {level: (B, C, H, W)}, targets [{boxes (N, 4) xyxy, labels[, masks]}]).

    Returns the batch with cropped inputs, shifted targets and ``image_sizes`` [(h, w)] in pixels.
    """
    coarse = max(specs, key=lambda s: s.stride)
    stride = coarse.stride
    n, _, gh, gw = batch["inputs"][coarse.name].shape
    side = float(rng.uniform(min_fraction, 1.0))
    ch, cw = max(1, round(side * gh)), max(1, round(side * gw))
    oy = rng.integers(0, gh - ch + 1, size=n)
    ox = rng.integers(0, gw - cw + 1, size=n)
    inputs = {}
    for s in specs:
        f = stride // s.stride
        x = batch["inputs"][s.name]
        inputs[s.name] = torch.stack(
            [x[i, :, oy[i] * f : (oy[i] + ch) * f, ox[i] * f : (ox[i] + cw) * f] for i in range(n)]
        )
    h, w = ch * stride, cw * stride
    targets = []
    for i, t in enumerate(batch["targets"]):
        b = t["boxes"].clone()
        b[:, [0, 2]] = (b[:, [0, 2]] - float(ox[i] * stride)).clamp(0, w)
        b[:, [1, 3]] = (b[:, [1, 3]] - float(oy[i] * stride)).clamp(0, h)
        keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
        cropped = {**t, "boxes": b[keep], "labels": t["labels"][keep]}
        if "masks" in t:  # canvas masks (N, S, S) cut at the same window
            y0, x0 = int(oy[i] * stride), int(ox[i] * stride)
            cropped["masks"] = t["masks"][keep][:, y0 : y0 + h, x0 : x0 + w]
        targets.append(cropped)
    return {
        **batch,
        "inputs": inputs,
        "targets": targets,
        "image_sizes": [(h, w)] * n,
        "crop_offsets": [(int(oy[i] * stride), int(ox[i] * stride)) for i in range(n)],
    }
