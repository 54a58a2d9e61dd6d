"""Opening a store to train reads its index once, with array operations (issue 29: start-up on a
100k-view store): the shard records once, usable views and each epoch's views without a Python
step per view, the same views as the per-view reading gave."""

import numpy as np

from cachedet.cache import store as store_module
from cachedet.cache.dataset import CachedViews, choose_epoch_views
from cachedet.cache.store import StoreReader


def per_view_choice(image_ids, usable, views_per_epoch, seed, epoch):
    """choose_epoch_views as it was: one draw per image."""
    rng = np.random.default_rng([seed, epoch, 17])
    ids = image_ids[usable]
    order = np.argsort(ids, kind="stable")
    groups = np.split(usable[order], np.flatnonzero(np.diff(ids[order])) + 1) if len(usable) else []
    chosen = []
    for views in groups:
        chosen.extend(rng.choice(views, size=min(views_per_epoch, len(views)), replace=False))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def test_epoch_views_are_the_per_image_draws():
    rng = np.random.default_rng(0)
    for per_image in (1, 2, 3):  # views per image up to views_per_epoch: all of them, no draw
        image_ids = np.repeat(rng.permutation(50), per_image)
        usable = np.sort(rng.choice(len(image_ids), len(image_ids) - 7, replace=False))
        for k in (1, 2, 3):
            for epoch in (0, 1):
                np.testing.assert_array_equal(
                    choose_epoch_views(image_ids, usable, k, 3, epoch),
                    per_view_choice(image_ids, usable, k, 3, epoch),
                )
    empty = np.zeros(0, dtype=np.int64)
    assert choose_epoch_views(np.arange(4), empty, 1, 0, 0).tolist() == []


def test_usable_views_leave_out_incomplete_shards_and_skipped_views(tiny_store):
    records = tiny_store.shard_records()
    assert tiny_store.usable_views().tolist() == list(range(12))
    del records[1]  # shard 1 (views 4-7) unfinished; view 9's image skipped as unreadable
    records[2] = {**records[2], "skipped": [{"view": 9, "image_id": 0, "error": "x"}]}
    assert tiny_store.usable_views(records).tolist() == [0, 1, 2, 3, 8, 10, 11]


def test_a_training_feed_reads_the_shard_records_once(tiny_store, monkeypatch):
    calls = []
    read = store_module._StoreFiles.shard_records

    def counted(self):
        calls.append(1)
        return read(self)

    monkeypatch.setattr(store_module._StoreFiles, "shard_records", counted)
    views = CachedViews(tiny_store.url, views_per_epoch=1, seed=0)
    assert len(views) == 12 and len(calls) == 1  # usable views, the count of done, the epoch
    sample = next(iter(views))  # the reader of this process (each worker opens its own): once
    assert sample["view"] in range(12) and len(calls) == 2
    assert isinstance(views._opened, StoreReader)
