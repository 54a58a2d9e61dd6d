"""A projected store's map (``ExtractConfig.project``): fitted once per store on a seeded sample of
its own views, before any shard runs, or taken from the store being resumed or updated.

The sample: min(256, V) views drawn without replacement from the whole store (seed
``augment.seed``), decoded, augmented and pasted exactly as their shards will be, through the same
frozen backbone on the extraction device; per level, at most 4096 positions inside each view's
unpadded area (``cachedet.backbones.projection.ProjectionFit``).
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from cachedet.backbones.backbone import Backbone, BackboneConfig
from cachedet.backbones.projection import (
    SAMPLE_VIEWS,
    Projection,
    ProjectionFit,
    kept_channels,
    store_projection,
)
from cachedet.cache.header import FINGERPRINT_BACKBONE_KEYS
from cachedet.cache.store import StoreIndex, open_header
from cachedet.core.errors import CachedetError
from cachedet.data.images import ViewDataset
from cachedet.extraction.shards import _collate, forward, load_backbone


def header_entry(projection: Projection, raw_specs, request, seed: int) -> dict:
    """The header's ``projection``: the request, the sample, the digest, and per level of the
    backbone its channels C, the directions k kept (k = C: stored as is) and the share of the
    sample's variance they hold."""
    arrays, energy = projection.arrays(), projection.info.get("energy", {})
    return {
        "request": request,
        "seed": int(seed),
        "sample_views": int(projection.info.get("sample_views", 0)),
        "sha256": projection.sha256,
        "levels": {
            s.name: {
                "channels": s.channels,
                "k": int(arrays[s.name][1].shape[0]) if s.name in arrays else s.channels,
                "energy": float(energy.get(s.name, 1.0)),
            }
            for s in raw_specs
        },
    }


def reusable(out: str, request, seed: int, identity: dict) -> tuple[Projection, dict] | None:
    """The projection of the store already at ``out`` when it was made for the same request and
    seed on the backbone of ``identity`` (a resume or ``update`` keeps the map its shards were
    written with); None otherwise (a new fit; a store of another configuration is then refused
    by the header check)."""
    try:
        header = open_header(out)
    except CachedetError:
        return None
    entry = header.projection
    if entry is None or entry.get("request") != request or entry.get("seed") != seed:
        return None
    if any(header.backbone.get(k) != identity.get(k) for k in FINGERPRINT_BACKBONE_KEYS):
        return None
    arrays = StoreIndex(out).projection_arrays()
    energy = {n: v["energy"] for n, v in entry["levels"].items()}
    return Projection(arrays, {"energy": energy}), entry


def fit_projection(
    backbone: Backbone,
    views: list,
    paths: list[str],
    pastes: list,
    request,
    seed: int,
    batch_size: int,
    loader_workers: int = 0,
    progress=None,
) -> Projection | None:
    """Fit the projection of ``request`` (``parse_request`` form) on a seeded sample of the store's
    views (``views``/``paths``/``pastes`` in store order) through ``backbone`` (on its device);
    None when it keeps every channel of every level. Unreadable sample images are left out."""
    keep = kept_channels(request, backbone.specs)
    if all(keep[s.name] == s.channels for s in backbone.specs):
        return None
    n = len(views)
    pick = np.sort(np.random.default_rng(seed).choice(n, min(SAMPLE_VIEWS, n), replace=False))
    sample = [views[i] for i in pick]
    dataset = ViewDataset(
        sample,
        [paths[i] for i in pick],
        backbone.mean,
        backbone.std,
        skip_bad=True,
        pastes=[pastes[i] for i in pick],
    )
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=loader_workers, collate_fn=_collate
    )
    fit = ProjectionFit(
        keep,
        {s.name: s.channels for s in backbone.specs},
        {s.name: s.stride for s in backbone.specs},
        seed,
    )
    done = 0
    for images, errors, _ in loader:
        feats = forward(backbone, images)
        ok = [i for i, e in enumerate(errors) if not e]
        if ok:
            fit.add(
                {k: v[ok] for k, v in feats.items()},
                [sample[done + i].valid_size for i in ok],
            )
        done += len(errors)
        if progress:
            progress(len(errors))
    return fit.result()


def projection_for(
    cfg,
    backbone_cfg: BackboneConfig,
    backbone: Backbone,
    plan,
    progress: bool,
    loader_workers: int = 0,
) -> tuple[Projection | None, dict | None, Backbone | None]:
    """(projection, its header entry, the device backbone it was fitted with or None) for
    ``cfg.project`` (an ``ExtractConfig``; ``plan`` its ``ViewPlan``, ``loader_workers`` the decode
    processes of the fit); the projection is set on ``backbone`` (so its specs are the stored ones). A
    store being resumed, updated or repaired keeps its own map when made for the same request."""
    from cachedet.core.progress import ViewProgress

    if cfg.projection is not None:  # another store's map, as it is
        projection, entry = store_projection(
            cfg.projection, backbone.identity, "ExtractConfig.projection"
        )
        backbone.set_projection(projection)
        return projection, entry, None
    if cfg.project is None:
        return None, None, None
    raw_specs = list(backbone.specs)
    seed = cfg.augment.seed
    found = None if cfg.overwrite else reusable(cfg.out, cfg.project, seed, backbone.identity)
    fitted_on = None
    if found is not None:
        projection, entry = found
    else:
        fitted_on = load_backbone(backbone_cfg, cfg.device)
        sample = min(SAMPLE_VIEWS, len(plan.views))
        with ViewProgress("fit projection", sample, enabled=progress) as bar:
            projection = fit_projection(
                fitted_on,
                plan.views,
                plan.paths,
                plan.pastes,
                cfg.project,
                seed,
                cfg.batch_size,
                loader_workers,
                progress=bar.advance,
            )
        if projection is None:  # every level keeps all its channels: a plain store
            return None, None, fitted_on
        entry = header_entry(projection, raw_specs, cfg.project, seed)
    backbone.set_projection(projection)
    return projection, entry, fitted_on
