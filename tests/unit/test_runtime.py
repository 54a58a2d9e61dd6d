"""The process's allocator setting for the cached feed (``cachedet.core.runtime.retain_freed_memory``)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Allocate a 64 MiB block, touch it, free it, then do the same again (each in the main thread, or
# each in a new thread, as zarr decompresses in its pool's threads): minor page faults of each.
FAULTS = """
import resource, sys, threading
import numpy as np
from cachedet.core.runtime import retain_freed_memory
if sys.argv[1] == "retain" and not retain_freed_memory():
    print("refused")  # an older glibc caps the mmap threshold at 32 MiB
    sys.exit()
def faults_of_a_new_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 << 20, dtype=np.uint8)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def in_a_new_thread():
    out = []
    thread = threading.Thread(target=lambda: out.append(faults_of_a_new_block()))
    thread.start()
    thread.join()
    return out[0]
allocate = in_a_new_thread if sys.argv[2] == "thread" else faults_of_a_new_block
first, second = allocate(), allocate()
print(first, second)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)


def faults(mode: str, where: str = "main") -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode, where], capture_output=True, text=True, check=True
    ).stdout
    if out.strip() == "refused":
        pytest.skip("this glibc refuses a 1 GiB mmap threshold")
    first, second = out.split()
    return int(first), int(second)


@glibc_only
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    """By default glibc maps a 64 MiB block afresh each time (its pages fault in again); once
    retained, the second block reuses the first one's pages."""
    default_first, default_second = faults("default")
    retained_first, retained_second = faults("retain")
    assert default_second > default_first / 2  # the default pays again
    assert retained_second < retained_first / 10  # reused: almost no new faults


@glibc_only
def test_blocks_freed_in_other_threads_are_reused_too():
    """By default each thread allocates from an arena of its own, whose heaps (at most 64 MiB)
    cannot hold a 64 MiB block, so it is mapped afresh whatever the mmap threshold; retained,
    every thread allocates from the main heap and the second thread reuses the first's pages."""
    default_first, default_second = faults("default", "thread")
    retained_first, retained_second = faults("retain", "thread")
    assert default_second > default_first / 2
    assert retained_second < retained_first / 10


def test_a_limit_that_is_not_a_c_int_is_refused():
    from cachedet.core.runtime import retain_freed_memory

    for limit in (0, 1 << 31):
        with pytest.raises(ValueError, match="must be in 1 .. 2\\*\\*31 - 1"):
            retain_freed_memory(limit)


def test_device_errors_name_the_field_and_the_cli_shows_the_flag():
    """Library errors name config fields (``cachedet.load(device=...)`` users never typed a flag);
    the CLI shows its option instead."""
    import cachedet_cli.main  # noqa: F401  (every command registers its options)
    from cachedet.core.errors import CachedetError
    from cachedet.core.runtime import resolve_device
    from cachedet_cli.common import with_flags

    with pytest.raises(CachedetError, match=r"^device tpu9: not a device name") as err:
        resolve_device("tpu9")
    assert with_flags(str(err.value)).startswith("--device tpu9: not a device name")
    assert with_flags("source.adapt_stages 7: no block").startswith("--adapt-stages 7")


class _Refusing(__import__("torch").utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from cachedet.core.errors import CachedetError

        raise CachedetError("s.zarr: shard 0, features/c4: absent")


def test_an_error_raised_in_a_loader_worker_is_still_one_line():
    import torch

    from cachedet.core.errors import CachedetError
    from cachedet_cli.common import error_line

    loader = torch.utils.data.DataLoader(_Refusing(), num_workers=1)
    with pytest.raises(CachedetError) as err:
        next(iter(loader))
    assert "\n" in str(err.value)  # torch's wrapping, with the worker's traceback
    assert error_line(err.value) == "s.zarr: shard 0, features/c4: absent"
    assert error_line(CachedetError("plain: message")) == "plain: message"
