"""Creating, writing and reading a feature store (layout in ``cachedet.cache.schema``).

Writes follow one rule: a shard has exactly one writer, which writes all levels of its views and
only then its completion record. A shard without a readable record is incomplete and is
recomputed by the next run, so an interrupted run never leaves a shard that looks complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import uuid

import fsspec
import numpy as np
import zarr

from cachedet.atomic import write_bytes_atomic
from cachedet.cache import schema
from cachedet.data.masks import decode_rles
from cachedet.errors import CachedetError
from cachedet.paths import resolve_path
from cachedet.structures import FeatureSpec, ViewParams

META_FIELDS = ("image_id", "view_index", "orig_size", "resized_size", "crop_offset", "flip", "scale", "valid_size")


def _fs(url: str):
    fs, path = fsspec.core.url_to_fs(resolve_path(url))
    return fs, path.rstrip("/")


def open_group(url: str, mode: str) -> zarr.Group:
    """The store's zarr group at the same resolved location that ``_fs`` gives the shard records."""
    return zarr.open_group(resolve_path(url), mode=mode)


def store_exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


STORE_ENTRIES = {"zarr.json", "features", "quant", "meta", "boxes", "masks"}


def interrupted_creation(url: str) -> bool:
    """True for a folder that holds nothing but the parts of a store laid out before its header
    (or nothing at all): safe to replace. Anything else there is somebody's data."""
    fs, path = _fs(url)
    try:
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return False
    return names <= STORE_ENTRIES


def remove_store(url: str):
    fs, path = _fs(url)
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


def create_store(url: str, header: dict, views: list[ViewParams], boxes: dict[str, np.ndarray],
                 extra_meta: dict[str, np.ndarray] | None = None) -> bool:
    """Lay out a new store: empty feature arrays, the view metadata, the ragged boxes, then the header.

    A local store is built whole under a temporary sibling name and renamed into place, so it
    appears complete or not at all; when another process got there first, nothing is changed and
    False is returned (the caller then checks that store's header). An object store (no rename) is
    laid out in place with the header written last: a store without it is an interrupted creation.
    Returns True when this call created the store.
    """
    url = resolve_path(url)
    fs, path = _fs(url)
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        _lay_out(url, header, views, boxes, extra_meta)
        return True
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_creations(parent, name)
    tmp = os.path.join(parent, f".{name}.creating-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _lay_out(tmp, header, views, boxes, extra_meta)
        os.rename(tmp, path)  # atomic; fails when another creator's store (a non-empty folder) is there
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
        owner = entry[len(prefix):].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _alive(int(owner[1])):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only; PermissionError means it exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _lay_out(url: str, header: dict, views: list[ViewParams], boxes: dict[str, np.ndarray],
             extra_meta: dict[str, np.ndarray] | None) -> None:
    group = zarr.open_group(url, mode="w")
    storage = header["storage"]
    sv = storage["shard_views"]
    n = header["num_views"]
    for spec in header["feature_specs"]:
        c, h, w = header["feature_shapes"][spec["name"]]
        group.create_array(
            f"features/{spec['name']}",
            shape=(n, c, h, w),
            chunks=(1, c, h, w),
            shards=(min(sv, max(n, 1)), c, h, w),
            dtype=schema.zarr_dtype(storage["dtype"]),
            compressors=schema.compressors(storage["codec"]),
            fill_value=0,
            dimension_names=("view", "channel", "y", "x"),
        )
        if schema.is_quantized(storage["dtype"]):  # one chunk per shard: each shard keeps one writer
            group.create_array(f"quant/{spec['name']}", shape=(n, c, 2), chunks=(min(sv, max(n, 1)), c, 2),
                               dtype="float32", fill_value=0, dimension_names=("view", "channel", "param"))
    meta = {**meta_arrays(views), **(extra_meta or {})}
    for name, arr in {**{f"meta/{k}": v for k, v in meta.items()},
                      **{f"boxes/{k}": v for k, v in boxes.items()}}.items():
        z = group.create_array(name, shape=arr.shape, chunks=arr.shape if arr.size else None, dtype=arr.dtype)
        if arr.size:
            z[...] = arr
    if header.get("masks"):  # filled shard by shard: masks/<shard>/{rle,offsets}
        group.create_group("masks")
    group.attrs["cachedet"] = header


def shard_range(shard: int, shard_views: int, num_views: int) -> tuple[int, int]:
    return shard * shard_views, min((shard + 1) * shard_views, num_views)


def features_sha256(block: np.ndarray, quant: np.ndarray | None = None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(block).tobytes())
    if quant is not None:
        h.update(np.ascontiguousarray(quant, dtype=np.float32).tobytes())
    return h.hexdigest()


def write_shard_features(url: str, shard: int, blocks: dict[str, np.ndarray], start: int,
                         quant: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """Write one shard's encoded feature blocks {level: (n, C, H, W)} (and, for uint8 stores, their
    quant params {level: (n, C, 2)}); return the sha256 per level of what was written."""
    group = open_group(url, mode="r+")
    digests = {}
    for name, block in blocks.items():
        write_level(group[f"features/{name}"], start, block)
        if quant is not None:
            write_level(group[f"quant/{name}"], start, quant[name])
        digests[name] = features_sha256(block, None if quant is None else quant[name])
    return digests


def masks_sha256(rle: np.ndarray, offsets: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(rle, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    return h.hexdigest()


def pack_masks(per_view: list[list[bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """One shard's masks (per view, per object: RLE counts bytes) -> (rle uint8 (B,), offsets int64 (N + 1,))."""
    blobs = [b for view in per_view for b in view]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


def write_shard_masks(url: str, shard: int, per_view: list[list[bytes]], codec: str) -> str:
    """Write one shard's instance masks as ``masks/<shard>/{rle,offsets}``; return their sha256."""
    group = open_group(url, mode="r+")
    rle, offsets = pack_masks(per_view)
    for name, arr in (("rle", rle), ("offsets", offsets)):
        z = group.create_array(f"masks/{shard:06d}/{name}", shape=arr.shape, chunks=(max(len(arr), 1),), dtype=arr.dtype,
                               compressors=schema.compressors(codec), overwrite=True)
        if arr.size:
            z[...] = arr
    return masks_sha256(rle, offsets)


def write_level(array: zarr.Array, start: int, block: np.ndarray):
    """Write views [start, start + len(block)) of one level (one whole shard: one object)."""
    array[start:start + len(block)] = block


def write_shard_record(url: str, record: dict):
    """Mark a shard complete. Local files are written to a temp name and renamed (atomic)."""
    fs, path = _fs(url)
    key = f"{path}/_shards/{record['shard']:06d}.json"
    data = json.dumps(record).encode()
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        write_bytes_atomic(key, data)
    else:  # object stores make a single PUT visible atomically
        fs.pipe_file(key, data)


def read_shard_records(url: str) -> dict[int, dict]:
    """Completion records by shard index; an unreadable or partial record counts as absent."""
    fs, path = _fs(url)
    fs.invalidate_cache(f"{path}/_shards")  # object-store listings are cached; other writers add records
    try:
        keys = [k for k in fs.ls(f"{path}/_shards", detail=False) if k.endswith(".json")]
    except FileNotFoundError:
        return {}
    records = {}
    for key in keys:
        try:
            rec = json.loads(fs.cat_file(key))
            records[int(rec["shard"])] = rec
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return records


def remove_shard_record(url: str, shard: int):
    """Mark a shard incomplete again (the next extract run recomputes it)."""
    fs, path = _fs(url)
    key = f"{path}/_shards/{shard:06d}.json"
    if fs.exists(key):
        fs.rm(key)


def verify_store(url: str, on_shard=None) -> dict:
    """Re-read every complete shard and compare its sha256 per level with its completion record.

    Returns {"complete": [...], "incomplete": [...], "damaged": [{"shard", "level", "error"}], "views"}.
    A chunk that cannot be decoded, a missing shard object and changed bytes all count as damaged.
    """
    store = FeatureStore(url)
    records = store.shard_records()
    report = {"complete": [], "incomplete": [], "damaged": [], "shards_total": store.num_shards}
    for shard in range(store.num_shards):
        rec = records.get(shard)
        if rec is None:
            report["incomplete"].append(shard)
        else:
            problem = _shard_problem(store, rec)
            if problem:
                report["damaged"].append({"shard": shard, **problem})
            else:
                report["complete"].append(shard)
        if on_shard:
            on_shard(1)
    return report


def _shard_problem(store: "FeatureStore", rec: dict) -> dict | None:
    start, end = rec["views"]
    if store.has_masks:
        try:
            rle, offsets = store.read_shard_masks(rec["shard"])
        except Exception as e:
            return {"level": "masks", "error": f"unreadable ({type(e).__name__}: {str(e)[:80]})"}
        if rec.get("sha256", {}).get("masks") != masks_sha256(rle, offsets):
            return {"level": "masks", "error": "checksum differs from the one recorded at write time"}
    for spec in store.specs:
        want = rec.get("sha256", {}).get(spec.name)
        try:
            stored, quant = store.read_stored(spec.name, slice(start, end))
        except Exception as e:  # a corrupt chunk can fail in the codec, the shard index or the store
            return {"level": spec.name, "error": f"unreadable ({type(e).__name__}: {str(e)[:80]})"}
        if want is None:
            return {"level": spec.name, "error": "no checksum in the completion record"}
        if features_sha256(stored, quant) != want:
            return {"level": spec.name, "error": "checksum differs from the one recorded at write time"}
    return None


def bytes_on_disk(url: str, prefix: str = "") -> int:
    fs, path = _fs(url)
    target = f"{path}/{prefix}" if prefix else path
    return int(fs.du(target)) if fs.exists(target) else 0


class FeatureStore:
    """Read access to a complete or partial feature store.

    Features come back as float32 (n, C, H, W) per level; boxes as float32 (N, 4) xyxy in the
    view's canvas pixels with int64 contiguous labels.
    """

    def __init__(self, url: str):
        self.url = resolve_path(url)
        try:
            self.group = open_group(self.url, mode="r")
        except FileNotFoundError:
            raise CachedetError(f"{self.url}: no feature store here") from None
        self.header = self.group.attrs.get("cachedet")
        schema.check_header(self.header, self.url)
        self.specs = [FeatureSpec.from_dict(s) for s in self.header["feature_specs"]]
        self.shapes = {k: tuple(v) for k, v in self.header["feature_shapes"].items()}
        self.num_views = int(self.header["num_views"])
        self.shard_views = int(self.header["storage"]["shard_views"])
        self.dtype = self.header["storage"]["dtype"]
        self.meta = {k: self.group[f"meta/{k}"][...] for k in META_FIELDS}
        n = self.num_views
        # optional: which image each view's Copy-Paste objects came from (-1: none)
        self.meta["paste_image_id"] = self.group["meta/paste_image_id"][...] if "paste_image_id" in self.group["meta"] \
            else np.full(n, -1, dtype=np.int64)
        self.box_offsets = self.group["boxes/offsets"][...]
        self._boxes = {k: self.group[f"boxes/{k}"][...] for k in ("xyxy", "labels", "ann_ids")}
        self._shard_masks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def has_masks(self) -> bool:
        """Whether extraction stored instance masks (``header["masks"]``)."""
        return bool(self.header.get("masks"))

    def read_shard_masks(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """One shard's packed masks: rle uint8 (B,), offsets int64 (N + 1,) over its box rows."""
        if shard not in self._shard_masks:
            if len(self._shard_masks) >= 4:  # readers walk shard by shard: keep a few
                self._shard_masks.pop(next(iter(self._shard_masks)))
            self._shard_masks[shard] = (self.group[f"masks/{shard:06d}/rle"][...],
                                        self.group[f"masks/{shard:06d}/offsets"][...])
        return self._shard_masks[shard]

    def mask_rles(self, view: int) -> list[bytes]:
        """Compressed COCO RLE counts of the view's objects, aligned with ``boxes(view)``."""
        if not self.has_masks:
            raise CachedetError(f"{self.url}: holds no instance masks (its annotations had no segmentation, "
                                "or it was extracted with --no-masks)")
        shard = view // self.shard_views
        rle, offsets = self.read_shard_masks(shard)
        first = self.box_offsets[shard * self.shard_views]
        a, b = self.box_offsets[view] - first, self.box_offsets[view + 1] - first
        return [rle[offsets[i]:offsets[i + 1]].tobytes() for i in range(a, b)]

    def masks(self, view: int) -> np.ndarray:
        """uint8 (N, S, S) instance masks of the view, in the order of ``boxes(view)``."""
        s = int(self.header["augment"]["size"])
        return decode_rles(self.mask_rles(view), (s, s))

    @property
    def num_shards(self) -> int:
        return int(self.header["num_shards"])

    def features_array(self, name: str) -> zarr.Array:
        return self.group[f"features/{name}"]

    def read_stored(self, name: str, views: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray | None]:
        """One level as stored, (n, C, H, W) in the storage dtype, and its quant params (n, C, 2) or
        None, for a slice or a sorted index array of views (one read per array)."""
        def read(arr):
            if isinstance(views, slice):
                return arr[views]
            return arr.get_orthogonal_selection((views,)) if len(views) > 1 else arr[views[0]:views[0] + 1]
        quant = read(self.group[f"quant/{name}"]) if schema.is_quantized(self.dtype) else None
        return read(self.features_array(name)), quant

    def read_level(self, name: str, views: np.ndarray | slice) -> np.ndarray:
        """float32 (n, C, H, W) of one level (see ``read_stored``)."""
        stored, quant = self.read_stored(name, views)
        return schema.decode(stored, self.dtype, quant)

    def read_features(self, start: int, end: int) -> dict[str, np.ndarray]:
        return {s.name: self.read_level(s.name, slice(start, end)) for s in self.specs}

    def boxes(self, view: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.box_offsets[view], self.box_offsets[view + 1]
        return self._boxes["xyxy"][a:b], self._boxes["labels"][a:b]

    def ann_ids(self, view: int) -> np.ndarray:
        return self._boxes["ann_ids"][self.box_offsets[view]:self.box_offsets[view + 1]]

    def view_params(self, view: int) -> ViewParams:
        m = self.meta
        return ViewParams(
            image_id=int(m["image_id"][view]),
            view_index=int(m["view_index"][view]),
            orig_size=tuple(int(v) for v in m["orig_size"][view]),
            resized_size=tuple(int(v) for v in m["resized_size"][view]),
            crop_offset=tuple(int(v) for v in m["crop_offset"][view]),
            flip=bool(m["flip"][view]),
            canvas=int(self.header["augment"]["size"]),
        )

    def shard_records(self) -> dict[int, dict]:
        return read_shard_records(self.url)

    def usable_views(self) -> np.ndarray:
        """Indices of views in complete shards, minus views whose image was skipped as bad."""
        keep = []
        for shard, rec in sorted(self.shard_records().items()):
            start, end = rec["views"]
            skipped = {s["view"] for s in rec.get("skipped", [])}
            keep.extend(v for v in range(start, end) if v not in skipped)
        return np.asarray(keep, dtype=np.int64)

    def info(self) -> dict:
        """What ``cachedet cache-info`` prints."""
        records = self.shard_records()
        done_views = sum(r["views"][1] - r["views"][0] for r in records.values())
        levels = []
        for spec in self.specs:
            arr = self.features_array(spec.name)
            levels.append({
                "name": spec.name, "stride": spec.stride, "shape": list(arr.shape), "dtype": self.dtype,
                "bytes_raw": int(arr.nbytes), "bytes_stored": bytes_on_disk(self.url, f"features/{spec.name}"),
            })
        # only written shards are on disk: compare them with the raw size of the same views
        raw_written = sum(lv["bytes_raw"] for lv in levels) * done_views / max(self.num_views, 1)
        stored_total = sum(lv["bytes_stored"] for lv in levels)
        complete = sum(1 for i in range(self.num_shards) if i in records)
        return {
            "store": self.url,
            "backbone": self.header["backbone"]["name"],
            "weights": self.header["backbone"]["weights"],
            "size": self.header["augment"]["size"],
            "views": self.num_views,
            "views_per_image": self.header["views"],
            "images": self.header["num_images"],
            "boxes": int(self.box_offsets[-1]),
            "levels": levels,
            "codec": self.header["storage"]["codec"],
            "hybrid_cache_stage": (self.header.get("hybrid") or {}).get("cache_stage"),
            "masks": self.header.get("masks"),
            "bytes_masks": bytes_on_disk(self.url, "masks") if self.has_masks else 0,
            "bytes_on_disk": bytes_on_disk(self.url),
            "bytes_features": stored_total,
            "compression_ratio": (raw_written / stored_total) if stored_total else None,
            "bytes_per_view": (stored_total / done_views) if done_views else None,
            "shards_complete": complete,
            "shards_total": self.num_shards,
            "skipped_images": sorted({s["image_id"] for r in records.values() for s in r.get("skipped", [])}),
            "dropped_annotations": self.header["dataset"]["dropped"],
        }
