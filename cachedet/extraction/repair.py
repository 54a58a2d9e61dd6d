"""``cachedet cache repair``: mend a store from its own header.

A store's header records everything its views depend on (annotation file and its sha256, image
folder, backbone, augmentation and seed, views, storage), and views are deterministic functions
of those, so damaged or missing shards, and damaged box or metadata arrays, can be recomputed
bit for bit by ``extract`` with ``repair`` set. A store whose header is lost cannot be: that is
one line saying it must be rebuilt.
"""

from __future__ import annotations

import hashlib
import os

from cachedet.backbones.backbone import BackboneConfig
from cachedet.cache.header import StoreHeader
from cachedet.cache.store import open_header
from cachedet.core.errors import CachedetError
from cachedet.core.paths import resolve_path
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import ExtractConfig, ExtractResult, extract


def config_from_header(
    url: str,
    header: StoreHeader,
    annotations: str | None = None,
    images: str | None = None,
    **options,
) -> ExtractConfig:
    """The ``ExtractConfig`` that made the store at ``url`` (with ``repair`` set), from its header;
    ``annotations`` / ``images`` replace the recorded paths (a moved dataset). ``options``: run
    settings that do not change the stored bytes (device, batch_size, workers, skip_bad...)."""
    identity = header.hybrid.backbone if header.hybrid is not None else header.backbone
    augment = dict(header.augment)
    augment["scale_range"] = tuple(augment["scale_range"])
    return ExtractConfig(
        annotations=annotations or header.dataset["annotations"],
        images=images or header.dataset["images_dir"],
        out=url,
        backbone=BackboneConfig(
            identity["name"], tuple(identity["out_indices"]), identity["weights"]
        ),
        augment=AugmentConfig(**augment),
        views=header.views,
        dtype=header.storage.dtype,
        codec=header.storage.codec,
        shard_views=header.storage.shard_views,
        cache_stage=header.hybrid.cache_stage if header.hybrid is not None else None,
        masks=header.masks is not None,
        recipe=header.recipe,
        projection=url if header.projection is not None else None,  # the store's own map
        repair=True,
        **options,
    )


def _check_annotations(url: str, header: StoreHeader, path: str, given: bool) -> None:
    """Refuse, before any work, an annotation file that is not there or is not the one the store
    was extracted from (its views could not be recomputed)."""
    option = "--annotations" if given else "recorded in its header"
    if not os.path.isfile(path):
        raise CachedetError(
            f"{path}: annotation file not found ({option}); `cachedet cache repair {url} "
            "--annotations FILE --images DIR` names where the store's dataset is now"
        )
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    header.check_dataset(sha, url, f"{path} ({option}); repair needs the original file")


def repair(
    url: str,
    annotations: str | None = None,
    images: str | None = None,
    progress: bool = True,
    **options,
) -> ExtractResult:
    """Verify the store at ``url`` and recompute what is damaged or missing: shards whose features,
    masks or rows fail their completion record (or cannot be read), unfinished shards, and box or
    metadata arrays that cannot be read or differ from the annotation file's plan.

    Raises StoreDamaged (one line) when the header itself is lost, CachedetError when the
    annotation file is missing or is another file than the store's.
    """
    url = resolve_path(url)
    header = open_header(url)
    cfg = config_from_header(url, header, annotations, images, **options)
    _check_annotations(url, header, cfg.annotations, annotations is not None)
    return extract(cfg, progress=progress)
