"""Feeding cached features to training: view choice per epoch, shard-block reads, shuffling.

View policy: every epoch, each image contributes ``views_per_epoch`` of its K cached views
(default 1), drawn without replacement by a generator seeded with (seed, epoch). Over many
epochs the heads see all K views of every image, in a different order each time.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from cachedet.cache.schema import decode
from cachedet.cache.store import StoreReader
from cachedet.core.errors import CachedetError
from cachedet.core.runtime import retain_freed_memory
from cachedet.core.structures import targets_of
from cachedet.data.masks import decode_rles


def choose_epoch_views(
    image_ids: np.ndarray, usable: np.ndarray, views_per_epoch: int, seed: int, epoch: int
) -> np.ndarray:
    """Sorted view indices used in ``epoch``: ``views_per_epoch`` usable views of every image."""
    rng = np.random.default_rng([seed, epoch, 17])
    ids = image_ids[usable]
    order = np.argsort(ids, kind="stable")
    cuts = np.flatnonzero(np.diff(ids[order])) + 1
    if np.diff(cuts, prepend=0, append=len(usable)).max(initial=0) <= views_per_epoch:
        return np.sort(usable)  # every image's views all chosen: the draws pick no subset
    groups = np.split(usable[order], cuts) if len(usable) else []
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
    """The disjoint share of shard blocks read by one distributed rank.

    With at least ``world`` blocks, every ``world``-th block; with fewer (a small store in few
    shards), the views are cut into ``world`` contiguous parts of near-equal size (each split at
    shard boundaries), so that every rank gets work as long as there are ``world`` views."""
    if len(blocks) >= world or not blocks:
        return blocks[rank::world]
    views = np.concatenate(blocks)
    part = np.array_split(views, world)[rank]
    if not len(part):
        return []
    shard_of = {int(v): i for i, b in enumerate(blocks) for v in b[:1]}  # first view -> block
    starts = [i for i, v in enumerate(part.tolist()) if i == 0 or v in shard_of]
    return [p for p in np.split(part, starts[1:]) if len(p)]


class _EpochViews:
    """What both feeds share: the store's header and specs, its usable views, and which of them
    one rank reads in one epoch (``choose_epoch_views`` -> shard blocks -> this rank's share)."""

    def __init__(
        self,
        url: str,
        views_per_epoch: int,
        seed: int,
        rank: int,
        world: int,
        masks: bool = False,
        allow_incomplete: bool = False,
    ):
        self.url, self.views_per_epoch, self.seed, self.rank, self.world = (
            url,
            views_per_epoch,
            seed,
            rank,
            world,
        )
        self.epoch = 0
        store = StoreReader(url)
        self.masks = (
            masks and store.has_masks
        )  # instance masks in the targets (when the store has them)
        self.header, self.specs = store.header, store.specs
        records = store.shard_records()  # read once: the usable views and the count of done
        self._image_ids, self._usable, self._shard_views = (
            store.meta["image_id"],
            store.usable_views(records),
            store.shard_views,
        )
        self._chosen: tuple[int, np.ndarray] | None = None  # (epoch, its views), once per epoch
        if not len(self._usable):
            raise CachedetError(
                f"{url}: no complete shard to train from (run cachedet extract to finish it)"
            )
        self.check_finished(store, allow_incomplete, len(records))
        self._opened = store
        if world > 1:
            self.check_layout(url)

    def check_finished(
        self, store: StoreReader, allow_incomplete: bool, done: int | None = None
    ) -> None:
        """Refuse a store whose extraction has not finished (training would silently use a part of
        the data), or with ``allow_incomplete`` say which part it trains on. ``done``: its
        complete shards, counted now when not given."""
        done = len(store.shard_records()) if done is None else done
        total = store.num_shards
        if done >= total:
            return
        what = (
            f"source.cache {store.url}: extraction unfinished ({done} of {total} shards complete, "
            f"{len(self._usable)} of {store.num_views} views)"
        )
        if not allow_incomplete:
            raise CachedetError(
                f"{what}; finish it by rerunning the extract command that made it, or set "
                "loader.allow_incomplete to train on the finished shards"
            )
        if self.rank == 0:
            warnings.warn(f"{what}: training on the finished shards only", stacklevel=2)

    def check_layout(self, url: str) -> None:
        """Refuse up front a distributed layout that leaves a rank without views (it would wait
        for the others forever)."""
        chosen = choose_epoch_views(
            self._image_ids, self._usable, self.views_per_epoch, self.seed, 0
        )
        if len(chosen) < self.world:
            blocks = len(shard_blocks(chosen, self._shard_views))
            raise CachedetError(
                f"source.cache {url}: {len(chosen)} views per epoch in {blocks} shard block(s) "
                f"cannot give each of {self.world} ranks a view; train on at most {len(chosen)} "
                "ranks, or raise loader.views_per_epoch"
            )

    _shared_epoch = None

    @property
    def epoch(self) -> int:
        return self._shared_epoch.value if self._shared_epoch is not None else self._epoch

    @epoch.setter
    def epoch(self, epoch: int):
        self._epoch = epoch
        if self._shared_epoch is not None:
            self._shared_epoch.value = epoch

    def share_epoch(self, context) -> None:
        """Keep the epoch in shared memory (``context``: a multiprocessing context), so that
        persistent DataLoader workers, which keep their copy of this dataset, see ``set_epoch``."""
        self._shared_epoch = context.RawValue("q", self._epoch)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def blocks_for(self, rank: int, epoch: int | None = None) -> list[np.ndarray]:
        epoch = self.epoch if epoch is None else epoch
        if self._chosen is None or self._chosen[0] != epoch:  # drawn once per epoch
            chosen = choose_epoch_views(
                self._image_ids, self._usable, self.views_per_epoch, self.seed, epoch
            )
            self._chosen = (epoch, chosen)
        return rank_blocks(shard_blocks(self._chosen[1], self._shard_views), rank, self.world)

    def views_per_rank(self, epoch: int | None = None) -> list[int]:
        return [sum(len(b) for b in self.blocks_for(r, epoch)) for r in range(self.world)]

    def __len__(self) -> int:
        return self.views_per_rank()[self.rank]


SHUFFLE_BUFFER_BYTES = 1 << 30  # the default shuffle buffer: views as stored, in RAM per worker


def decode_view(
    stored: np.ndarray, quant: np.ndarray | None, dtype: str, keep_float16: bool
) -> torch.Tensor:
    """One view of one level as stored ((1, C, H, W) in ``dtype``; uint8 with its quant params
    (1, C, 2)) -> float32 (C, H, W), or float16 with ``keep_float16`` (a float16 store's view is
    then handed out as stored, without a copy)."""
    if keep_float16 and dtype == "float16":
        return torch.from_numpy(stored[0])
    x = torch.from_numpy(decode(stored, dtype, quant)[0])
    return x.half() if keep_float16 else x


class CachedViews(_EpochViews, IterableDataset):
    """Samples dict(features {level: float32 (C, H, W)}, boxes (N, 4), labels (N,), view int), and
    with ``masks`` masks uint8 (N, S, S).

    The store is opened lazily inside each DataLoader worker (never shared across a fork).
    Each worker reads whole shard blocks (one zarr call per level per block), and a shuffle
    buffer of ``shuffle_buffer`` views mixes views across blocks. The buffer holds each view as
    stored (float16 / bfloat16 / uint8: a half or a quarter of float32), copied out of its block so
    that the block is freed once read, and decodes it as it is handed out. By default it holds as many views as fit in ``SHUFFLE_BUFFER_BYTES`` (1 GiB; at
    least one, at most 256): 93 views of ResNet-50 c3-c5 at 640² in float16, 17 of c2-c5 at 1024².
    Call ``set_epoch`` before iterating each epoch. ``keep_float16`` hands out float16 features
    (for autocast) instead of float32. ``reader`` picks the codec pipeline that decodes the reads
    ("auto": zarrs when installed, one thread per DataLoader worker; ``cachedet.cache.readers``).
    """

    def __init__(
        self,
        url: str,
        views_per_epoch: int = 1,
        seed: int = 0,
        shuffle_buffer: int | None = None,
        rank: int = 0,
        world: int = 1,
        keep_float16: bool = False,
        masks: bool = False,
        allow_incomplete: bool = False,
        verify_reads: bool = True,
        reader: str = "auto",
    ):
        super().__init__(url, views_per_epoch, seed, rank, world, masks, allow_incomplete)
        self.verify_reads = verify_reads  # each shard block checked against its completion record
        self.reader = reader  # the codec pipeline of the reads (cachedet.cache.readers.READERS)
        self._opened.use_reader(reader)  # an unknown or uninstalled reader fails here, up front
        self.dtype = self._opened.dtype
        if shuffle_buffer is None:
            per_view = self._opened.stored_bytes_per_view()
            shuffle_buffer = max(1, min(256, SHUFFLE_BUFFER_BYTES // max(per_view, 1)))
        self.shuffle_buffer, self.keep_float16 = shuffle_buffer, keep_float16
        self._opened = None  # validated above; each worker opens its own
        self._opened_in = os.getpid()

    def __getstate__(self) -> dict:
        """Pickled for spawned DataLoader workers without the open reader (each opens its own)."""
        return {**self.__dict__, "_opened": None}

    def _read_block(self, block: np.ndarray):
        """Samples of one block with their features as stored: {level: (stored, quant)}."""
        if self._opened is None or self._opened_in != os.getpid():
            # first read in this process (a DataLoader worker or the main): a reader opened before
            # a fork is not shared with the child (its codec threads do not survive the fork)
            retain_freed_memory()  # each block decodes into new arrays: reuse freed pages
            self._opened, self._opened_in = StoreReader(self.url), os.getpid()
            self._opened.use_reader(self.reader, one_thread=get_worker_info() is not None)
        store = self._opened
        store.verify_reads = self.verify_reads
        levels = store.read_block_checked(block)  # one read each, checked against the record
        for i, view in enumerate(block.tolist()):
            boxes, labels = store.boxes(view)
            sample = {
                "stored": {  # copies: a view of the block would keep the whole block alive
                    n: (x[i : i + 1].copy(), None if q is None else q[i : i + 1].copy())
                    for n, (x, q) in levels.items()
                },
                "boxes": torch.from_numpy(boxes.copy()),
                "labels": torch.from_numpy(labels.copy()),
                "view": view,
            }
            if self.masks:
                sample["masks"] = torch.from_numpy(store.masks(view))
            yield sample

    def _handed_out(self, sample: dict) -> dict:
        stored = sample.pop("stored")
        sample["features"] = {
            n: decode_view(x, q, self.dtype, self.keep_float16) for n, (x, q) in stored.items()
        }
        return sample

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
                    yield self._handed_out(buffer.pop(int(rng.integers(len(buffer)))))
        while buffer:
            yield self._handed_out(buffer.pop(int(rng.integers(len(buffer)))))


class InMemoryViews(_EpochViews):
    """All views of a store held in RAM as stored (float16 / bfloat16 bits / uint8 + quant params),
    decoded one view at a time, batched without a DataLoader. ``keep_float16`` hands out float16
    features (for autocast; a float16 store's views are then used as stored, without decoding)."""

    def __init__(
        self,
        url: str,
        views_per_epoch: int = 1,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        masks: bool = False,
        keep_float16: bool = False,
        allow_incomplete: bool = False,
        verify_reads: bool = True,
        reader: str = "auto",
    ):
        super().__init__(url, views_per_epoch, seed, rank, world, masks, allow_incomplete)
        store, self._opened = self._opened, None
        store.use_reader(reader)
        self.dtype, self.canvas = store.dtype, store.header.canvas
        self.keep_float16 = keep_float16
        self.stored = {s.name: store.read_stored(s.name, slice(None)) for s in self.specs}
        if verify_reads:  # each complete shard's bytes against its completion record
            for shard, rec in sorted(store.shard_records().items()):
                a, b = rec["views"]
                part = {
                    n: (x[a:b], None if q is None else q[a:b]) for n, (x, q) in self.stored.items()
                }
                store.check_block(shard, part)
        self.targets = [
            tuple(torch.from_numpy(a.copy()) for a in store.boxes(v))
            for v in range(store.num_views)
        ]
        usable = set(self._usable.tolist())  # masks stay RLE in RAM, decoded per sample
        self.mask_rles = (
            [store.mask_rles(v) if v in usable else [] for v in range(store.num_views)]
            if self.masks
            else None
        )

    def _features(self, view: int) -> dict[str, torch.Tensor]:
        return {  # a float16 view kept as float16 is a view of the RAM copy; collate stacks it
            name: decode_view(
                stored[view : view + 1],
                None if quant is None else quant[view : view + 1],
                self.dtype,
                self.keep_float16,
            )
            for name, (stored, quant) in self.stored.items()
        }

    def __iter__(self):
        blocks = self.blocks_for(self.rank)
        views = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        for view in views[rng.permutation(len(views))].tolist():
            boxes, labels = self.targets[view]
            sample = {
                "features": self._features(view),
                "boxes": boxes,
                "labels": labels,
                "view": view,
            }
            if self.mask_rles is not None:
                sample["masks"] = torch.from_numpy(
                    decode_rles(self.mask_rles[view], (self.canvas, self.canvas))
                )
            yield sample


def collate_views(samples: list[dict]) -> dict:
    """Stack features per level -> (B, C, H, W); targets stay a list (ragged)."""
    names = samples[0]["features"].keys()
    return {
        "inputs": {k: torch.stack([s["features"][k] for s in samples]) for k in names},
        "targets": targets_of(samples),
        "views": [s["view"] for s in samples],
    }
