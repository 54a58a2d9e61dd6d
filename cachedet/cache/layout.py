"""Laying out a new feature store (arrays, view metadata, boxes, header) and finding, replacing or
removing one. The layout itself is described in ``cachedet.cache.schema``.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import uuid

import fsspec
import numpy as np
import zarr

from cachedet.cache import schema
from cachedet.cache.header import StoreHeader
from cachedet.core.paths import resolve_path
from cachedet.core.structures import ViewParams

META_FIELDS = (
    "image_id",
    "view_index",
    "orig_size",
    "resized_size",
    "crop_offset",
    "flip",
    "scale",
    "valid_size",
)


def url_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without a trailing slash) of a resolved store URL."""
    fs, path = fsspec.core.url_to_fs(resolve_path(url))
    return fs, path.rstrip("/")


def open_group(url: str, mode: str) -> zarr.Group:
    """The store's zarr group at the same resolved location that ``url_fs`` gives the shard records."""
    return zarr.open_group(resolve_path(url), mode=mode)


def store_exists(url: str) -> bool:
    fs, path = url_fs(url)
    return fs.exists(path)


STORE_ENTRIES = {"zarr.json", "features", "quant", "meta", "boxes", "masks", "projection"}


def interrupted_creation(url: str) -> bool:
    """True for a folder that holds nothing but the parts of a store laid out before its header
    (or nothing at all): safe to replace. Anything else there is somebody's data."""
    fs, path = url_fs(url)
    try:
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return False
    return names <= STORE_ENTRIES


def remove_store(url: str):
    fs, path = url_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def meta_arrays(views: list[ViewParams]) -> dict[str, np.ndarray]:
    return {
        "image_id": np.array([v.image_id for v in views], dtype=np.int64),
        "view_index": np.array([v.view_index for v in views], dtype=np.int32),
        "orig_size": np.array([v.orig_size for v in views], dtype=np.int32).reshape(-1, 2),
        "resized_size": np.array([v.resized_size for v in views], dtype=np.int32).reshape(-1, 2),
        "crop_offset": np.array([v.crop_offset for v in views], dtype=np.int32).reshape(-1, 2),
        "flip": np.array([v.flip for v in views], dtype=bool),
        "scale": np.array([v.scale for v in views], dtype=np.float64).reshape(-1, 2),
        "valid_size": np.array([v.valid_size for v in views], dtype=np.int32).reshape(-1, 2),
    }


def row_arrays(boxes: dict[str, np.ndarray], meta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The store's per-view arrays by path: ``meta/<field>`` and ``boxes/<name>``."""
    return {
        **{f"meta/{k}": v for k, v in meta.items()},
        **{f"boxes/{k}": v for k, v in boxes.items()},
    }


def write_whole_array(group: zarr.Group, name: str, arr: np.ndarray) -> None:
    """(Re)write a per-view array as one chunk (replacing whatever ``name`` held)."""
    z = group.create_array(
        name,
        shape=arr.shape,
        chunks=arr.shape if arr.size else None,
        dtype=arr.dtype,
        overwrite=True,
    )
    if arr.size:
        z[...] = arr


def create_store(
    url: str,
    header: StoreHeader,
    views: list[ViewParams],
    boxes: dict[str, np.ndarray],
    extra_meta: dict[str, np.ndarray] | None = None,
    projection: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> bool:
    """Lay out a new store: empty feature arrays, the view metadata, the ragged boxes, a projected
    store's ``projection`` ({level: (mean (C,), components (k, C))}), then the header.

    A local store is built whole under a temporary sibling name and renamed into place, so it
    appears complete or not at all; when another process got there first, nothing is changed and
    False is returned (the caller then checks that store's header). An object store (no rename) is
    laid out in place with the header written last: a store without it is an interrupted creation.
    Returns True when this call created the store.
    """
    url = resolve_path(url)
    fs, path = url_fs(url)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        _lay_out(url, header, views, boxes, extra_meta, projection)
        return True
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_creations(parent, name)
    tmp = os.path.join(
        parent, f".{name}.creating-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        _lay_out(tmp, header, views, boxes, extra_meta, projection)
        os.rename(
            tmp, path
        )  # atomic; fails when another creator's store (a non-empty folder) is there
        return True
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        return False
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_creations(parent: str, name: str) -> None:
    """Temporary folders left by creations on this host whose process is gone (killed mid-creation)."""
    prefix, host = f".{name}.creating-", socket.gethostname()
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        owner = entry[len(prefix) :].rsplit("-", 2)
        if (
            len(owner) == 3
            and owner[0] == host
            and owner[1].isdigit()
            and not _alive(int(owner[1]))
        ):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only; PermissionError means it exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _lay_out(
    url: str,
    header: StoreHeader,
    views: list[ViewParams],
    boxes: dict[str, np.ndarray],
    extra_meta: dict[str, np.ndarray] | None,
    projection: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> None:
    group = zarr.open_group(url, mode="w")
    storage = header.storage
    sv = storage.shard_views
    n = header.num_views
    for spec in header.specs:
        c, h, w = header.shapes[spec.name]
        sc = schema.stored_channels(c, storage.dtype)
        group.create_array(
            f"features/{spec.name}",
            shape=(n, sc, h, w),
            chunks=(1, sc, h, w),
            shards=(min(sv, max(n, 1)), sc, h, w),
            dtype=schema.zarr_dtype(storage.dtype),
            compressors=schema.compressors(storage.codec),
            fill_value=0,
            dimension_names=("view", "channel", "y", "x"),
        )
        if schema.is_quantized(storage.dtype):  # one chunk per shard: each shard keeps one writer
            group.create_array(
                f"quant/{spec.name}",
                shape=(n, c, 2),
                chunks=(min(sv, max(n, 1)), c, 2),
                dtype="float32",
                fill_value=0,
                dimension_names=("view", "channel", "param"),
            )
    meta = {**meta_arrays(views), **(extra_meta or {})}
    for name, arr in row_arrays(boxes, meta).items():
        write_whole_array(group, name, arr)
    for name, (mean, components) in (projection or {}).items():
        write_whole_array(group, f"projection/{name}/mean", np.asarray(mean, dtype=np.float32))
        write_whole_array(
            group, f"projection/{name}/components", np.asarray(components, dtype=np.float32)
        )
    if header.masks is not None:  # filled shard by shard: masks/<shard>/{rle,offsets}
        group.create_group("masks")
    group.attrs["cachedet"] = header.to_dict()
