"""Writing local files so that a reader sees the old or the new content, never half of it."""

from __future__ import annotations

import io
import json
import os
import uuid


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, obj, indent: int | None = None) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=indent).encode())


def save_torch_atomic(obj, path: str) -> None:
    buffer = io.BytesIO()
    import torch

    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())
