"""Checkpoints written atomically (temp file + fsync + rename): a reader sees old or new, never half."""

from __future__ import annotations

import os

import torch

from cachedet.core.atomic import save_torch_atomic
from cachedet.core.errors import CachedetError

CHECKPOINT_FORMAT = "cachedet.run"


def save_atomic(obj, path: str):
    save_torch_atomic(obj, path)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise CachedetError(f"{path}: no checkpoint here")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file can raise many types
        raise CachedetError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CachedetError(f"{path}: not a cachedet checkpoint")
    return ckpt
