"""Checkpoints written atomically (temp file + fsync + rename): a reader sees old or new, never half."""

from __future__ import annotations

import os
import uuid

import torch

from cachedet.errors import CachedetError

CHECKPOINT_FORMAT = "cachedet.run"


def save_atomic(obj, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
