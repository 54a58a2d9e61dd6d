"""``EvalSet``: a validation file's images (or store) and scoring ground truth, for ``cachedet eval``
and for validation during training alike.

Everything that can refuse the set is done on construction, before any prediction (or, during
training, before the first step): the file is read and validated, its ground truth prepared for the
scorers (annotation ids renumbered, LVIS fields kept), the store (if any) checked against the file;
``evaluator`` then checks the categories against the run's by id and name.
"""

from __future__ import annotations

import os

from cachedet.cache.store import StoreReader
from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.data.scan import scan_images
from cachedet.evaluation.evaluator import DetectionEvaluator, inference_on_dataset
from cachedet.evaluation.ground_truth import scoring_ground_truth
from cachedet.evaluation.scoring import DEFAULT_COUNT_BINS


class EvalSet:
    """The validation set of ``annotations`` (COCO/LVIS JSON), predicted from ``images`` (a folder)
    or from ``cache`` (a ``--no-augment --views 1`` store extracted from the same file).

    ``prefix`` names the fields in errors: ``EvalConfig.`` for eval (the CLI shows ``--images``),
    ``val.`` for validation during training (``--val-images``). Images are scanned (each header
    opened once, ``cachedet.data.scan``; ``progress``: a bar for large sets) before anything else.
    Raises CachedetError naming the field for a missing file or folder, an invalid annotation file, a
    missing, unreadable or wrongly sized image, or a store extracted from another file.
    """

    def __init__(
        self,
        annotations: str,
        images: str | None = None,
        cache: str | None = None,
        prefix: str = "EvalConfig.",
        progress: bool = False,
    ):
        self.prefix, self.annotations = prefix, annotations
        if images is not None and not os.path.isdir(images):
            raise CachedetError(f"{prefix}images {images}: no such folder")
        if not os.path.exists(annotations):
            raise CachedetError(f"{prefix}annotations {annotations}: no such file")
        self.dataset = load_detection_dataset(annotations, images or os.path.dirname(annotations))
        self.ground_truth = scoring_ground_truth(
            self.dataset.raw, annotations, self.dataset.is_lvis
        )
        self.store = self.items = None
        if cache is not None:
            self.store = StoreReader(cache)
            self.store.header.check_dataset(
                self.dataset.sha256, f"{prefix}cache {cache}", annotations
            )
        else:  # every image there and as annotated, before any model is built
            scan_images(self.dataset, f"{prefix}images", progress=progress)
            self.items = [
                (r.id, self.dataset.image_path(r), (r.height, r.width)) for r in self.dataset.images
            ]

    @property
    def num_images(self) -> int:
        return len(self.dataset.images)

    @property
    def is_lvis(self) -> bool:
        return self.dataset.is_lvis

    @property
    def source(self) -> str:
        return "cache" if self.store is not None else "images"

    def evaluator(
        self,
        categories: dict[int, str],
        masks: bool,
        train_counts=None,
        count_bins: tuple[int, ...] = DEFAULT_COUNT_BINS,
        backend: str = "pycocotools",
    ) -> DetectionEvaluator:
        """A DetectionEvaluator for a run predicting ``categories`` ({category id: name}), after
        checking that the file has the same categories (by id and name). ``masks``: the run
        predicts masks (scored as segm when the file has segmentations); ``backend``: the COCO
        scorer (``DetectionEvaluator``)."""
        check_categories(
            self.dataset.raw["categories"],
            categories,
            f"{self.prefix}annotations {self.annotations}",
        )
        return DetectionEvaluator(
            self.ground_truth,
            categories,
            masks=masks and self.dataset.has_masks,
            lvis=self.dataset.is_lvis,
            train_counts=train_counts,
            count_bins=tuple(count_bins),
            backend=backend,
        )

    def check(self, predictor) -> None:
        """Refuse a store that does not fit the predictor's run, before any prediction."""
        if self.store is not None:
            predictor.check_store(self.store, option=f"{self.prefix}cache")

    def batches(self, predictor, batch_size: int = 8):
        """(images in the batch, their COCO results) over the whole set."""
        if self.store is not None:
            return predictor.iter_store(
                self.store, batch_size=batch_size, option=f"{self.prefix}cache"
            )
        return predictor.iter_images(self.items, batch_size=batch_size)

    def score(self, predictor, evaluator: DetectionEvaluator, batch_size=8, on_images=None):
        """Predict the whole set and score it (``inference_on_dataset``): the evaluator's metrics."""
        return inference_on_dataset(
            self.batches(predictor, batch_size), evaluator, on_images=on_images
        )


def check_categories(categories: list[dict], ours: dict[int, str], where: str) -> None:
    """Refuse a validation file whose categories are not the run's ``ours`` ({id: name}), compared by
    id AND name (the order of the table does not matter). Raises CachedetError listing the id->name
    pairs that differ."""
    theirs = {int(c["id"]): str(c.get("name", "")) for c in categories}
    if set(theirs) != set(ours):
        raise CachedetError(
            f"{where}: categories differ from the run's ({len(theirs)} vs {len(ours)}); "
            "evaluate on a file with the training categories"
        )
    differ = [(cid, ours[cid], theirs[cid]) for cid in sorted(ours) if ours[cid] != theirs[cid]]
    if differ:
        pairs = ", ".join(f"{cid}: run {a!r} vs file {b!r}" for cid, a, b in differ[:10])
        more = f" and {len(differ) - 10} more" if len(differ) > 10 else ""
        raise CachedetError(
            f"{where}: category names differ from the run's for {len(differ)} ids ({pairs}{more}); "
            "evaluate on a file with the training categories"
        )
