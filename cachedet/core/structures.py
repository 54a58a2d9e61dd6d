"""Small value types shared by every stage."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cachedet.core.errors import CachedetError

# The most categories a dataset, store or detector may have. A head's class layers grow with the
# count (Faster R-CNN's box regression alone holds 4 x 1024 float32 weights per class: 1.6 GB at
# this bound), and the largest public vocabularies are far below it (LVIS 1,203; V3Det 13,204).
MAX_CATEGORIES = 100_000


def check_category_count(count: int, where: str) -> None:
    """Raise CachedetError ``<where>: N categories, more than the 100000 ...`` above
    ``MAX_CATEGORIES`` (before anything is allocated for them)."""
    if count > MAX_CATEGORIES:
        raise CachedetError(
            f"{where}: {count} categories, more than the {MAX_CATEGORIES} cachedet supports (a "
            "detection head's class layers grow with the count); merge or drop categories"
        )


@dataclass(frozen=True)
class FeatureSpec:
    """One pyramid level of a backbone, declared by the backbone (never inferred).

    name: ``c{log2(stride)}`` for a CNN level, e.g. ``c3`` for stride 8; ``b{block}`` for a ViT tap
    (every tap of a plain ViT has the same stride), e.g. ``b11``. channels: C. stride: pixels per cell.
    """

    name: str
    channels: int
    stride: int

    @staticmethod
    def level_name(stride: int) -> str:
        return f"c{int(round(math.log2(stride)))}"

    @staticmethod
    def tap_name(block: int) -> str:
        return f"b{int(block)}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(name=str(d["name"]), channels=int(d["channels"]), stride=int(d["stride"]))


@dataclass(frozen=True)
class ViewParams:
    """How one augmented view was made from one image (all integers are pixels).

    The image (orig_size = (H, W)) is resized to resized_size = (h, w), flipped horizontally
    if ``flip``, then the square canvas x canvas window whose top-left corner is crop_offset
    = (top, left) is taken; where the window leaves the resized image it is zero-padded.
    """

    image_id: int
    view_index: int
    orig_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_offset: tuple[int, int]
    flip: bool
    canvas: int

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): resized / original size along each axis."""
        return (self.resized_size[0] / self.orig_size[0], self.resized_size[1] / self.orig_size[1])

    @property
    def valid_size(self) -> tuple[int, int]:
        """(h, w) of the top-left part of the canvas covered by the image; the rest is padding."""
        h = max(0, min(self.canvas, self.resized_size[0] - self.crop_offset[0]))
        w = max(0, min(self.canvas, self.resized_size[1] - self.crop_offset[1]))
        return (h, w)


def targets_of(samples: list[dict]) -> list[dict]:
    """Per sample dict(boxes (N, 4) xyxy canvas pixels, labels (N,)[, masks uint8 (N, S, S)]): the
    ragged targets of a batch, whether its samples come from the cache or from online views."""
    return [{k: s[k] for k in ("boxes", "labels", "masks") if k in s} for s in samples]
