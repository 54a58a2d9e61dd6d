"""Where code runs: the one parser of ``--device`` for every stage, and the process's memory
allocator settings for the cached feed (bottom layer: imports no stage)."""

from __future__ import annotations

import ctypes
import platform

import torch

from cachedet.core.errors import CachedetError


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> ``torch.device``.

    Raises CachedetError naming ``--device`` for an unknown name or CUDA on a machine without it.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CachedetError(
            f"device {device}: not a device name (auto, cpu, cuda, cuda:N)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CachedetError(f"device {device}: CUDA is not available on this machine")
    return dev


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt (glibc's malloc.h)


def retain_freed_memory(limit: int = 1 << 30) -> bool:
    """Have glibc's malloc serve blocks up to ``limit`` bytes (at most 2**31 - 1) from its main heap,
    for every thread, and keep freed memory for reuse, in this process, from now on; return whether
    glibc took every setting (False, and nothing changed, on other C libraries).

    By default glibc maps every block above its mmap threshold (at most 32 MiB) afresh and unmaps
    it on free, and trims the heap's top; every new block's pages are then faulted in and zeroed
    by the kernel. The cached feed reads each shard block of each level into a new array and
    decodes each view into another (ResNet-50 c2 at 1024², one view: 67 MB of float32), so it paid
    that on every read (``benchmarks/results/extract_overhead.md``, the feed). zarr
    decompresses in its pool's threads, and by default each thread allocates from an arena of its
    own whose heaps (at most 64 MiB) map larger blocks afresh and are unmapped once empty, so the
    threads' arenas are capped at one (the main heap). That reaches only threads that first
    allocate while no other arena exists: call it before any other thread allocates (train-heads
    does, first thing, for cached runs); in a process that already ran threads, new threads may
    still be given their old arenas. The return value says whether glibc accepted the settings,
    not whether they reach every thread.
    Older glibc releases refuse a threshold above 32 MiB; the other settings are applied either
    way. The process's resident memory then stays near its peak, which a feed worker needs again
    for the next block anyway.
    """
    if not 0 < limit < 1 << 31:
        raise ValueError(f"limit {limit}: must be in 1 .. 2**31 - 1 (a C int)")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = [mallopt(_M_TRIM_THRESHOLD, limit), mallopt(_M_ARENA_MAX, 1)]
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and all(taken)
