"""Loader settings of the training feed: defaults per device, and persistent workers."""

import os

import pytest
import torch

from cachedet.core.errors import CachedetError
from cachedet.engine.config import LoaderConfig
from cachedet.engine.distributed import DistInfo
from cachedet.engine.sources import CacheSource


def test_cpu_defaults_are_unchanged_and_cuda_defaults_use_workers():
    cpu = LoaderConfig().resolved(torch.device("cpu"))
    assert (cpu.workers, cpu.log_every) == (0, 1)
    cuda = LoaderConfig().resolved(torch.device("cuda"))  # no GPU needed: only the device type
    assert cuda.workers == min(8, max(0, (os.cpu_count() or 1) - 1)) and cuda.log_every == 50
    given = LoaderConfig(workers=3, log_every=7).resolved(torch.device("cuda"))
    assert (given.workers, given.log_every) == (3, 7)
    assert cpu.loader_kwargs() == {"num_workers": 0, "pin_memory": False}
    assert LoaderConfig(workers=2).loader_kwargs(pin_memory=True) == {
        "num_workers": 2,
        "pin_memory": True,
        "prefetch_factor": 4,  # LoaderConfig's defaults reach the DataLoader unchanged
        "persistent_workers": True,
        "multiprocessing_context": None,
    }


@pytest.mark.parametrize(
    "field, value",
    [("workers", -1), ("log_every", 0), ("prefetch_factor", 0), ("shuffle_buffer", 0)],
)
def test_bad_loader_settings_name_the_field(field, value):
    with pytest.raises(CachedetError, match=rf"^loader\.{field}: expected"):
        LoaderConfig(**{field: value}).validate(online=False)


def epoch_views(url, persistent, epochs=2):
    loader = LoaderConfig(
        batch_size=2,
        workers=2,
        shuffle_buffer=4,
        loader_start="spawn",
        persistent_workers=persistent,
    )
    source = CacheSource(url, loader, DistInfo(0, 1, 0))
    return [[tuple(batch["views"]) for batch in source.batches(epoch)] for epoch in range(epochs)]


def test_persistent_workers_follow_the_epoch_like_fresh_ones(tiny_store):
    fresh = epoch_views(tiny_store.url, persistent=False)
    persistent = epoch_views(tiny_store.url, persistent=True)
    assert persistent == fresh and fresh[0] != fresh[1]
