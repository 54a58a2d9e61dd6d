"""The shard runner (cachedet.extraction.shards): completion records, and resuming a partial store."""

import numpy as np
import pytest
from conftest import small_config

from cachedet.backbones.backbone import build_backbone
from cachedet.cache.layout import META_FIELDS
from cachedet.cache.store import StoreReader
from cachedet.core.errors import CachedetError
from cachedet.data.coco import load_detection_dataset
from cachedet.data.views import AugmentConfig
from cachedet.extraction.run import _header, extract, plan_views, prepare_store, shard_tasks
from cachedet.extraction.shards import compute_shard, run_shard, run_shards_in_process, write_shard


def planned(synthetic, out):
    """A laid-out store with no shard written, and its shard tasks (4 shards of 3 views, masks)."""
    cfg = small_config(
        synthetic, out, augment=AugmentConfig(size=64, seed=2), views=1, shard_views=3
    )
    dataset = load_detection_dataset(cfg.annotations, cfg.images)
    plan = plan_views(dataset, cfg.augment, cfg.views)
    header = _header(cfg, build_backbone(cfg.backbone, warn=False), dataset, plan, None, True)
    prepare_store(cfg, header, plan)
    return cfg, shard_tasks(cfg, cfg.backbone, dataset, plan)


def test_records_name_their_views_levels_and_masks(synthetic, tmp_path):
    cfg, tasks = planned(synthetic, str(tmp_path / "s.zarr"))
    assert [(t.shard, t.start, len(t.views)) for t in tasks] == [
        (0, 0, 3),
        (1, 3, 3),
        (2, 6, 3),
        (3, 9, 3),
    ]
    records = run_shards_in_process(tasks[1:3])
    store = StoreReader(cfg.out)
    assert store.shard_records() == {r["shard"]: r for r in records}
    assert [r["views"] for r in records] == [[3, 6], [6, 9]]
    levels = {s.name for s in store.specs}
    rows = {f"boxes/{k}" for k in ("offsets", "xyxy", "labels", "ann_ids")}
    rows |= {f"meta/{k}" for k in (*META_FIELDS, "paste_image_id")}
    assert all(set(r["crc32c"]) == levels | {"masks"} | rows for r in records)
    assert all(isinstance(r["seconds"], float) for r in records)  # recorded (timings: benchmarks/)
    assert store.usable_views().tolist() == [3, 4, 5, 6, 7, 8]
    assert store.verify() == {
        "complete": [1, 2],
        "incomplete": [0, 3],
        "damaged": [],
        "shards_total": 4,
    }


def test_a_partial_store_resumes_to_the_same_arrays(synthetic, tmp_path):
    cfg, tasks = planned(synthetic, str(tmp_path / "partial.zarr"))
    run_shard(tasks[2])
    result = extract(cfg, progress=False)
    assert (result.shards_run, result.shards_skipped_complete, result.views_run) == (3, 1, 9)
    whole = small_config(
        synthetic, str(tmp_path / "whole.zarr"), augment=cfg.augment, views=1, shard_views=3
    )
    extract(whole, progress=False)
    a, b = StoreReader(cfg.out), StoreReader(whole.out)
    for spec in a.specs:
        every = slice(None)
        np.testing.assert_array_equal(
            a.read_stored(spec.name, every)[0], b.read_stored(spec.name, every)[0]
        )
    strip = lambda recs: {k: {**r, "seconds": 0} for k, r in recs.items()}  # noqa: E731
    assert strip(a.shard_records()) == strip(b.shard_records())


def test_a_failed_write_leaves_no_record_and_a_missing_store_is_named(synthetic, tmp_path):
    cfg, tasks = planned(synthetic, str(tmp_path / "s.zarr"))
    computed = compute_shard(tasks[0])
    levels = {s.name: 3 for s in StoreReader(cfg.out).specs}
    assert {k: v.shape[0] for k, v in computed.blocks.items()} == levels
    computed.blocks["c9"] = next(iter(computed.blocks.values()))  # a level the store does not have
    with pytest.raises(KeyError):
        write_shard(tasks[0], computed)
    assert StoreReader(cfg.out).shard_records() == {}
    broken = type(tasks[0])(**{**tasks[0].__dict__, "store": str(tmp_path / "missing.zarr")})
    with pytest.raises(CachedetError, match="missing.zarr: no feature store here"):
        write_shard(broken, compute_shard(tasks[0]))


def test_loader_workers_get_each_batch_not_the_whole_run(synthetic, tmp_path):
    import gc
    import pickle
    from dataclasses import replace

    from cachedet.extraction.shards import ShardRunner

    cfg, tasks = planned(synthetic, str(tmp_path / "s.zarr"))
    runner = ShardRunner(cfg.backbone, "cpu")
    one, every = runner.loader(tasks[:1]), runner.loader(tasks)
    # what a DataLoader worker is given up front does not grow with the shards of the run
    assert len(pickle.dumps(one.dataset)) == len(pickle.dumps(every.dataset))
    batches = list(every.batch_sampler)  # each batch carries its own views, within one shard
    assert [[item[0] for item in b] for b in batches] == [list(t.views) for t in tasks]
    assert [[item[1] for item in b] for b in batches] == [list(t.paths) for t in tasks]
    serial = [shard for _, shard in runner.computed(tasks)]
    forked = [replace(t, loader_workers=2) for t in tasks]  # two worker processes, same bytes
    frozen = []  # the parent's objects are frozen while forked workers run (no copy-on-write)
    for (task, shard), alone in zip(runner.computed(forked), serial, strict=True):
        frozen.append(gc.get_freeze_count())
        assert shard.blocks.keys() == alone.blocks.keys() and shard.masks == alone.masks
        for name, block in shard.blocks.items():
            assert block.tobytes() == alone.blocks[name].tobytes(), (task.shard, name)
    assert min(frozen) > 0 and gc.get_freeze_count() == 0  # and collectable again after the run
