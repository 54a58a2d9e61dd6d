"""Where code runs: the one parser of ``--device`` for every stage (bottom layer: imports no stage)."""

from __future__ import annotations

import torch

from cachedet.errors import CachedetError


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
            f"--device {device}: not a device name (auto, cpu, cuda, cuda:N)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CachedetError(f"--device {device}: CUDA is not available on this machine")
    return dev
