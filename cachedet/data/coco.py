"""COCO / LVIS annotation files: validation, the category map, and per-image box targets.

Everything that cannot become a training box is dropped *and counted* by reason; everything
that makes the file unusable (bad JSON, wrong types, colliding ids) is a ``CachedetError``
that names the file and the field.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import msgspec
import numpy as np

from cachedet.core.errors import CachedetError
from cachedet.core.structures import check_category_count

DROP_REASONS = (
    "crowd",
    "non_finite",
    "degenerate",
    "outside_image",
    "unknown_category",
    "unknown_image",
    "duplicate_image",  # on an image entry dropped as a duplicate (its file_name listed before)
)
# Per annotation, decided by the view plan (``cachedet.extraction.run.plan_views``): objects that
# reach no stored view of their image.
PLAN_DROP_REASONS = (
    "degenerate_at_canvas",  # under one pixel wide or high at every view's scale
    "outside_views",  # cut out of every view by its crop (and pasted into none)
)


@dataclass(frozen=True)
class CategoryMap:
    """The one place that maps dataset category ids to contiguous labels 0..N-1 and back.

    Labels follow the order of ascending category id. ``frequency`` holds LVIS's 'r'/'c'/'f'
    (None for COCO files).
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    frequency: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def to_label(self, category_id: int) -> int:
        return self._label_of[category_id]

    def to_id(self, label: int) -> int:
        return self.ids[label]

    def name_of(self, category_id: int) -> str:
        """The name of a dataset category id; KeyError for an id not in the map."""
        return self.names[self._label_of[category_id]]

    def __contains__(self, category_id: int) -> bool:
        return category_id in self._label_of

    @property
    def _label_of(self) -> dict[int, int]:
        cache = self.__dict__.get("_label_cache")
        if cache is None:
            cache = {cid: i for i, cid in enumerate(self.ids)}
            object.__setattr__(self, "_label_cache", cache)
        return cache

    def to_json(self) -> list[dict]:
        return [
            {"id": i, "name": n, **({"frequency": f} if f else {})}
            for i, n, f in zip(self.ids, self.names, self.frequency)
        ]

    @classmethod
    def from_json(cls, items: list[dict], where: str = "categories") -> "CategoryMap":
        """The map of a category list (``to_json``'s form); CachedetError naming ``where`` above
        ``MAX_CATEGORIES``."""
        check_category_count(len(items), where)
        items = sorted(items, key=lambda c: c["id"])
        return cls(
            ids=tuple(int(c["id"]) for c in items),
            names=tuple(str(c["name"]) for c in items),
            frequency=tuple(c.get("frequency") for c in items),
        )


@dataclass
class ImageRecord:
    """One image and its kept boxes. boxes: float32 (N, 4) xyxy absolute pixels; labels: int64 (N,)."""

    id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    ann_ids: np.ndarray
    # per kept box: COCO polygons [[x, y, ...], ...], an RLE dict {"size", "counts"}, or None (box only)
    segmentations: list = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(s is not None for s in self.segmentations)


@dataclass
class DetectionDataset:
    """A validated COCO- or LVIS-format dataset: images sorted by id, categories, drop counts."""

    annotation_path: str
    images_dir: str
    images: list[ImageRecord]
    categories: CategoryMap
    dropped: dict[str, int]
    sha256: str
    is_lvis: bool
    raw: dict = field(repr=False)
    dropped_images: dict[str, int] = field(default_factory=lambda: {"duplicate": 0})
    _rows: dict | None = field(default=None, repr=False, compare=False)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(r.labels) for r in self.images))

    @property
    def has_masks(self) -> bool:
        """Whether any kept annotation carries a segmentation."""
        return any(r.has_masks for r in self.images)

    def annotation_rows(self) -> dict[int, tuple[ImageRecord, int]]:
        """annotation id -> (its image's record, its row in the record's boxes); built once."""
        if self._rows is None:
            self._rows = {
                int(a): (r, i) for r in self.images for i, a in enumerate(r.ann_ids.tolist())
            }
        return self._rows

    def image_path(self, record: ImageRecord) -> str:
        """The image's file under the images folder. A ``file_name`` written on Windows
        (``sub\\photo.png``) is read with '/' when no file has the literal name."""
        path = os.path.join(self.images_dir, record.file_name)
        if "\\" in record.file_name and not os.path.exists(path):
            return os.path.join(self.images_dir, *record.file_name.split("\\"))
        return path

    def fingerprint(self) -> dict:
        """What identifies this dataset inside a cache."""
        return {
            "annotations": os.path.abspath(self.annotation_path),
            "annotations_sha256": self.sha256,
            "images_dir": os.path.abspath(self.images_dir),
            "num_images": len(self.images),
            "num_boxes": self.num_boxes,
            "is_lvis": self.is_lvis,
            "categories": self.categories.to_json(),
            "dropped": dict(self.dropped),
            "dropped_images": dict(self.dropped_images),
        }

    def to_coco(self):
        """The raw dataset as a pycocotools ``COCO`` object (for evaluation)."""
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.raw
        coco.createIndex()
        return coco


@contextlib.contextmanager
def gc_paused():
    """Hold Python's cyclic garbage collector while a block allocates millions of acyclic objects
    (a parsed annotation file, a view per image): each collection walks every object made so far,
    which costs about a third of loading a COCO-sized file. Restores the collector's state after;
    the objects the block made join the oldest generation."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # what the block made moves to the oldest generation at once (freeze, then unfreeze):
        # else the first young collection after it would walk all of it, a pause as long as those
        # the block avoided; refcounting frees these objects as ever
        gc.freeze()
        gc.unfreeze()
        if was:
            gc.enable()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, message: str):
        raise CachedetError(f"{self.path}: {where}: {message}")

    def list_field(self, obj: dict, key: str) -> list:
        if key not in obj:
            self.fail(
                key,
                "missing (a COCO annotation file needs 'images', 'annotations' and 'categories')",
            )
        if not isinstance(obj[key], list):
            self.fail(key, f"expected a list, got {type(obj[key]).__name__}")
        return obj[key]

    def item(self, where: str, obj) -> dict:
        if not isinstance(obj, dict):
            self.fail(where, f"expected an object, got {type(obj).__name__}")
        return obj

    def int_field(self, where: str, obj: dict, key: str, minimum: int | None = None) -> int:
        if key not in obj:
            self.fail(f"{where}.{key}", "missing")
        v = obj[key]
        if not _is_int(v):
            self.fail(f"{where}.{key}", f"expected an integer, got {v!r}")
        if minimum is not None and v < minimum:
            self.fail(f"{where}.{key}", f"expected an integer >= {minimum}, got {v!r}")
        if abs(v) > 2**53:
            self.fail(f"{where}.{key}", f"integer {v} is out of range")
        return v

    def unique_ids(self, where: str, ids: list[int]):
        dup = [i for i, n in Counter(ids).items() if n > 1]
        if dup:
            self.fail(f"{where}[].id", f"ids must be unique; {len(dup)} collide, e.g. {dup[0]}")


def _file_name(chk: _Checker, where: str, img: dict) -> str:
    name = img.get("file_name")
    if name is None and isinstance(img.get("coco_url"), str):  # LVIS images carry only coco_url
        name = img["coco_url"].rsplit("/", 1)[-1]
    if not isinstance(name, str) or not name:
        chk.fail(f"{where}.file_name", f"expected a file name, got {name!r}")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith("/") or ".." in parts or "\x00" in name:
        chk.fail(
            f"{where}.file_name",
            f"{name[:80]!r} leaves the images folder (absolute, '..' or NUL)",
        )
    return name


_NUMBER_TYPES = {int, float}  # JSON numbers; bool (a subclass of int) is refused
_INT_RANGE = 2**53


def _int_of(chk: _Checker, where: str, obj: dict, key: str) -> int:
    """``obj[key]`` when it is a plain int in the checker's range (the common case, checked inline);
    otherwise ``chk.int_field``, which raises its one-line error naming the field."""
    v = obj.get(key)
    if type(v) is int and -_INT_RANGE <= v <= _INT_RANGE:
        return v
    return chk.int_field(where, obj, key)


def polygon_points(seg) -> np.ndarray | None:
    """(N, 2) float64 points of COCO polygons ``[[x1, y1, x2, y2, x3, y3, ...], ...]`` (each a list
    of at least 6 numbers, an even count); None when ``seg`` is not such a list of finite numbers.
    One numpy pass over all coordinates (the types checked by ``map(type, ...)``, finiteness by
    ``np.isfinite``), not a Python check per coordinate."""
    if not isinstance(seg, list):
        return None
    flat: list = []
    for p in seg:
        if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
            return None
        flat += p
    if not set(map(type, flat)) <= _NUMBER_TYPES:
        return None
    try:
        points = np.asarray(flat, dtype=np.float64)
    except OverflowError:  # an integer beyond float64
        return None
    return points.reshape(-1, 2) if np.isfinite(points).all() else None


def _segmentation(chk: _Checker, where: str, ann: dict):
    """(the annotation's mask as COCO polygons or an RLE dict, its polygon points (N, 2) or None);
    (None, None) when it has none (box only)."""
    seg = ann.get("segmentation")
    if seg is None or seg == []:
        return None, None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(_is_int(v) and v > 0 for v in size)
            and isinstance(counts, (str, list))
        ):
            chk.fail(f"{where}.segmentation", "expected an RLE {'size': [h, w], 'counts': ...}")
        return seg, None
    points = polygon_points(seg)
    if points is not None:
        return seg, points
    chk.fail(
        f"{where}.segmentation",
        "expected polygons [[x1, y1, x2, y2, x3, y3, ...], ...] of finite numbers or an RLE dict",
    )


POLYGON_SLACK = 0.1  # polygon points may lie this share of the image's side outside it


def _check_mask_size(
    chk: _Checker, where: str, which: str, seg, rec: dict, points: np.ndarray | None
) -> None:
    """Refuse a mask drawn for another image size: an RLE whose ``size`` is not the image's
    [height, width] (resizing it would shift or scramble the mask), or polygons (``points``,
    (N, 2) x, y) reaching far outside the image (more than ``POLYGON_SLACK`` of a side:
    coordinates of another scale)."""
    h, w = rec["height"], rec["width"]
    if isinstance(seg, dict) and list(seg["size"]) != [h, w]:
        hint = (
            "; it is [width, height]: COCO's RLE size is [height, width]"
            if list(seg["size"]) == [w, h]
            else ""
        )
        chk.fail(
            f"{where}.segmentation.size",
            f"{which}: {list(seg['size'])} disagrees with the image's [height, width] "
            f"[{h}, {w}]{hint}",
        )
    if points is not None:
        lo_x, lo_y = -POLYGON_SLACK * w, -POLYGON_SLACK * h
        hi_x, hi_y = (1 + POLYGON_SLACK) * w, (1 + POLYGON_SLACK) * h
        x, y = points[:, 0], points[:, 1]
        if x.min() < lo_x or y.min() < lo_y or x.max() > hi_x or y.max() > hi_y:
            outside = (x < lo_x) | (y < lo_y) | (x > hi_x) | (y > hi_y)
            far = points[outside][0]
            chk.fail(
                f"{where}.segmentation",
                f"{which}: polygon point ({far[0]:g}, {far[1]:g}) lies far outside the {w}x{h} image "
                "(coordinates of another image size?)",
            )


def _all_ints(values: list) -> np.ndarray | None:
    """int64 array of ``values`` when every one is a plain int (not bool) within +-2**53; else None."""
    if set(map(type, values)) != {int}:
        return None
    try:
        out = np.array(values, dtype=np.int64)
    except OverflowError:
        return None
    return out if not len(out) or np.abs(out).max() <= _INT_RANGE else None


def _numbers(values: list) -> np.ndarray | None:
    """float64 array of ``values`` when every one is a JSON number (int or float, not bool) whose
    float64 is what ``float()`` gives (ints within +-2**53); else None."""
    kinds = set(map(type, values))
    if not kinds <= _NUMBER_TYPES:
        return None
    if int in kinds and _all_ints([v for v in values if type(v) is int]) is None:
        return None
    return np.array(values, dtype=np.float64)


def _fast_annotations(
    chk: _Checker, anns: list, images: dict[int, dict], duplicate_of: dict, cmap: CategoryMap
) -> tuple[dict[str, int], list[ImageRecord]] | None:
    """The annotation checks, drops and per-image records of ``load_detection_dataset`` over whole
    arrays: (dropped counts, records sorted by image id), equal to what the per-annotation loop
    builds. None where any annotation needs that loop: a wrong type or value, a colliding id, a
    mask that fails its checks (the loop then raises the same one-line error as ever)."""
    n = len(anns)
    if not n or set(map(type, anns)) != {dict}:
        return None
    ann_ids = _all_ints([a.get("id") for a in anns])
    image_ids = _all_ints([a.get("image_id") for a in anns])
    category_ids = _all_ints([a.get("category_id") for a in anns])
    if ann_ids is None or image_ids is None or category_ids is None:
        return None
    bboxes = [a.get("bbox") for a in anns]
    if set(map(type, bboxes)) != {list} or set(map(len, bboxes)) != {4}:
        return None
    xywh = _numbers(list(chain.from_iterable(bboxes)))
    crowd = [a.get("iscrowd", 0) for a in anns]
    try:
        if not set(crowd) <= {0, 1}:  # 0.0, 1.0, True and False are as good as 0 and 1
            return None
    except TypeError:  # unhashable
        return None
    if xywh is None or len(np.unique(ann_ids)) != n:
        return None
    xywh = xywh.reshape(n, 4)

    # the kept images, sorted by id: position, width, height
    order = sorted(images)
    ids_sorted = np.asarray(order, dtype=np.int64)
    widths = np.asarray([images[i]["width"] for i in order], dtype=np.int64)
    heights = np.asarray([images[i]["height"] for i in order], dtype=np.int64)
    if len(order) and max(widths.max(), heights.max()) > 1 << 24:  # exact in float32 below
        return None
    pos = np.minimum(np.searchsorted(ids_sorted, image_ids), len(order) - 1)
    known = ids_sorted[pos] == image_ids
    cat_sorted = np.asarray(cmap.ids, dtype=np.int64)
    label = np.minimum(np.searchsorted(cat_sorted, category_ids), len(cat_sorted) - 1)
    known_category = cat_sorted[label] == category_ids
    x, y, w, h = xywh.T
    finite = np.isfinite(xywh).all(axis=1)

    # the loop's reasons, in its order: the first that applies counts
    reasons = [
        ("duplicate_image", np.isin(image_ids, np.fromiter(duplicate_of, np.int64))),
        ("unknown_image", ~known),
        ("unknown_category", ~known_category),
        ("crowd", np.fromiter(map(bool, crowd), bool, n)),
        ("non_finite", ~finite),
    ]
    left = np.ones(n, dtype=bool)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for reason, hit in reasons:
        dropped[reason] = int((hit & left).sum())
        left &= ~hit
    with np.errstate(invalid="ignore"):
        hit = (w <= 0) | (h <= 0)
    dropped["degenerate"] = int((hit & left).sum())
    left &= ~hit
    W, H = widths[pos].astype(np.float64), heights[pos].astype(np.float64)

    def clip(v, side):  # min(max(v, 0.0), side) as Python evaluates it (-0.0 stays -0.0)
        v = np.where(0.0 > v, 0.0, v)
        return np.where(side < v, side, v)

    with np.errstate(invalid="ignore", over="ignore"):
        x1, y1, x2, y2 = clip(x, W), clip(y, H), clip(x + w, W), clip(y + h, H)
        hit = (x2 - x1 <= 0) | (y2 - y1 <= 0)
    dropped["outside_image"] = int((hit & left).sum())
    left &= ~hit
    kept = np.flatnonzero(left)

    segments = _fast_segmentations(chk, anns, kept, ann_ids, image_ids, images, W, H)
    if segments is None:
        return None
    by_image = np.argsort(pos[kept], kind="stable")  # file order within each image
    rows = kept[by_image]
    boxes = np.stack([x1, y1, x2, y2], 1)[rows].astype(np.float32)
    labels, kept_ids = label[rows].astype(np.int64), ann_ids[rows]
    segments = [segments[j] for j in by_image.tolist()]
    ends = np.cumsum(np.bincount(pos[rows], minlength=len(order))).tolist()
    records, start = [], 0
    for iid, end in zip(order, ends):
        r = images[iid]
        records.append(
            ImageRecord(
                id=iid,
                file_name=r["file_name"],
                height=r["height"],
                width=r["width"],
                boxes=boxes[start:end],
                labels=labels[start:end],
                ann_ids=kept_ids[start:end],
                segmentations=segments[start:end],
            )
        )
        start = end
    return dropped, records


def _fast_segmentations(
    chk: _Checker,
    anns: list,
    kept: np.ndarray,
    ann_ids: np.ndarray,
    image_ids: np.ndarray,
    images: dict[int, dict],
    W: np.ndarray,
    H: np.ndarray,
) -> list | None:
    """The masks of the kept annotations (``kept``: their rows; ``W``, ``H``: every annotation's
    image size), checked as ``_segmentation`` and ``_check_mask_size`` check them: polygons in one
    numpy pass over all their coordinates, RLE dicts one by one. None where any check fails."""
    segments = [anns[j].get("segmentation") for j in kept.tolist()]
    segments = [None if s is None or s == [] else s for s in segments]
    kinds = list(map(type, segments))
    polygons = [j for j, k in enumerate(kinds) if k is list]
    for j, kind in enumerate(kinds):
        if kind is dict:  # RLE (crowd regions, mostly dropped before): the loop's own checks
            row = int(kept[j])
            try:
                seg, points = _segmentation(chk, "", anns[row])
                which = f"annotation {ann_ids[row]} of image {image_ids[row]}"
                _check_mask_size(chk, "", which, seg, images[int(image_ids[row])], points)
            except CachedetError:
                return None
        elif kind is not list and kind is not type(None):
            return None
    if not polygons:
        return segments
    for start in range(0, len(polygons), _POLYGON_CHUNK):  # temporaries of bounded size
        chunk = polygons[start : start + _POLYGON_CHUNK]
        if not _polygons_fit([segments[j] for j in chunk], kept[np.asarray(chunk)], W, H):
            return None
    return segments


_POLYGON_CHUNK = 20000  # annotations whose polygon coordinates are checked in one array


def _polygons_fit(polys: list, rows: np.ndarray, W: np.ndarray, H: np.ndarray) -> bool:
    """Whether every one of ``polys`` (non-empty lists; ``rows``: their annotations) is a list of
    polygons of 6+ finite numbers, an even count, within ``POLYGON_SLACK`` of its image."""
    parts = list(chain.from_iterable(polys))
    if set(map(type, parts)) != {list}:
        return False
    lengths = np.fromiter(map(len, parts), np.int64, len(parts))
    if (lengths < 6).any() or (lengths % 2).any():
        return False
    coords = _numbers(list(chain.from_iterable(parts)))
    if coords is None or not np.isfinite(coords).all():
        return False
    # each coordinate's image: polygon -> its parts' coordinates
    per_polygon = np.add.reduceat(lengths, np.cumsum([0] + [len(p) for p in polys[:-1]]))
    w, h = np.repeat(W[rows], per_polygon // 2), np.repeat(H[rows], per_polygon // 2)
    px, py = coords[0::2], coords[1::2]
    outside = (
        (px < -POLYGON_SLACK * w)
        | (py < -POLYGON_SLACK * h)
        | (px > (1 + POLYGON_SLACK) * w)
        | (py > (1 + POLYGON_SLACK) * h)
    )
    return not outside.any()


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CachedetError(f"{path}: annotation file not found") from None
    except OSError as e:
        raise CachedetError(f"{path}: cannot read annotation file ({e.strerror})") from None


def _parse(path: str, raw: bytes, fast: bool = False) -> dict:
    """The JSON object of ``raw``. ``fast``: parsed by msgspec (about three times faster than
    ``json``, and without its transient memory), or by ``json`` where msgspec refuses the text
    (NaN/Infinity, numbers past float64, a byte-order mark, UTF-16, lone surrogates), so the errors
    are always ``json``'s. msgspec reads numbers and strings exactly as ``json`` does; a caller that
    finds a problem in fast-parsed data re-parses it with ``json`` all the same (``fast=False``)."""
    try:
        if fast:
            try:
                data = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                data = json.loads(raw)
        else:
            data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CachedetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CachedetError(f"{path}: top level: expected a JSON object, got {type(data).__name__}")
    return data


def read_annotation_json(path: str | os.PathLike) -> tuple[dict, str]:
    """Read and parse a JSON file; return (data, sha256 of its bytes)."""
    path = str(path)
    raw = _read_bytes(path)
    return _parse(path, raw), hashlib.sha256(raw).hexdigest()


def load_detection_dataset(
    annotations: str | os.PathLike, images_dir: str | os.PathLike
) -> DetectionDataset:
    """Validate a COCO/LVIS annotation file and build per-image box targets.

    Boxes are converted from COCO xywh to xyxy and clipped to the image. Dropped annotations are
    counted in ``dataset.dropped`` under the reasons in ``DROP_REASONS``.
    """
    path = str(annotations)
    with gc_paused():
        raw = _read_bytes(path)
        sha = hashlib.sha256(raw).hexdigest()
        data = _parse(path, raw, fast=True)
        del raw  # not held while the records are built: the peak is the parsed objects
        try:
            return _dataset(path, str(images_dir), data, sha, fast=True)
        except CachedetError:
            # the message as json's reading gives it, whatever the fast parser made of the text
            data = _parse(path, _read_bytes(path))
            return _dataset(path, str(images_dir), data, sha, fast=False)


def _dataset(path: str, images_dir: str, data: dict, sha: str, fast: bool) -> DetectionDataset:
    """``load_detection_dataset`` of parsed ``data``. ``fast``: the annotations are checked over
    whole arrays (``_fast_annotations``) where they need no per-annotation error message."""
    chk = _Checker(path)

    categories = []
    check_category_count(len(chk.list_field(data, "categories")), f"{path}: categories")
    for i, c in enumerate(chk.list_field(data, "categories")):
        c = chk.item(f"categories[{i}]", c)
        cid = chk.int_field(f"categories[{i}]", c, "id")
        name = c.get("name")
        if not isinstance(name, str):
            chk.fail(f"categories[{i}].name", f"expected a string, got {name!r}")
        freq = c.get("frequency")
        if freq is not None and freq not in ("r", "c", "f"):
            chk.fail(f"categories[{i}].frequency", f"expected 'r', 'c' or 'f', got {freq!r}")
        categories.append({"id": cid, "name": name, "frequency": freq})
    if not categories:
        chk.fail("categories", "no categories")
    chk.unique_ids("categories", [c["id"] for c in categories])
    cmap = CategoryMap.from_json(categories)
    is_lvis = any(c["frequency"] for c in categories)

    images: dict[int, dict] = {}
    by_name: dict[str, int] = {}  # normalised file_name -> the image id that keeps it
    duplicate_of: dict[int, int] = {}  # dropped image id -> the id kept for the same file
    dropped_images = Counter({"duplicate": 0})
    for i, img in enumerate(chk.list_field(data, "images")):
        where = f"images[{i}]"
        img = chk.item(where, img)
        iid = chk.int_field(where, img, "id", minimum=0)
        entry = {
            "file_name": _file_name(chk, where, img),
            "width": chk.int_field(where, img, "width", minimum=1),
            "height": chk.int_field(where, img, "height", minimum=1),
        }
        if iid in images:
            if all(images[iid][k] == v for k, v in entry.items()):  # the same entry listed twice
                dropped_images["duplicate"] += 1
                continue
            chk.fail(f"{where}.id", f"ids must be unique; {iid} appears twice, for other files")
        name = os.path.normpath(entry["file_name"].replace("\\", "/"))
        if name in by_name:  # the same file under another id: its views would be duplicates
            duplicate_of[iid] = by_name[name]
            dropped_images["duplicate"] += 1
            continue
        by_name[name] = iid
        images[iid] = {
            **entry,
            "boxes": [],
            "labels": [],
            "ann_ids": [],
            "segmentations": [],
        }
    if not images:
        chk.fail("images", "no images")

    if fast:
        found = _fast_annotations(chk, data["annotations"], images, duplicate_of, cmap)
        if found is not None:
            dropped, records = found
            return DetectionDataset(
                annotation_path=path,
                images_dir=images_dir,
                images=records,
                categories=cmap,
                dropped=dropped,
                dropped_images=dict(dropped_images),
                sha256=sha,
                is_lvis=is_lvis,
                raw=data,
            )
    dropped = Counter({r: 0 for r in DROP_REASONS})
    ann_ids = []
    isfinite = math.isfinite
    for i, ann in enumerate(chk.list_field(data, "annotations")):
        where = f"annotations[{i}]"
        if type(ann) is not dict:
            chk.item(where, ann)
        ann_ids.append(_int_of(chk, where, ann, "id"))
        image_id = _int_of(chk, where, ann, "image_id")
        category_id = _int_of(chk, where, ann, "category_id")
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not set(map(type, bbox)) <= _NUMBER_TYPES
        ):
            chk.fail(f"{where}.bbox", f"expected [x, y, width, height] numbers, got {bbox!r}")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1, True, False):
            chk.fail(f"{where}.iscrowd", f"expected 0 or 1, got {crowd!r}")
        if image_id in duplicate_of:
            dropped["duplicate_image"] += 1
            continue
        if image_id not in images:
            dropped["unknown_image"] += 1
            continue
        if category_id not in cmap:
            dropped["unknown_category"] += 1
            continue
        if crowd:
            dropped["crowd"] += 1
            continue
        x, y, w, h = map(float, bbox)
        if not (isfinite(x) and isfinite(y) and isfinite(w) and isfinite(h)):
            dropped["non_finite"] += 1
            continue
        if w <= 0 or h <= 0:
            dropped["degenerate"] += 1
            continue
        rec = images[image_id]
        x1, y1 = min(max(x, 0.0), rec["width"]), min(max(y, 0.0), rec["height"])
        x2, y2 = min(max(x + w, 0.0), rec["width"]), min(max(y + h, 0.0), rec["height"])
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            dropped["outside_image"] += 1
            continue
        rec["boxes"].append((x1, y1, x2, y2))
        rec["labels"].append(cmap.to_label(category_id))
        rec["ann_ids"].append(ann_ids[-1])
        seg, points = _segmentation(chk, where, ann)
        _check_mask_size(
            chk, where, f"annotation {ann_ids[-1]} of image {image_id}", seg, rec, points
        )
        rec["segmentations"].append(seg)
    chk.unique_ids("annotations", ann_ids)

    records = [
        ImageRecord(
            id=iid,
            file_name=r["file_name"],
            height=r["height"],
            width=r["width"],
            boxes=np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(r["labels"], dtype=np.int64),
            ann_ids=np.asarray(r["ann_ids"], dtype=np.int64),
            segmentations=r["segmentations"],
        )
        for iid, r in sorted(images.items())
    ]
    return DetectionDataset(
        annotation_path=path,
        images_dir=images_dir,
        images=records,
        categories=cmap,
        dropped=dict(dropped),
        dropped_images=dict(dropped_images),
        sha256=sha,
        is_lvis=is_lvis,
        raw=data,
    )
