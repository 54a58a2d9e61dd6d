"""Ground truth as the reference scorers read it, checked when the file is loaded.

pycocotools' COCOeval and the ``lvis`` package's LVISEval read fields that the formats make
optional, or that only some versions of a file carry, and fail with a KeyError deep inside
scoring, after every prediction was made. ``scoring_ground_truth`` settles each such field up
front: defaulted where the format allows it, refused in one line naming the field where not.

Defaults (COCO and LVIS):
  annotations[].area      the segmentation's area (pycocotools.mask.area), else the box area w x h
  annotations[].iscrowd   0
  info                    {}
LVIS only (the federated fields, per image):
  images[].neg_category_ids             []  (no verified-absent categories: false positives of
                                            categories not in the image are then not counted)
  images[].not_exhaustive_category_ids  []
Renumbered: annotations[].id becomes 1, 2, ... in file order, so metrics never depend on how a tool
numbered the file (pycocotools' matcher and LVISEval take annotation id 0 as "unmatched", and
duplicated ids collide in their indexes).
Refused: an LVIS file where only some categories have ``frequency`` (APr/APc/APf need all), and
fields of the wrong type.
"""

from __future__ import annotations

import copy

from cachedet.core.errors import CachedetError

LVIS_IMAGE_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")


def _area(ann: dict, height: int | None, width: int | None) -> float:
    seg = ann.get("segmentation")
    if seg and height and width:
        from pycocotools import mask as mask_utils

        if isinstance(seg, list):
            rles = mask_utils.frPyObjects(seg, height, width)
            return float(mask_utils.area(mask_utils.merge(rles)))
        if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            return float(mask_utils.area(mask_utils.frPyObjects(seg, height, width)))
        if isinstance(seg, dict):
            return float(mask_utils.area(seg))
    _, _, w, h = ann["bbox"]
    return float(w * h)


def _int_list(path: str, where: str, value) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise CachedetError(f"{path}: {where}: expected a list of category ids, got {value!r:.60}")
    return value


def scoring_ground_truth(data: dict, path: str, is_lvis: bool) -> dict:
    """A copy of an already validated annotation file (``cachedet.data.coco``) with every field the
    reference scorers read present (module docstring). Raises CachedetError naming the field."""
    data = copy.deepcopy(data)
    if not isinstance(data.get("info", {}), dict):
        data["info"] = {}
    data.setdefault("info", {})
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in data["images"]}
    for i, ann in enumerate(data.get("annotations", [])):
        ann["id"] = i + 1  # the scorers' matchers use id 0 as "unmatched"
        ann.setdefault("iscrowd", 0)
        area = ann.get("area")
        if area is None:
            try:
                ann["area"] = _area(ann, *sizes.get(ann.get("image_id"), (None, None)))
            except (ValueError, TypeError, KeyError) as e:
                raise CachedetError(
                    f"{path}: annotations[{i}].area: missing, and the segmentation gives none ({e})"
                ) from None
        elif isinstance(area, bool) or not isinstance(area, (int, float)):
            raise CachedetError(
                f"{path}: annotations[{i}].area: expected a number, got {area!r:.60}"
            )
    if is_lvis:
        missing = [i for i, c in enumerate(data["categories"]) if not c.get("frequency")]
        if missing:
            raise CachedetError(
                f"{path}: categories[{missing[0]}].frequency: missing in {len(missing)} of "
                f"{len(data['categories'])} categories; LVIS needs 'r', 'c' or 'f' for every category"
            )
        for i, img in enumerate(data["images"]):
            for key in LVIS_IMAGE_LISTS:
                img[key] = _int_list(path, f"images[{i}].{key}", img.get(key, []))
    return data
