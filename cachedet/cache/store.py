"""Writing and reading a feature store: ``StoreWriter`` and ``StoreReader`` each hold one open zarr
group (layout in ``cachedet.cache.schema``, creation in ``cachedet.cache.layout``).

Writes follow one rule: a shard has exactly one writer, which writes all levels of its views and
only then its completion record. A shard without a readable record is incomplete and is
recomputed by the next run, so an interrupted run never leaves a shard that looks complete.
"""

from __future__ import annotations

import hashlib
import json

import fsspec
import google_crc32c
import numpy as np
import zarr

from cachedet.cache import schema
from cachedet.cache.header import StoreHeader
from cachedet.cache.layout import (
    META_FIELDS,
    STORE_ENTRIES,
    open_group,
    url_fs,
    write_whole_array,
)
from cachedet.cache.readers import reader_config, zarrs_opened
from cachedet.core.atomic import remove_stale_temps, write_bytes_atomic
from cachedet.core.errors import CachedetError, StoreDamaged
from cachedet.core.paths import resolve_path
from cachedet.core.structures import ViewParams
from cachedet.data.masks import decode_rles


def shard_range(shard: int, shard_views: int, num_views: int) -> tuple[int, int]:
    return shard * shard_views, min((shard + 1) * shard_views, num_views)


def _raw_bytes(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes as a flat uint8 view (no copy when ``a`` is C-contiguous): what ``tobytes``
    gives."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _crc32c(arrays: list[np.ndarray]) -> str:
    crc = 0
    for a in arrays:
        crc = google_crc32c.extend(crc, _raw_bytes(a))
    return f"{crc:08x}"


def _sha256(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(_raw_bytes(a))
    return h.hexdigest()


# The completion record's checksum of each level's bytes, by the record key it is kept under.
# CRC-32C (Castagnoli; hardware-accelerated, as zarr's shard index and object stores use it to
# catch corrupt or torn writes) costs a tenth of sha256 on a feature shard; stores written before
# it keep sha256 records, and verify reads either.
CHECKSUMS = {"crc32c": _crc32c, "sha256": _sha256}
CHECKSUM = "crc32c"  # what new completion records hold


def features_checksum(
    block: np.ndarray, quant: np.ndarray | None = None, kind: str = CHECKSUM
) -> str:
    """Checksum (``CHECKSUMS[kind]``, hex) of a block's bytes followed by its float32 quant params'
    (uint8 stores), computed in place without a copy; equal to the checksum of ``tobytes()``."""
    arrays = [block] if quant is None else [block, np.asarray(quant, dtype=np.float32)]
    return CHECKSUMS[kind](arrays)


def masks_checksum(rle: np.ndarray, offsets: np.ndarray, kind: str = CHECKSUM) -> str:
    """Checksum of a shard's packed masks: rle uint8 bytes followed by int64 offsets."""
    arrays = [np.asarray(rle, dtype=np.uint8), np.asarray(offsets, dtype=np.int64)]
    return CHECKSUMS[kind](arrays)


def shard_rows(
    boxes: dict[str, np.ndarray], meta: dict[str, np.ndarray], start: int, end: int
) -> dict[str, np.ndarray]:
    """The rows of views [start, end) in the store's per-view arrays, by array path: the box
    offsets (end - start + 1 values), the boxes' xyxy, labels and ann_ids, and every ``meta/*``."""
    offsets = boxes["offsets"]
    a, b = int(offsets[start]), int(offsets[end])
    rows = {"boxes/offsets": offsets[start : end + 1]}
    rows.update({f"boxes/{k}": boxes[k][a:b] for k in ROW_BOX_ARRAYS})
    rows.update({f"meta/{k}": v[start:end] for k, v in meta.items()})
    return rows


ROW_BOX_ARRAYS = ("xyxy", "labels", "ann_ids")


def rows_checksums(
    boxes: dict[str, np.ndarray],
    meta: dict[str, np.ndarray],
    start: int,
    end: int,
    kind: str = CHECKSUM,
) -> dict[str, str]:
    """Checksum of each per-view array's rows of views [start, end) (``shard_rows``), by array
    path (``boxes/xyxy``, ``meta/flip``...): what a completion record holds beside its levels."""
    return {k: CHECKSUMS[kind]([v]) for k, v in shard_rows(boxes, meta, start, end).items()}


def pack_masks(per_view: list[list[bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """One shard's masks (per view, per object: RLE counts bytes) -> (rle uint8 (B,), offsets int64 (N + 1,))."""
    blobs = [b for view in per_view for b in view]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets


# zarr skips chunks equal to the fill value by default, at the price of comparing every chunk
# with it: 40% of a feature shard's write time (benchmarks/extract_overhead.py). Feature chunks are
# almost never all zeros, so they are written as they are (the stored arrays read the same).
WRITE_CONFIG = {"write_empty_chunks": True}


def write_level(array: zarr.Array, start: int, block: np.ndarray):
    """Write views [start, start + len(block)) of one level (one whole shard: one object)."""
    array.with_config(WRITE_CONFIG)[start : start + len(block)] = block


def bytes_on_disk(url: str, prefix: str = "") -> int:
    """Bytes under ``url`` (or under ``prefix`` inside it), for stores and scratch arrays alike."""
    return _StoreFiles(url).bytes_on_disk(prefix)


class _StoreFiles:
    """A store's location: its filesystem, the shard completion records and bytes on disk."""

    def __init__(self, url: str):
        self.url = resolve_path(url)
        self.fs, self.path = url_fs(self.url)

    def shard_records(self) -> dict[int, dict]:
        """Completion records by shard index; an unreadable or partial record counts as absent."""
        self.fs.invalidate_cache(
            f"{self.path}/_shards"
        )  # object-store listings are cached; other writers add records
        try:
            keys = [
                k for k in self.fs.ls(f"{self.path}/_shards", detail=False) if k.endswith(".json")
            ]
        except FileNotFoundError:
            return {}
        records = {}
        for key in keys:
            try:
                rec = json.loads(self.fs.cat_file(key))
                records[int(rec["shard"])] = rec
            except (ValueError, KeyError, TypeError, OSError):
                continue
        return records

    def bytes_on_disk(self, prefix: str = "") -> int:
        """Bytes under the store (or under ``prefix`` inside it, e.g. ``features/c3``)."""
        target = f"{self.path}/{prefix}" if prefix else self.path
        return int(self.fs.du(target)) if self.fs.exists(target) else 0

    def _record_key(self, shard: int) -> str:
        return f"{self.path}/_shards/{shard:06d}.json"


def unreadable(e: BaseException) -> str:
    """``unreadable (JSONDecodeError: Expecting value...)``: why a file could not be read, in a
    few words of one line."""
    text = str(e).splitlines()[0][:80] if str(e).strip() else ""
    return f"unreadable ({type(e).__name__}{': ' + text if text else ''})"


REBUILD = "rebuild the store by rerunning its extract command with --overwrite"


def header_lost(url: str, why: str) -> StoreDamaged:
    """The one-line error for a store whose ``zarr.json`` (its header) cannot be read: nothing
    in the store says how to recompute it."""
    return StoreDamaged(
        f"{url}/zarr.json: {why}; the store's header is lost and cannot be recomputed from the "
        f"store, {REBUILD}"
    )


def rows_damaged(url: str, array: str, why: str) -> StoreDamaged:
    """The one-line error for a box or metadata array that cannot be read (written once, at
    creation, from the annotation file)."""
    return StoreDamaged(
        f"{url}: {array}: {why}; the store is damaged: `cachedet cache repair {url}` rewrites "
        "it from the store's annotation file"
    )


def _store_parts_only(url: str) -> bool:
    """True for a folder that holds a store's arrays (``features`` and ``meta`` or ``_shards``) and
    nothing that is not a store's: a store whose header is lost, not somebody's folder of other
    files, nor an interrupted creation (arrays laid out, no records), which extract replaces."""
    fs, path = url_fs(url)
    try:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return False
    names = {n for n in names if not n.startswith(".")}  # temporary files of killed writes
    laid_out = "features" in names and bool(names & {"meta", "_shards"})
    return laid_out and names <= STORE_ENTRIES | {"_shards"}


def _open(url: str, mode: str) -> tuple[zarr.Group, StoreHeader]:
    """The store's group and header. Raises CachedetError when there is no store at ``url`` and
    StoreDamaged when its ``zarr.json`` is missing beside store data or cannot be parsed."""
    try:
        group = open_group(url, mode=mode)
    except FileNotFoundError:
        if _store_parts_only(url):  # a store's arrays without their zarr.json
            raise header_lost(url, "missing") from None
        raise CachedetError(f"{url}: no feature store here") from None
    except Exception as e:  # a truncated or garbled zarr.json fails in the JSON parser or zarr
        raise header_lost(url, unreadable(e)) from None
    return group, StoreHeader.from_dict(group.attrs.get("cachedet"), url)


def open_header(url: str) -> StoreHeader:
    """The header of the store at ``url``, reading nothing else (CachedetError / StoreDamaged as
    ``StoreReader`` raises them for the header)."""
    return _open(resolve_path(url), "r")[1]


class StoreWriter(_StoreFiles):
    """One open store being filled shard by shard (``extract``'s shard tasks, ``--repair``).

    Each shard has exactly one writer, which writes its features (and masks) and only then its
    completion record. Raises CachedetError when ``url`` holds no cachedet store.
    """

    def __init__(self, url: str):
        super().__init__(url)
        self.group, self.header = _open(self.url, "r+")

    def write_features(
        self,
        shard: int,
        blocks: dict[str, np.ndarray],
        start: int,
        quant: dict[str, np.ndarray] | None = None,
    ) -> dict[str, str]:
        """Write one shard's encoded feature blocks {level: (n, C, H, W)} (and, for uint8 stores, their
        quant params {level: (n, C, 2)}) at views [start, start + n); return each level's checksum."""
        digests = {}
        for name, block in blocks.items():
            write_level(self.group[f"features/{name}"], start, block)
            if quant is not None:
                write_level(self.group[f"quant/{name}"], start, quant[name])
            digests[name] = features_checksum(block, None if quant is None else quant[name])
        return digests

    def clear_shard(self, shard: int) -> None:
        """Remove whatever an unfinished or damaged earlier write of ``shard`` left (its feature
        and quant objects, its masks), so that the shard is written afresh: zarr reads an existing
        shard object back when writing into it, and a truncated one fails to decode."""
        kinds = (
            ("features", "quant")
            if schema.is_quantized(self.header.storage.dtype)
            else ("features",)
        )
        keys = [f"{self.path}/masks/{shard:06d}"]
        for spec in self.header.specs:
            for kind in kinds:
                arr = self.group[f"{kind}/{spec.name}"]
                chunk = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
                keys.append(f"{self.path}/{kind}/{spec.name}/{chunk}")
        for key in keys:
            if self.fs.exists(key):
                self.fs.rm(key, recursive=True)

    def write_masks(self, shard: int, per_view: list[list[bytes]]) -> str:
        """Write one shard's instance masks (per view, per object: RLE counts bytes) as
        ``masks/<shard>/{rle,offsets}`` with the store's codec; return their checksum."""
        rle, offsets = pack_masks(per_view)
        for name, arr in (("rle", rle), ("offsets", offsets)):
            z = self.group.create_array(
                f"masks/{shard:06d}/{name}",
                shape=arr.shape,
                chunks=(max(len(arr), 1),),
                dtype=arr.dtype,
                compressors=schema.compressors(self.header.storage.codec),
                overwrite=True,
            )
            if arr.size:
                z[...] = arr
        return masks_checksum(rle, offsets)

    def mend_rows(self, arrays: dict[str, np.ndarray]) -> list[dict]:
        """Rewrite each per-view array (``{path: array}``, as ``create_store`` wrote them from the
        plan) that is missing, cannot be decoded or holds other values; return what was rewritten
        as ``{"array", "error"}``."""
        mended = []
        for name, want in arrays.items():
            try:
                found = self.group[name][...]
                why = (
                    None if np.array_equal(found, want) and found.dtype == want.dtype else "changed"
                )
            except KeyError:
                why = "missing"
            except Exception as e:  # a truncated chunk or a garbled zarr.json
                why = unreadable(e)
            if why is not None:
                write_whole_array(self.group, name, want)
                mended.append({"array": name, "error": why})
        return mended

    def remove_stale_temps(self, older_than: float = 60.0) -> list[str]:
        """Remove the temporary completion records (``.<shard>.json.<hex>.tmp``) of writes killed
        more than ``older_than`` seconds ago (a live writer's are younger); local stores only."""
        if not isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            return []  # object stores write records in one PUT: nothing is left behind
        return remove_stale_temps(f"{self.path}/_shards", older_than)

    def write_record(self, record: dict):
        """Mark a shard complete. Local files are written to a temp name and renamed (atomic)."""
        key, data = self._record_key(record["shard"]), json.dumps(record).encode()
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            write_bytes_atomic(key, data)
        else:  # object stores make a single PUT visible atomically
            self.fs.pipe_file(key, data)

    def remove_record(self, shard: int):
        """Mark a shard incomplete again (the next extract run recomputes it)."""
        key = self._record_key(shard)
        if self.fs.exists(key):
            self.fs.rm(key)


class StoreIndex(_StoreFiles):
    """A store's header and small arrays, opened without reading its view rows: the specs, shapes,
    view count, storage and projection map (``projection_arrays``). Raises CachedetError when
    ``url`` holds no store of this schema version; ``StoreReader`` adds the rows and features."""

    def __init__(self, url: str):
        super().__init__(url)
        self.group, self.header = _open(self.url, "r")
        self.specs = list(self.header.specs)
        self.shapes = dict(self.header.shapes)
        self.num_views = self.header.num_views
        self.shard_views = self.header.storage.shard_views
        self.dtype = self.header.storage.dtype

    def _has(self, array: str) -> bool:
        try:
            return array.rsplit("/", 1)[1] in self.group[array.rsplit("/", 1)[0]]
        except Exception as e:
            raise rows_damaged(self.url, array.rsplit("/", 1)[0], unreadable(e)) from None

    def _whole(self, array: str) -> np.ndarray:
        """All of a box or metadata array; StoreDamaged when it is missing or cannot be decoded."""
        try:
            return self.group[array][...]
        except KeyError:
            raise rows_damaged(self.url, array, "missing") from None
        except Exception as e:  # a truncated chunk fails in the codec, a garbled zarr.json in JSON
            raise rows_damaged(self.url, array, unreadable(e)) from None

    def projection_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """A projected store's map, {level: (mean (C,) float32, components (k, C) float32)}, checked
        against the header's sha256 (StoreDamaged, naming the array, when it is missing, unreadable
        or changed); None for a store without a projection."""
        entry = self.header.projection
        if entry is None:
            return None
        arrays = {
            name: (
                self._whole(f"projection/{name}/mean"),
                self._whole(f"projection/{name}/components"),
            )
            for name, level in sorted(entry["levels"].items())
            if level["k"] < level["channels"]
        }
        if schema.projection_sha256(arrays) != entry["sha256"]:
            raise StoreDamaged(
                f"{self.url}: projection: sha256 differs from the header's; the store's features "
                "cannot be matched to their map: extract it again (ExtractConfig.overwrite)"
            )
        return arrays


class StoreReader(StoreIndex):
    """Read access to one open, complete or partial feature store.

    Features come back as float32 (n, C, H, W) per level; boxes as float32 (N, 4) xyxy in the
    view's canvas pixels with int64 contiguous labels (``header.categories``). Raises
    CachedetError when ``url`` holds no store of this schema version.
    """

    def __init__(self, url: str):
        super().__init__(url)
        self.meta = {k: self._whole(f"meta/{k}") for k in META_FIELDS}
        n = self.num_views
        # optional: which image each view's Copy-Paste objects came from (-1: none)
        self.meta["paste_image_id"] = (
            self._whole("meta/paste_image_id")
            if self._has("meta/paste_image_id")
            else np.full(n, -1, dtype=np.int64)
        )
        self.box_offsets = self._whole("boxes/offsets")
        self._boxes = {k: self._whole(f"boxes/{k}") for k in ROW_BOX_ARRAYS}
        self._shard_masks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._verified: set[int] = set()  # shards whose bytes this reader checked
        self._records: dict[int, dict] | None = None
        self.verify_reads = True  # check every shard read against its completion record
        self._read_config: dict = {}  # zarr config the feature arrays open under (use_reader)
        self._arrays: dict[str, zarr.Array] = {}  # opened feature / quant arrays, by path

    def use_reader(self, reader: str, one_thread: bool = False) -> None:
        """Decode feature reads with ``reader`` ("auto", "zarrs" or "zarr"; see
        ``cachedet.cache.readers.reader_config``, which raises CachedetError for an unknown or
        uninstalled one). Arrays opened before keep their pipeline."""
        self._read_config = reader_config(reader, one_thread)
        self._arrays.clear()

    @property
    def has_masks(self) -> bool:
        """Whether extraction stored instance masks (``header.masks``)."""
        return self.header.masks is not None

    def read_shard_masks(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """One shard's packed masks: rle uint8 (B,), offsets int64 (N + 1,) over its box rows."""
        if shard not in self._shard_masks:
            if len(self._shard_masks) >= 4:  # readers walk shard by shard: keep a few
                self._shard_masks.pop(next(iter(self._shard_masks)))
            try:
                self._shard_masks[shard] = self._read_shard_masks(shard)
            except KeyError:
                raise self.damaged(shard, "masks", "missing") from None
            except Exception as e:
                raise self.damaged(shard, "masks", unreadable(e)) from None
        return self._shard_masks[shard]

    def _read_shard_masks(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        return (
            self.group[f"masks/{shard:06d}/rle"][...],
            self.group[f"masks/{shard:06d}/offsets"][...],
        )

    def mask_rles(self, view: int) -> list[bytes]:
        """Compressed COCO RLE counts of the view's objects, aligned with ``boxes(view)``."""
        if not self.has_masks:
            raise CachedetError(
                f"{self.url}: holds no instance masks (its annotations had no segmentation, "
                "or it was extracted without masks)"
            )
        shard = view // self.shard_views
        rle, offsets = self.read_shard_masks(shard)
        first = self.box_offsets[shard * self.shard_views]
        a, b = self.box_offsets[view] - first, self.box_offsets[view + 1] - first
        return [rle[offsets[i] : offsets[i + 1]].tobytes() for i in range(a, b)]

    def masks(self, view: int) -> np.ndarray:
        """uint8 (N, S, S) instance masks of the view, in the order of ``boxes(view)``."""
        s = self.header.canvas
        return decode_rles(self.mask_rles(view), (s, s))

    @property
    def num_shards(self) -> int:
        return self.header.num_shards

    def features_array(self, name: str, kind: str = "features") -> zarr.Array:
        """The zarr array of one level (``kind`` "quant": its uint8 quant params). StoreDamaged
        when its ``zarr.json`` is missing or cannot be parsed (the shape and codecs it holds are
        part of the store's layout: the store must be rebuilt)."""
        path = f"{kind}/{name}"
        if path in self._arrays:
            return self._arrays[path]
        try:
            with zarr.config.set(self._read_config):  # the codec pipeline is fixed at open
                array = self.group[path]
        except Exception as e:
            why = "missing" if isinstance(e, KeyError) else unreadable(e)
            raise StoreDamaged(f"{self.url}/{kind}/{name}/zarr.json: {why}; {REBUILD}") from None
        zarrs_opened(self._read_config)
        self._arrays[path] = array
        return array

    def _level_arrays(self, name: str) -> list[zarr.Array]:
        """[features array] of one level, plus its quant array in uint8 stores."""
        arrays = [self.features_array(name)]
        if schema.is_quantized(self.dtype):
            arrays.append(self.features_array(name, "quant"))
        return arrays

    def read_stored(
        self, name: str, views: np.ndarray | slice
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One level as stored, (n, C, H, W) in the storage dtype, and its quant params (n, C, 2) or
        None, for a slice or a sorted index array of views (one read per array).

        Raises StoreDamaged naming the store, shard and array when a chunk cannot be read or
        decoded (a truncated or garbled shard file); an absent chunk reads as zeros (zarr's fill
        value), which only the completion record tells apart (``read_block_checked``)."""
        arrays = self._level_arrays(name)
        try:
            return self._read_stored(arrays, views)
        except Exception as e:  # a corrupt chunk fails in the codec, the shard index or the store
            raise self.damaged(self._shards_of(views), f"features/{name}", unreadable(e)) from None

    def _shards_of(self, views: np.ndarray | slice) -> int | str:
        """The shard of ``views`` (an int), or ``shards a-b`` when they span several."""
        if isinstance(views, slice):
            a, b, _ = views.indices(self.num_views)
        else:
            a, b = int(views[0]), int(views[-1]) + 1
        first, last = a // self.shard_views, max(a, b - 1) // self.shard_views
        return first if first == last else f"shards {first}-{last}"

    @staticmethod
    def _read_stored(
        arrays: list[zarr.Array], views: np.ndarray | slice
    ) -> tuple[np.ndarray, np.ndarray | None]:

        def read(arr):
            if isinstance(views, slice):
                return arr[views]
            # zarr's orthogonal selection on sharded arrays is ~30x slower than slices (measured
            # in benchmarks/extract_overhead.py): read the covering slice when it is at most
            # twice the views asked for, else one slice per view
            a, b = int(views[0]), int(views[-1]) + 1
            if b - a == len(views):  # sorted and contiguous: the slice itself, no gather copy
                return arr[a:b]
            if b - a <= 2 * len(views):
                return arr[a:b][views - a]
            return np.concatenate([arr[int(v) : int(v) + 1] for v in views])

        return read(arrays[0]), read(arrays[1]) if len(arrays) > 1 else None

    def stored_bytes_per_view(self) -> int:
        """Bytes of one view's features as stored, uncompressed (all levels, with quant params)."""
        return schema.bytes_per_view({s.name: self.shapes[s.name] for s in self.specs}, self.dtype)

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
        return self._boxes["ann_ids"][self.box_offsets[view] : self.box_offsets[view + 1]]

    def view_params(self, view: int) -> ViewParams:
        m = self.meta
        return ViewParams(
            image_id=int(m["image_id"][view]),
            view_index=int(m["view_index"][view]),
            orig_size=tuple(int(v) for v in m["orig_size"][view]),
            resized_size=tuple(int(v) for v in m["resized_size"][view]),
            crop_offset=tuple(int(v) for v in m["crop_offset"][view]),
            flip=bool(m["flip"][view]),
            canvas=self.header.canvas,
        )

    def usable_views(self, records: dict[int, dict] | None = None) -> np.ndarray:
        """Indices of views in complete shards, minus views whose image was skipped as bad, as
        int64 (n,). ``records``: the completion records (``shard_records``), read now when not
        given; later reads check their shards against them."""
        records = self.shard_records() if records is None else records
        self._records = records
        parts = [np.arange(*rec["views"], dtype=np.int64) for _, rec in sorted(records.items())]
        keep = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        skipped = [s["view"] for rec in records.values() for s in rec.get("skipped", [])]
        return keep[~np.isin(keep, skipped)] if skipped else keep

    def _record(self, shard: int) -> dict | None:
        if self._records is None or shard not in self._records:
            self._records = self.shard_records()
        return self._records.get(shard)

    def damaged(self, shard: int | str, array: str, why: str) -> StoreDamaged:
        """The one-line error for a shard block that does not match its completion record or
        cannot be read (``shard``: its index, or words such as ``shards 0-2``)."""
        where = f"shard {shard}" if isinstance(shard, int) else shard
        return StoreDamaged(
            f"{self.url}: {where}, {array}: {why}; the store is damaged (an interrupted "
            f"copy leaves absent chunks, which read as zeros). Check it with `cachedet cache verify "
            f"{self.url}`, then mend it with `cachedet cache repair {self.url}` (or rerun its "
            "extract command with --repair)"
        )

    def _rows_problem(self, rec: dict, kind: str) -> str | None:
        """The first per-view array (``boxes/xyxy``, ``meta/flip``...) whose rows of the record's
        views differ from the record's checksum, or None. Records written before rows were
        checksummed hold none: nothing to compare."""
        recorded = rec.get(kind, {})
        start, end = rec["views"]
        boxes = {"offsets": self.box_offsets, **self._boxes}
        for name, rows in shard_rows(boxes, self.meta, start, end).items():
            if name in recorded and CHECKSUMS[kind]([rows]) != recorded[name]:
                return name
        return None

    def check_block(self, shard: int, levels: dict[str, tuple[np.ndarray, np.ndarray | None]]):
        """Raise ``damaged`` unless ``levels`` ({level: (stored, quant)} of all views of ``shard``,
        as ``read_stored`` returns them) and the shard's rows of the box and metadata arrays
        (``shard_rows``) hash to the checksums of the shard's completion record. What a record
        holds no checksum for (written before checksums, or before rows had them) passes."""
        rec = self._record(shard)
        if rec is None:
            raise self.damaged(shard, "completion record", "absent")
        kind = next((k for k in CHECKSUMS if k in rec), CHECKSUM)
        recorded = rec.get(kind, {})
        array = self._rows_problem(rec, kind)
        if array is not None:
            raise self.damaged(
                shard, array, f"{kind} of its rows differs from the completion record's"
            )
        for name, (stored, quant) in levels.items():
            if name in recorded and features_checksum(stored, quant, kind) != recorded[name]:
                why = f"{kind} of the bytes read differs from the completion record's"
                raise self.damaged(shard, f"features/{name}", why)
        self._verified.add(shard)

    def read_shard_checked(self, shard: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Every level of ``shard`` as stored ({level: (stored, quant)}), checked against its
        completion record (``check_block``; a chunk that cannot be decoded is ``damaged`` too)."""
        rec = self._record(shard)
        if rec is None:
            raise self.damaged(shard, "completion record", "absent")
        start, end = rec["views"]
        levels = {s.name: self.read_stored(s.name, slice(start, end)) for s in self.specs}
        self.check_block(shard, levels)
        return levels

    def ensure_verified(self, shard: int) -> None:
        """Check ``shard`` once per reader (``read_shard_checked``), unless ``verify_reads`` is off."""
        if self.verify_reads and shard not in self._verified:
            self.read_shard_checked(shard)

    def read_block_checked(
        self, block: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """{level: (stored, quant)} of ``block`` (sorted views inside one shard), verified: a block
        that is a whole shard is checked as read (no second read), a part of one by a check of its
        whole shard, once per reader."""
        shard = int(block[0]) // self.shard_views
        rec = self._record(shard) if self.verify_reads else None
        whole = rec is not None and list(rec["views"]) == [int(block[0]), int(block[-1]) + 1]
        whole = whole and len(block) == rec["views"][1] - rec["views"][0]
        if whole and shard not in self._verified:
            levels = self.read_shard_checked(shard)
        else:
            self.ensure_verified(shard)
            levels = {s.name: self.read_stored(s.name, block) for s in self.specs}
        return levels

    def verify(self, on_shard=None) -> dict:
        """Re-read every complete shard and compare the checksums of its rows of the box and
        metadata arrays, its masks and each level with its completion record's (CRC-32C; sha256
        in records written before CRC-32C replaced it; what a record holds none for passes).

        Returns {"complete": [...], "incomplete": [...], "damaged": [{"shard", "level" (a level,
        "masks" or an array path such as "boxes/xyxy"), "error"}],
        "shards_total"}. A chunk that cannot be decoded, a missing shard object and changed bytes all
        count as damaged. ``on_shard(1)`` is called after each shard.
        """
        self.projection_arrays()  # a damaged projection spoils every shard: StoreDamaged
        records = self.shard_records()
        report = {"complete": [], "incomplete": [], "damaged": [], "shards_total": self.num_shards}
        for shard in range(self.num_shards):
            rec = records.get(shard)
            if rec is None:
                report["incomplete"].append(shard)
            else:
                problem = self._shard_problem(rec)
                if problem:
                    report["damaged"].append({"shard": shard, **problem})
                else:
                    report["complete"].append(shard)
            if on_shard:
                on_shard(1)
        return report

    def _shard_problem(self, rec: dict) -> dict | None:
        start, end = rec["views"]
        kind = next((k for k in CHECKSUMS if k in rec), CHECKSUM)  # sha256 in older records
        recorded = rec.get(kind, {})
        array = self._rows_problem(rec, kind)
        if array is not None:
            return {"level": array, "error": f"{kind} differs from the one recorded at write time"}
        if self.has_masks:
            try:
                rle, offsets = self._read_shard_masks(rec["shard"])
            except Exception as e:
                return {
                    "level": "masks",
                    "error": "missing" if isinstance(e, KeyError) else unreadable(e),
                }
            if "masks" not in recorded:
                return {"level": "masks", "error": "no checksum in the completion record"}
            if recorded["masks"] != masks_checksum(rle, offsets, kind):
                return {
                    "level": "masks",
                    "error": f"{kind} differs from the one recorded at write time",
                }
        for spec in self.specs:
            arrays = self._level_arrays(spec.name)  # StoreDamaged: no shard can be mended
            try:
                stored, quant = self._read_stored(arrays, slice(start, end))
            except Exception as e:  # a corrupt chunk can fail in the codec, the index or the store
                return {"level": spec.name, "error": unreadable(e)}
            if spec.name not in recorded:
                return {"level": spec.name, "error": "no checksum in the completion record"}
            if features_checksum(stored, quant, kind) != recorded[spec.name]:
                return {
                    "level": spec.name,
                    "error": f"{kind} differs from the one recorded at write time",
                }
        return None

    def info(self) -> dict:
        """What ``cachedet cache-info`` prints."""
        records = self.shard_records()
        done_views = sum(r["views"][1] - r["views"][0] for r in records.values())
        levels = []
        for spec in self.specs:
            arr = self.features_array(spec.name)
            levels.append(
                {
                    "name": spec.name,
                    "stride": spec.stride,
                    "shape": [self.num_views, *self.shapes[spec.name]],  # uint4: 2 channels/byte
                    "dtype": self.dtype,
                    "bytes_raw": int(arr.nbytes),
                    "bytes_stored": self.bytes_on_disk(f"features/{spec.name}"),
                }
            )
        # only written shards are on disk: compare them with the raw size of the same views
        raw_written = sum(lv["bytes_raw"] for lv in levels) * done_views / max(self.num_views, 1)
        stored_total = sum(lv["bytes_stored"] for lv in levels)
        complete = sum(1 for i in range(self.num_shards) if i in records)
        h = self.header
        return {
            "store": self.url,
            "backbone": h.backbone["name"],
            "weights": h.backbone["weights"],
            "size": h.canvas,
            "views": self.num_views,
            "views_per_image": h.views,
            "images": h.num_images,
            "boxes": int(self.box_offsets[-1]),
            "levels": levels,
            "codec": h.storage.codec,
            "hybrid_cache_stage": h.hybrid.cache_stage if h.hybrid is not None else None,
            "projection": h.projection,
            "masks": h.masks.to_dict() if h.masks is not None else None,
            "bytes_masks": self.bytes_on_disk("masks") if self.has_masks else 0,
            "bytes_on_disk": self.bytes_on_disk(),
            "bytes_features": stored_total,
            "compression_ratio": (raw_written / stored_total) if stored_total else None,
            "bytes_per_view": (stored_total / done_views) if done_views else None,
            "shards_complete": complete,
            "shards_total": self.num_shards,
            "skipped_images": sorted(
                {s["image_id"] for r in records.values() for s in r.get("skipped", [])}
            ),
            "dropped_annotations": h.dataset["dropped"],
            "dropped_images": h.dataset.get("dropped_images", {}),  # stores before it: none
        }


FeatureStore = StoreReader  # the name older code and scripts use


def store_header(url: str | None):
    """The ``StoreHeader`` of the feature store at ``url``, or None when there is none to read (the
    caller's own checks then report the real problem)."""
    if url is None:
        return None
    try:
        return StoreReader(url).header
    except (
        Exception
    ):  # a missing or foreign store is reported by train itself, with its own message
        return None
