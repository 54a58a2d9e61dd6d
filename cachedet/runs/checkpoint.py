"""Checkpoints written atomically (temp file + fsync + rename): a reader sees old or new, never half.

Every checkpoint carries ``checksum``: CRC-32C (``google_crc32c``) over its tensors (dtype, shape,
bytes, in key order) and its other entries; ``load_checkpoint`` recomputes it, so a bit flipped in
the file is refused instead of loading a wrong weight. Weights that are NaN or infinite are
refused on write (the previous checkpoint stays) and on load. Checkpoints written before checksums
load unchecked.
"""

from __future__ import annotations

import json
import math
import os

import google_crc32c
import torch

from cachedet.core.atomic import save_torch_atomic
from cachedet.core.errors import CachedetError

CHECKPOINT_FORMAT = "cachedet.run"
WEIGHTS = ("detector", "backbone")  # entries of ckpt["state"] that hold the model's weights


def _walk(obj, crc: int) -> int:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        crc = google_crc32c.extend(crc, f"{t.dtype}{tuple(t.shape)}".encode())
        return google_crc32c.extend(crc, t.view(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            crc = _walk(obj[key], google_crc32c.extend(crc, repr(key).encode()))
        return crc
    if isinstance(obj, list | tuple):
        for item in obj:
            crc = _walk(item, crc)
        return google_crc32c.extend(crc, f"[{len(obj)}]".encode())
    return google_crc32c.extend(crc, json.dumps(obj, default=repr).encode())


def checksum(ckpt: dict) -> str:
    """CRC-32C (hex) of a checkpoint's entries other than ``checksum`` itself."""
    return f"{_walk({k: v for k, v in ckpt.items() if k != 'checksum'}, 0):08x}"


def non_finite_weight(ckpt: dict) -> str | None:
    """The name of the first weight (``detector.<param>``) holding NaN or inf, or None."""
    state = ckpt.get("state") or {}
    for part in WEIGHTS:
        for name, t in (state.get(part) or {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                if not math.isfinite(float(t.float().abs().max())):
                    return f"{part}.{name}"
    return None


def save_atomic(obj: dict, path: str):
    """Write checkpoint ``obj`` with its ``checksum``; refuse (CachedetError, the previous file
    intact) when a weight is NaN or infinite. Raises WriteError when the disk is full."""
    bad = non_finite_weight(obj)
    if bad is not None:
        raise CachedetError(
            f"{path}: not written: weight {bad} became NaN or infinite (step {obj.get('step')}); "
            "the previous checkpoint is kept; lower optim.lr or raise optim.warmup_steps"
        )
    save_torch_atomic({**obj, "checksum": checksum(obj)}, path)


def load_checkpoint(path: str) -> dict:
    """A cachedet checkpoint, its checksum verified and its weights finite; CachedetError otherwise."""
    if not os.path.isfile(path):
        raise CachedetError(f"{path}: no checkpoint here")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file can raise many types
        raise CachedetError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CachedetError(f"{path}: not a cachedet checkpoint")
    if "checksum" in ckpt and checksum(ckpt) != ckpt["checksum"]:
        raise CachedetError(
            f"{path}: damaged checkpoint (its checksum does not match its contents); use another "
            "checkpoint of the run (checkpoints/best.pt) or retrain"
        )
    bad = non_finite_weight(ckpt)
    if bad is not None:
        raise CachedetError(
            f"{path}: weight {bad} is NaN or infinite (the run diverged); retrain from an earlier "
            "checkpoint with a lower optim.lr"
        )
    return ckpt
