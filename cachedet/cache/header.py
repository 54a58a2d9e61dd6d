"""Typed contracts between stages: a store's header (``StoreHeader``) and what a trained head
depends on (``Fingerprint``). Every compatibility check goes through ``differences``.

``StoreHeader`` is the only way code reads a store's header. ``to_dict`` gives exactly the JSON
that ``zarr.json`` holds under ``attrs["cachedet"]`` (same keys, same order), so stores written
before these types existed open unchanged and new stores are byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cachedet.cache.schema import FORMAT, SCHEMA_VERSION
from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec
from cachedet.data.coco import CategoryMap

# Parts of the header that must match for a rerun to resume into an existing store.
IDENTITY_KEYS = (
    "backbone",
    "feature_specs",
    "dataset_sha256",
    "augment",
    "views",
    "storage",
    "hybrid",
    "masks",
    "projection",
)
# What a trained head depends on from its backbone's identity.
FINGERPRINT_BACKBONE_KEYS = ("name", "out_indices", "weights_sha256", "mean", "std")


def _is_specs(v) -> bool:
    return bool(v) and all(
        isinstance(x, dict) and {"name", "channels", "stride"} <= set(x) for x in v
    )


def _is_categories(v) -> bool:
    return bool(v) and all(isinstance(x, dict) and set(x) == {"id", "name"} for x in v)


def readable(value) -> str:
    """A value as a difference line shows it: whole (hashes are never cut), feature specs as
    ``c3 64ch/8``, a category list as ``2 categories: 1 'cat', 2 'dog'`` (the first 8)."""
    if isinstance(value, list | tuple) and _is_specs(value):
        return "[" + ", ".join(f"{s['name']} {s['channels']}ch/{s['stride']}" for s in value) + "]"
    if isinstance(value, list | tuple) and _is_categories(value):
        shown = ", ".join(f"{c['id']} {c['name']!r}" for c in value[:8])
        more = ", …" if len(value) > 8 else ""
        return f"{len(value)} categor{'y' if len(value) == 1 else 'ies'}: {shown}{more}"
    return repr(value)


def differences(found, wanted, prefix: str = "", found_label: str = "store") -> list[str]:
    """Human-readable differences between two JSON-like values, one line each:
    ``<dotted.field>: <found_label> has <found>, asked for <wanted>``. Dicts, and lists of dicts of
    one length, are compared item by item (``categories[3].name``); values are shown whole
    (``readable``)."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        out = []
        for k in sorted(set(found) | set(wanted), key=str):
            field_name = f"{prefix}.{k}" if prefix else str(k)
            out += differences(found.get(k), wanted.get(k), field_name, found_label)
        return out
    pairs = (
        isinstance(found, list | tuple)
        and isinstance(wanted, list | tuple)
        and len(found) == len(wanted)
        and all(isinstance(x, dict) for x in (*found, *wanted))
    )
    if pairs and found != wanted:
        out = []
        for i, (a, b) in enumerate(zip(found, wanted)):
            out += differences(a, b, f"{prefix}[{i}]", found_label)
        return out
    if found != wanted:
        return [f"{prefix}: {found_label} has {readable(found)}, asked for {readable(wanted)}"]
    return []


def _specs(items: list[dict]) -> tuple[FeatureSpec, ...]:
    return tuple(FeatureSpec.from_dict(s) for s in items)


@dataclass(frozen=True)
class Storage:
    """How features are stored: dtype (``schema.DTYPES``), codec (``schema.CODECS``), views per shard."""

    dtype: str
    codec: str
    shard_views: int

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "codec": self.codec, "shard_views": self.shard_views}

    @classmethod
    def from_dict(cls, d: dict) -> "Storage":
        return cls(dtype=str(d["dtype"]), codec=str(d["codec"]), shard_views=int(d["shard_views"]))


@dataclass(frozen=True)
class MaskInfo:
    """The store's instance masks: their format (``schema.MASK_FORMAT``), how many objects, and how
    many of those had no segmentation and are stored as their box."""

    format: str
    objects: int
    objects_from_boxes: int

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "objects": self.objects,
            "objects_from_boxes": self.objects_from_boxes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MaskInfo":
        return cls(
            format=str(d["format"]),
            objects=int(d["objects"]),
            objects_from_boxes=int(d["objects_from_boxes"]),
        )


@dataclass(frozen=True)
class Hybrid:
    """A hybrid cache stops after backbone stage ``cache_stage``; ``backbone`` is the identity of
    the whole backbone and ``specs`` its pyramid (the levels the model ends up with)."""

    cache_stage: int
    backbone: dict
    specs: tuple[FeatureSpec, ...]

    def to_dict(self) -> dict:
        return {
            "cache_stage": self.cache_stage,
            "backbone": self.backbone,
            "feature_specs": [s.to_dict() for s in self.specs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Hybrid":
        return cls(
            cache_stage=int(d["cache_stage"]),
            backbone=d["backbone"],
            specs=_specs(d["feature_specs"]),
        )


@dataclass(frozen=True)
class Fingerprint:
    """What a trained head depends on: its input features (specs, backbone weights, canvas in
    pixels) and its classes. Saved in every run's config and checkpoint as ``to_dict()``."""

    specs: tuple[FeatureSpec, ...]
    backbone: dict  # FINGERPRINT_BACKBONE_KEYS of the backbone's identity
    canvas: int
    categories: tuple[tuple[int, str], ...]  # (dataset category id, name), in label order
    # a projected store's map ({"sha256", "k": {level: k}}, ``Projection.fingerprint``), or None
    projection: dict | None = None

    @classmethod
    def of(
        cls,
        specs,
        backbone_identity: dict,
        canvas: int,
        categories: CategoryMap,
        projection: dict | None = None,
    ) -> "Fingerprint":
        return cls(
            specs=tuple(specs),
            backbone={k: backbone_identity[k] for k in FINGERPRINT_BACKBONE_KEYS},
            canvas=int(canvas),
            categories=tuple(zip(categories.ids, categories.names)),
            projection=projection,
        )

    def to_dict(self) -> dict:
        d = {
            "feature_specs": [s.to_dict() for s in self.specs],
            "backbone": dict(self.backbone),
            "canvas": self.canvas,
            "categories": [{"id": i, "name": n} for i, n in self.categories],
        }
        if self.projection is not None:  # absent for unprojected features, as before projections
            d["projection"] = self.projection
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        return cls(
            specs=_specs(d["feature_specs"]),
            backbone=dict(d["backbone"]),
            canvas=int(d["canvas"]),
            categories=tuple((int(c["id"]), str(c["name"])) for c in d["categories"]),
            projection=d.get("projection"),
        )

    def diff(self, wanted: "Fingerprint", found_label: str) -> list[str]:
        """One line per differing field, e.g. ``canvas: checkpoint has 96, asked for 128``."""
        return differences(self.to_dict(), wanted.to_dict(), found_label=found_label)

    def check(self, wanted: "Fingerprint", message: str, found_label: str) -> None:
        """The one compatibility check of features and heads (cache, online source, resume, eval).

        Raises CachedetError ``message: difference; difference…`` (up to 8) when they differ.
        """
        diff = self.diff(wanted, found_label)
        if diff:
            raise CachedetError(f"{message}: " + "; ".join(diff[:8]))


def check_fingerprint(
    found: Fingerprint | dict, wanted: Fingerprint | dict, message: str, found_label: str
):
    """``Fingerprint.check`` for fingerprints given as objects or as their saved dicts."""
    as_fp = lambda f: f if isinstance(f, Fingerprint) else Fingerprint.from_dict(f)  # noqa: E731
    as_fp(found).check(as_fp(wanted), message, found_label)


def check_weights(available: dict, wanted: dict, message: str) -> None:
    """Raise CachedetError(message) unless two backbone identities carry the same weights (sha256)."""
    if available["weights_sha256"] != wanted["weights_sha256"]:
        raise CachedetError(message)


@dataclass(frozen=True)
class StoreHeader:
    """A feature store's header (layout in ``cachedet.cache.schema``).

    backbone: the identity of the backbone that extraction ran (``Backbone.identity``); specs and
    shapes {level: (C, H, W)}: its levels at the canvas; dataset: the annotation file's
    fingerprint (``DetectionDataset.fingerprint``); augment: ``AugmentConfig.to_dict()`` as
    written; views: cached views per image.
    """

    backbone: dict
    specs: tuple[FeatureSpec, ...]
    shapes: dict[str, tuple[int, int, int]]
    dataset: dict
    augment: dict
    views: int
    storage: Storage
    num_views: int
    num_images: int
    cachedet_version: str
    hybrid: Hybrid | None = None
    masks: MaskInfo | None = None
    recipe: str | None = (
        None  # cachedet.core.recipes name the views' settings came from (None: before recipes)
    )
    # a projected store (ExtractConfig.project): {"request", "seed", "sample_views", "sha256",
    # "levels": {level: {"channels", "k", "energy"}}}; its arrays are projection/<level>/*
    projection: dict | None = None
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were

    @property
    def canvas(self) -> int:
        """Side of the square view canvas, in pixels."""
        return int(self.augment["size"])

    @property
    def augmented(self) -> bool:
        """False for a ``--no-augment`` store (one resize-to-fit view per image)."""
        return bool(self.augment["augment"])

    @property
    def dataset_sha256(self) -> str:
        return self.dataset["annotations_sha256"]

    @property
    def num_shards(self) -> int:
        return -(-self.num_views // self.storage.shard_views)

    @property
    def categories(self) -> CategoryMap:
        return CategoryMap.from_json(self.dataset["categories"])

    def fingerprint(self) -> Fingerprint:
        """The fingerprint of heads trained on this store's features as stored."""
        return Fingerprint.of(
            self.specs, self.backbone, self.canvas, self.categories, self.projection_fingerprint
        )

    @property
    def projection_fingerprint(self) -> dict | None:
        """``Projection.fingerprint()`` of a projected store, from its header; None otherwise."""
        if self.projection is None:
            return None
        levels = self.projection["levels"]
        return {
            "sha256": self.projection["sha256"],
            "k": {n: v["k"] for n, v in levels.items() if v["k"] < v["channels"]},
        }

    def data_identity(self) -> dict:
        """What a run trained on this store records of its data, so that a resume on another
        store (re-extracted from other annotations, views, dtype or augmentation) is refused:
        annotation file sha256, images, views per image, views, stored dtype, augmentation,
        hybrid cache stage (and a projection, when a store records one)."""
        d = {
            "annotations_sha256": self.dataset_sha256,
            "images": self.num_images,
            "views_per_image": self.views,
            "views": self.num_views,
            "dtype": self.storage.dtype,
            "augment": self.augment,
            "cache_stage": self.hybrid.cache_stage if self.hybrid is not None else None,
        }
        if self.projection is not None:
            d["projection"] = self.projection["sha256"]
        return d

    def identity(self) -> dict:
        """The parts that must match for a rerun to resume into this store (``IDENTITY_KEYS``)."""
        d = self.to_dict()
        return {k: d.get(k) for k in IDENTITY_KEYS}

    def diff(self, other: "StoreHeader", found_label: str = "store") -> list[str]:
        """One line per differing identity field, e.g.
        ``storage.dtype: store has 'float16', asked for 'uint8'``."""
        return differences(self.identity(), other.identity(), found_label=found_label)

    def check_dataset(self, sha256: str, where: str, annotations: str) -> None:
        """Raise CachedetError unless the store was extracted from the annotation file of ``sha256``."""
        if self.dataset_sha256 != sha256:
            raise CachedetError(
                f"{where}: was extracted from another annotation file than {annotations}; extract "
                "the store again from that file with ExtractConfig.update (it keeps the shards whose "
                "images did not change)"
            )

    def to_dict(self) -> dict:
        d = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "cachedet_version": self.cachedet_version,
            "backbone": self.backbone,
            "feature_specs": [s.to_dict() for s in self.specs],
            "feature_shapes": {k: list(v) for k, v in self.shapes.items()},
            "dataset": self.dataset,
            "dataset_sha256": self.dataset_sha256,
            "augment": self.augment,
            "views": self.views,
            "storage": self.storage.to_dict(),
            "num_views": self.num_views,
            "num_images": self.num_images,
            "num_shards": self.num_shards,
        }
        if self.hybrid is not None:
            d["hybrid"] = self.hybrid.to_dict()
        d["masks"] = self.masks.to_dict() if self.masks is not None else None
        if self.recipe is not None:
            d["recipe"] = self.recipe
        if self.projection is not None:
            d["projection"] = self.projection
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d, where: str) -> "StoreHeader":
        """Parse ``attrs["cachedet"]`` of the store at ``where``.

        Raises CachedetError naming ``where`` for anything that is not a complete cachedet header
        of this schema version.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CachedetError(
                f"{where}: not a cachedet feature store (no 'cachedet' header in its zarr.json)"
            )
        if d.get("schema_version") != SCHEMA_VERSION:
            raise CachedetError(
                f"{where}: schema_version is {d.get('schema_version')!r}, "
                f"this cachedet reads {SCHEMA_VERSION}; re-extract the cache"
            )
        try:
            return cls(
                backbone=d["backbone"],
                specs=_specs(d["feature_specs"]),
                shapes={k: tuple(int(x) for x in v) for k, v in d["feature_shapes"].items()},
                dataset=d["dataset"],
                augment=d["augment"],
                views=int(d["views"]),
                storage=Storage.from_dict(d["storage"]),
                num_views=int(d["num_views"]),
                num_images=int(d["num_images"]),
                cachedet_version=d["cachedet_version"],
                hybrid=Hybrid.from_dict(d["hybrid"]) if d.get("hybrid") else None,
                masks=MaskInfo.from_dict(d["masks"]) if d.get("masks") else None,
                recipe=d.get("recipe"),
                projection=d.get("projection"),
                extra={k: v for k, v in d.items() if k not in _KNOWN_KEYS},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CachedetError(
                f"{where}: malformed cachedet header in its zarr.json ({type(e).__name__}: {e})"
            ) from None


_KNOWN_KEYS = {
    "format",
    "schema_version",
    "cachedet_version",
    "backbone",
    "feature_specs",
    "feature_shapes",
    "dataset",
    "dataset_sha256",
    "augment",
    "views",
    "storage",
    "num_views",
    "num_images",
    "num_shards",
    "hybrid",
    "masks",
    "recipe",
    "projection",
}
