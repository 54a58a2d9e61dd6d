"""torchrun / DDP helpers: rank, world size, device, and process-group setup."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cachedet.core.errors import CachedetError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier(info: DistInfo):
    if info.world > 1:
        dist.barrier()


def shutdown(info: DistInfo):
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def all_ranks_ready(info: DistInfo):
    """Run the block on every rank, then agree: when it raised on any rank, raise on every rank
    (the failing rank its own error, the others a CachedetError naming the rank and its message),
    so that no rank goes on to wait forever for one that stopped. Single process: a plain block."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after the ranks agree
        error = e
    if info.world > 1 and dist.is_initialized():
        said = None if error is None else (str(error) or type(error).__name__)
        messages: list = [None] * info.world
        dist.all_gather_object(messages, said)
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise CachedetError(f"rank {rank} of {info.world} stopped: {message}")
    if error is not None:
        raise error
