"""The process's allocator setting for the cached feed (``cachedet.runtime.retain_freed_memory``)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Allocate a 64 MiB block, touch it, free it, then do the same again: minor page faults of each.
FAULTS = """
import resource, sys
import numpy as np
from cachedet.runtime import retain_freed_memory
if sys.argv[1] == "retain" and not retain_freed_memory():
    print("refused")  # an older glibc caps the mmap threshold at 32 MiB
    sys.exit()
def faults_of_a_new_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 << 20, dtype=np.uint8)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
first, second = faults_of_a_new_block(), faults_of_a_new_block()
print(first, second)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)


def faults(mode: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
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


def test_a_limit_that_is_not_a_c_int_is_refused():
    from cachedet.runtime import retain_freed_memory

    for limit in (0, 1 << 31):
        with pytest.raises(ValueError, match="must be in 1 .. 2\\*\\*31 - 1"):
            retain_freed_memory(limit)
