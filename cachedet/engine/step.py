"""The one training step, shared by ``train-heads``, ``bench`` and ``model-info``.

``TrainModel`` turns a batch's inputs into features (cached features as they are; images through
the backbone, frozen or not) and returns the detector's losses; ``train_step`` runs forward, the
summed loss's backward and, given an optimiser, clipping and the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cachedet.core.errors import CachedetError


class TrainModel(nn.Module):
    """inputs -> features -> detector losses.

    Without a backbone the inputs are the features ``{level: (B, C, H, W)}``; with one they are
    normalised images (B, 3, S, S); with ``hybrid_stage`` K they are a hybrid cache's levels and the
    backbone runs its stages after K. A frozen backbone (no adapters) runs in inference mode.
    """

    def __init__(
        self,
        detector: nn.Module,
        backbone: nn.Module | None = None,
        hybrid_stage: int | None = None,
    ):
        super().__init__()
        self.detector, self.backbone, self.hybrid_stage = detector, backbone, hybrid_stage

    def features(self, inputs):
        if self.backbone is None:
            return inputs
        if self.hybrid_stage is not None:
            return self.backbone.forward_from(inputs, self.hybrid_stage)
        if self.backbone.trainable or self.backbone.has_adapters:
            return self.backbone(inputs)
        with torch.inference_mode():
            feats = self.backbone(inputs)
        # inference tensors cannot be saved for backward; a clone outside the mode is a normal tensor
        return {k: v.clone() for k, v in feats.items()}

    def forward(self, inputs, targets, image_sizes=None):
        return self.detector(self.features(inputs), targets, image_sizes)


class NonFiniteLoss(CachedetError):
    """The summed loss was NaN or infinite; nothing was updated."""

    def __init__(self, value: float):
        super().__init__(f"the loss became {value}")
        self.value = value


@dataclass
class StepOutput:
    """The summed loss and each term, detached (still on the device: reading them syncs)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]


def train_step(
    model: nn.Module,
    inputs,
    targets: list[dict],
    image_sizes=None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    params=None,
    clip_grad: float | None = None,
    autocast: torch.device | None = None,
    check_finite: bool = True,
) -> StepOutput:
    """forward -> sum of the loss terms -> backward; with ``optimizer`` also clip and update.

    model: called as ``model(inputs, targets[, image_sizes])`` and returning ``{name: scalar}``
    (cachedet's ``TrainModel`` or a torchvision detector in training mode). targets: per image
    dict(boxes (N, 4) xyxy pixels, labels (N,)). ``params`` are the clipped parameters
    (``clip_grad``: max total norm; None: no clipping). ``autocast``: the device whose bfloat16
    autocast wraps the forward pass (None: full precision). Raises ``NonFiniteLoss`` before any
    update when ``check_finite`` and the loss is NaN or infinite (this reads the loss: a host sync).
    """
    args = (inputs, targets) if image_sizes is None else (inputs, targets, image_sizes)
    with torch.autocast(
        autocast.type if autocast is not None else "cpu",
        dtype=torch.bfloat16,
        enabled=autocast is not None,
    ):
        losses = model(*args)
    loss = sum(losses.values())
    if check_finite and not torch.isfinite(loss):
        raise NonFiniteLoss(loss.item())
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optimizer is not None:
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
    return StepOutput(loss.detach(), {k: v.detach() for k, v in losses.items()})
