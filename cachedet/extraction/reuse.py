"""A store extracted from an earlier version of the annotation file: what changed, and a rebuild
that keeps the shards whose features are still right.

A view's features depend only on its image's pixels and the view's geometry (image id, view
index, sizes, crop, flip, scale), which ``plan_view`` derives from (seed, image id, view index,
image size); boxes, labels and categories are metadata written beside them. So after the user
edits boxes, categories or the image list, a shard of the new plan can take its features from an
old complete shard whose views have the same geometry, in the same order, and whose image files
are the ones it was computed from (path, size in bytes and modification time, recorded per shard
at write time). Views with Copy-Paste objects are never reused (their pixels depend on other
images' masks), and instance masks are rasterised again from the new annotations (no pixels
needed). Everything else is recomputed by the normal shard work.
"""

from __future__ import annotations

import time

import numpy as np

from cachedet.cache.header import StoreHeader
from cachedet.cache.layout import create_store, meta_arrays, remove_store, url_fs
from cachedet.cache.store import CHECKSUM, StoreReader, StoreWriter, shard_range
from cachedet.core.errors import CachedetError
from cachedet.data.coco import DetectionDataset
from cachedet.data.masks import encode_rle, mask_sources, view_masks
from cachedet.data.scan import file_stamp

# header identity fields that an edit of the annotation file changes (nothing else may differ)
DATASET_KEYS = {"dataset_sha256", "masks"}
GEOMETRY = ("image_id", "view_index", "orig_size", "resized_size", "crop_offset", "flip", "scale")


def dataset_only(found: StoreHeader, wanted: StoreHeader) -> bool:
    """Whether two headers differ only where an edit of the annotation file shows (and in nothing
    a shard's features depend on)."""
    a, b = found.identity(), wanted.identity()
    if (a["masks"] is None) != (b["masks"] is None):
        return False
    return all(a[k] == b[k] for k in a if k not in DATASET_KEYS)


def _view_keys(meta: dict[str, np.ndarray], paste_ids: np.ndarray) -> list[bytes | None]:
    """Per view, the bytes of its geometry (None for a view with Copy-Paste objects: never reused)."""
    rows = [np.ascontiguousarray(meta[k]).reshape(len(paste_ids), -1) for k in GEOMETRY]
    return [
        None if paste_ids[v] >= 0 else b"".join(r[v].tobytes() for r in rows)
        for v in range(len(paste_ids))
    ]


def reusable_shards(old: StoreReader, plan, paths_of: dict[int, str]) -> dict[int, int]:
    """{new shard: old complete shard with the same views and unchanged image files}.

    ``plan``: the new ``ViewPlan``; ``paths_of``: {image id: its file now}. Shards are matched by
    content, so a shard that moved (images added or removed before it) is found too; shards of
    equal size only."""
    sv = old.shard_views
    old_keys = _view_keys(old.meta, old.meta["paste_image_id"])
    new_keys = _view_keys(meta_arrays(plan.views), plan.paste_image_ids())
    by_content: dict[tuple, int] = {}
    for shard, rec in old.shard_records().items():
        a, b = rec["views"]
        keys = tuple(old_keys[a:b])
        stamps = rec.get("images") or {}
        ids = {int(i) for i in old.meta["image_id"][a:b]}
        fresh = all(
            stamps.get(str(i)) is not None and stamps[str(i)] == file_stamp(paths_of.get(i, ""))
            for i in ids
        )
        if None not in keys and fresh:
            by_content.setdefault(keys, shard)
    out = {}
    for shard in range(-(-len(plan.views) // sv)):
        a, b = shard_range(shard, sv, len(plan.views))
        match = by_content.get(tuple(new_keys[a:b]))
        if match is not None:
            out[shard] = match
    return out


def _changes(old: StoreReader, dataset: DetectionDataset, plan) -> str:
    """What differs between the store's annotations and ``dataset``, in a few words."""
    old_ids = old.meta["image_id"]
    first = {int(i): v for v, i in reversed(list(enumerate(old_ids.tolist())))}
    new = {r.id: r for r in dataset.images}
    added, removed = set(new) - set(first), set(first) - set(new)
    resized = [
        i
        for i in set(new) & set(first)
        if tuple(old.meta["orig_size"][first[i]]) != (new[i].height, new[i].width)
    ]
    offsets, ids = plan.boxes["offsets"], plan.boxes["ann_ids"]
    new_first = {}
    for v, p in enumerate(plan.views):
        new_first.setdefault(p.image_id, v)
    boxes = 0
    for i in set(new) & set(first):
        v, w = first[i], new_first[i]
        c, d = offsets[w], offsets[w + 1]
        if not (
            np.array_equal(old.ann_ids(v), ids[c:d])
            and np.array_equal(old.boxes(v)[0], plan.boxes["xyxy"][c:d])
        ):
            boxes += 1
    images = lambda n: f"{n} image{'s' if n != 1 else ''}"  # noqa: E731
    parts = [f"{images(len(added))} added", f"{images(len(removed))} removed"]
    parts += [f"{len(resized)} image sizes changed", f"boxes of {images(boxes)} changed"]
    parts = [p for p in parts if not p.startswith(("0 ", "boxes of 0 "))]
    was = {c["id"]: c["name"] for c in old.header.dataset["categories"]}
    now = {c["id"]: c["name"] for c in dataset.categories.to_json()}
    cats = [f"{len(set(now) - set(was))} added", f"{len(set(was) - set(now))} removed"]
    cats.append(f"{sum(was[k] != now[k] for k in set(was) & set(now))} renamed")
    cats = [c for c in cats if not c.startswith("0 ")]
    if cats:
        parts.append("categories " + ", ".join(cats))
    return ", ".join(parts) or "the same images and boxes; other fields of the file changed"


def refuse_or_rebuild(
    out: str,
    header: StoreHeader,
    plan,
    dataset: DetectionDataset,
    update: bool,
    masks_of: DetectionDataset | None,
) -> list[int] | None:
    """For an existing store at ``out`` made from another version of the annotations (and
    otherwise as asked): with ``update``, rebuild it for ``plan`` keeping the reusable shards and
    return their new indices; without, raise CachedetError saying what changed and how many
    shards each way on recomputes. None when there is no such store (nothing done)."""
    try:
        old = StoreReader(out)
    except CachedetError:
        return None
    if not old.header.diff(header) or not dataset_only(old.header, header):
        return None
    paths_of = {r.id: dataset.image_path(r) for r in dataset.images}
    reuse = reusable_shards(old, plan, paths_of)
    total = header.num_shards
    if not update:
        way = (
            f"set ExtractConfig.update to rebuild it reusing the {len(reuse)} of {total} shards whose "
            f"images did not change ({total - len(reuse)} recomputed), or ExtractConfig.overwrite to "
            f"recompute all {total}"
            if reuse
            else f"no shard's images are unchanged: set ExtractConfig.overwrite to recompute all {total} shards"
        )
        raise CachedetError(
            f"ExtractConfig.out {out}: the store was extracted from another version of "
            f"{dataset.annotation_path} ({_changes(old, dataset, plan)}); {way}"
        )
    _rebuild(old, out, header, plan, reuse, masks_of)
    return sorted(reuse)


def _rebuild(old: StoreReader, out: str, header, plan, reuse: dict[int, int], masks_of) -> None:
    """Lay out the new store beside the old one, copy the reused shards' stored features (masks
    rasterised from the new annotations), then put it in the old one's place."""

    fs, path = url_fs(out)
    tmp = out.rstrip("/") + ".updating"
    remove_store(tmp)
    create_store(
        tmp, header, plan.views, plan.boxes, extra_meta={"paste_image_id": plan.paste_image_ids()}
    )
    writer = StoreWriter(tmp)
    records = old.shard_records()
    for shard, source in sorted(reuse.items()):
        a, b = shard_range(shard, header.storage.shard_views, header.num_views)
        oa, ob = records[source]["views"]
        blocks, quant = {}, {}
        for spec in header.specs:
            blocks[spec.name], quant[spec.name] = old.read_stored(spec.name, slice(oa, ob))
        digests = writer.write_features(
            shard, blocks, a, None if quant[header.specs[0].name] is None else quant
        )
        if masks_of is not None:
            sources = mask_sources(masks_of, plan, a, b)
            per_view = [
                [encode_rle(m) for m in view_masks(plan.views[v], sources[v - a], plan.pastes[v])]
                for v in range(a, b)
            ]
            digests["masks"] = writer.write_masks(shard, per_view)
        rec = records[source]
        writer.write_record(
            {
                "shard": shard,
                "views": [a, b],
                CHECKSUM: digests,
                "skipped": [{**s, "view": s["view"] - oa + a} for s in rec.get("skipped", [])],
                "seconds": 0.0,
                "images": rec.get("images"),
                "reused_from": {"shard": source, "at": time.time()},
            }
        )
    old_path = out.rstrip("/") + ".replaced"
    remove_store(old_path)
    fs.mv(path, url_fs(old_path)[1], recursive=True)
    fs.mv(url_fs(tmp)[1], path, recursive=True)
    remove_store(old_path)
