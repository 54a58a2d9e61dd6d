"""Feeding cached features to training: view choice per epoch, shard-block reads, shuffling.

View policy: every epoch, each image contributes ``views_per_epoch`` of its K cached views
(default 1), drawn without replacement by a generator seeded with (seed, epoch). Over many
epochs the heads see all K views of every image, in a different order each time.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cachedet.cache.schema import decode
from cachedet.cache.store import FeatureStore
from cachedet.errors import CachedetError


def choose_epoch_views(image_ids: np.ndarray, usable: np.ndarray, views_per_epoch: int, seed: int, epoch: int) -> np.ndarray:
    """Sorted view indices used in ``epoch``: ``views_per_epoch`` usable views of every image."""
    rng = np.random.default_rng([seed, epoch, 17])
    ids = image_ids[usable]
    order = np.argsort(ids, kind="stable")
    groups = np.split(usable[order], np.flatnonzero(np.diff(ids[order])) + 1) if len(usable) else []
    chosen = []
    for views in groups:
        k = min(views_per_epoch, len(views))
        chosen.extend(rng.choice(views, size=k, replace=False).tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


def shard_blocks(views: np.ndarray, shard_views: int) -> list[np.ndarray]:
    """Split sorted view indices into blocks that each lie inside one shard."""
    if not len(views):
        return []
    shard = views // shard_views
    return np.split(views, np.flatnonzero(np.diff(shard)) + 1)


def rank_blocks(blocks: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """The disjoint share of shard blocks read by one distributed rank."""
    return blocks[rank::world]


class CachedViews(IterableDataset):
    """Samples dict(features {level: float32 (C, H, W)}, boxes (N, 4), labels (N,), view int).

    The store is opened lazily inside each DataLoader worker (never shared across a fork).
    Each worker reads whole shard blocks (one zarr call per level per block), and a shuffle
    buffer mixes views across blocks. Call ``set_epoch`` before iterating each epoch.
    """

    def __init__(self, url: str, views_per_epoch: int = 1, seed: int = 0, shuffle_buffer: int = 256,
                 rank: int = 0, world: int = 1, keep_float16: bool = False):
        self.url, self.views_per_epoch, self.seed = url, views_per_epoch, seed
        self.shuffle_buffer, self.rank, self.world, self.keep_float16 = shuffle_buffer, rank, world, keep_float16
        self.epoch = 0
        store = FeatureStore(url)  # validated once here; workers reopen it
        self.header, self.specs = store.header, store.specs
        self._image_ids, self._usable = store.meta["image_id"], store.usable_views()
        self._shard_views = store.shard_views
        if not len(self._usable):
            raise CachedetError(f"{url}: no complete shard to train from (run cachedet extract to finish it)")
        self._store = None

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def blocks_for(self, rank: int, epoch: int | None = None) -> list[np.ndarray]:
        chosen = choose_epoch_views(self._image_ids, self._usable, self.views_per_epoch, self.seed,
                                    self.epoch if epoch is None else epoch)
        return rank_blocks(shard_blocks(chosen, self._shard_views), rank, self.world)

    def views_per_rank(self, epoch: int | None = None) -> list[int]:
        return [sum(len(b) for b in self.blocks_for(r, epoch)) for r in range(self.world)]

    def __len__(self) -> int:
        return self.views_per_rank()[self.rank]

    def _read_block(self, block: np.ndarray):
        if self._store is None:
            self._store = FeatureStore(self.url)
        store = self._store
        feats = {}
        for spec in self.specs:
            arr = store.features_array(spec.name)
            stored = arr.get_orthogonal_selection((block,)) if len(block) > 1 else arr[block[0]:block[0] + 1]
            feats[spec.name] = stored
        for i, view in enumerate(block.tolist()):
            boxes, labels = store.boxes(view)
            sample_feats = {}
            for name, stored in feats.items():
                x = torch.from_numpy(decode(stored[i], store.dtype))
                sample_feats[name] = x.half() if self.keep_float16 else x
            yield {"features": sample_feats, "boxes": torch.from_numpy(boxes.copy()),
                   "labels": torch.from_numpy(labels.copy()), "view": view}

    def __iter__(self):
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        blocks = self.blocks_for(self.rank)
        # the block order is shared by all workers of a rank, so their shares are disjoint
        order = np.random.default_rng([self.seed, self.epoch, self.rank]).permutation(len(blocks))
        mine = [blocks[i] for i in order[wid::nworkers]]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid, 1])
        buffer = []
        for block in mine:
            for sample in self._read_block(block):
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))


class InMemoryViews:
    """All usable views of a store loaded once into RAM (float16), batched without a DataLoader."""

    def __init__(self, url: str, views_per_epoch: int = 1, seed: int = 0, rank: int = 0, world: int = 1):
        store = FeatureStore(url)
        self.header, self.specs = store.header, store.specs
        self.views_per_epoch, self.seed, self.rank, self.world = views_per_epoch, seed, rank, world
        self._image_ids, self._usable = store.meta["image_id"], store.usable_views()
        self._shard_views = store.shard_views
        if not len(self._usable):
            raise CachedetError(f"{url}: no complete shard to train from (run cachedet extract to finish it)")
        data = store.read_features(0, store.num_views)
        self.features = {k: torch.from_numpy(v).half() for k, v in data.items()}  # half the RAM of float32
        self.targets = [tuple(torch.from_numpy(a.copy()) for a in store.boxes(v)) for v in range(store.num_views)]
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def views_per_rank(self, epoch: int | None = None) -> list[int]:
        return [len(self._rank_views(r, epoch)) for r in range(self.world)]

    def _rank_views(self, rank: int, epoch: int | None = None) -> np.ndarray:
        chosen = choose_epoch_views(self._image_ids, self._usable, self.views_per_epoch, self.seed,
                                    self.epoch if epoch is None else epoch)
        blocks = rank_blocks(shard_blocks(chosen, self._shard_views), rank, self.world)
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)

    def __iter__(self):
        views = self._rank_views(self.rank)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        for view in views[rng.permutation(len(views))].tolist():
            boxes, labels = self.targets[view]
            yield {"features": {k: v[view].float() for k, v in self.features.items()},
                   "boxes": boxes, "labels": labels, "view": view}

    def __len__(self) -> int:
        return self.views_per_rank()[self.rank]


def collate_views(samples: list[dict]) -> dict:
    """Stack features per level -> (B, C, H, W); targets stay a list (ragged)."""
    names = samples[0]["features"].keys()
    return {
        "inputs": {k: torch.stack([s["features"][k] for s in samples]) for k in names},
        "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples],
        "views": [s["view"] for s in samples],
    }
