"""Writing local files so that a reader sees the old or the new content, never half of it.

A write that fails for want of space or permission raises ``WriteError`` (one line: the path, the
bytes needed, the space free) and leaves the previous file as it was. Temporary files are named
``.<name>.<32 hex>.tmp`` beside the target; ``remove_stale_temps`` removes those a killed
process left.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import time
import uuid

from cachedet.core.errors import WriteError

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp$")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def write_error(e: OSError, path: str, needed: int | None = None) -> WriteError:
    """``e`` (raised while writing ``path``) as one line: the reason, the bytes needed and the
    space its folder has."""
    folder = os.path.dirname(os.path.abspath(path))
    reason = e.strerror or type(e).__name__
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "its free space unknown"
    need = f"{_size(needed)} needed, " if needed is not None else ""
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return WriteError(f"{path}: cannot write here ({reason}: {folder})", path)
    return WriteError(f"{path}: cannot write ({reason}: {need}{folder} has {free})", path)


def remove_stale_temps(folder: str, older_than: float = 0.0) -> list[str]:
    """Remove the temporary files (``.<name>.<hex>.tmp``) of writes killed in ``folder``, those
    last modified more than ``older_than`` seconds ago; return their paths. Missing folder: []."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed, now = [], time.time()
    for name in names:
        path = os.path.join(folder, name)
        if TEMP_NAME.match(name):
            try:
                if now - os.path.getmtime(path) >= older_than:
                    os.remove(path)
                    removed.append(path)
            except OSError:
                pass  # gone already, or not ours to remove: the next run tries again
    return removed


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over ``path``.

    Raises WriteError (a CachedetError) when the disk is full or the folder read-only; ``path``
    then keeps its previous content."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)  # first, so that the message counts the space it took
        raise write_error(e, path, len(data)) from None
    finally:
        _discard(tmp)


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_json_atomic(path: str, obj, indent: int | None = None) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=indent).encode())


def save_torch_atomic(obj, path: str) -> None:
    buffer = io.BytesIO()
    import torch

    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())
