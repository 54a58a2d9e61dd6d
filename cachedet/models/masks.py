"""The Mask R-CNN mask branch, from torchvision's parts: ``MultiScaleRoIAlign`` (14x14) ->
``MaskRCNNHeads`` (``convs`` 3x3 convs) -> ``MaskRCNNPredictor`` (2x deconv, one 28x28 logit map
per class) -> ``maskrcnn_loss`` / ``maskrcnn_inference``.

The R-CNN head (``cachedet.models.heads.RCNNHead``) owns the branch and calls ``loss`` on the
positive RoIs its box stage returns (Faster R-CNN's or the cascade's first stage) and ``predict``
on the final detections.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    maskrcnn_inference,
    maskrcnn_loss,
    paste_masks_in_image,
)
from torchvision.ops import MultiScaleRoIAlign

MASK_POOL = 14  # RoI size the mask head sees; the predictor doubles it to 28


class MaskBranch(nn.Module):
    def __init__(
        self,
        roi_levels: list[str],
        in_channels: int,
        num_classes: int,
        convs: int = 4,
        channels: int = 256,
    ):
        super().__init__()
        self.pool = MultiScaleRoIAlign(roi_levels, output_size=MASK_POOL, sampling_ratio=2)
        self.head = MaskRCNNHeads(in_channels, [channels] * convs, dilation=1)
        self.predictor = MaskRCNNPredictor(
            channels if convs else in_channels, channels, num_classes + 1
        )

    def logits(self, features, boxes: list[torch.Tensor], image_sizes) -> torch.Tensor:
        """(sum N_i, C + 1, 28, 28) mask logits of the boxes (xyxy canvas pixels) of every image."""
        return self.predictor(self.head(self.pool(features, boxes, image_sizes)))

    def loss(
        self,
        features,
        boxes: list[torch.Tensor],
        matched: list[torch.Tensor],
        targets: list[dict],
        image_sizes,
    ) -> torch.Tensor:
        """Mask loss of positive RoIs ``boxes`` matched to ground-truth rows ``matched`` (labels 1..C).

        ``targets[i]["masks"]`` uint8 (N_i, H, W) canvas masks; no positive RoI gives an exact zero.
        """
        if sum(len(b) for b in boxes) == 0:
            return sum(p.sum() for p in self.parameters()) * 0.0
        logits = self.logits(features, boxes, image_sizes)
        return maskrcnn_loss(
            logits, boxes, [t["masks"] for t in targets], [t["labels"] for t in targets], matched
        )

    def predict(self, features, detections: list[dict], image_sizes) -> list[dict]:
        """Add ``masks`` float (N, 1, 28, 28) probabilities of each detection's class (labels 1..C)."""
        boxes = [d["boxes"] for d in detections]
        if sum(len(b) for b in boxes) == 0:
            for d in detections:
                d["masks"] = d["boxes"].new_zeros((0, 1, 2 * MASK_POOL, 2 * MASK_POOL))
            return detections
        probs = maskrcnn_inference(
            self.logits(features, boxes, image_sizes), [d["labels"] for d in detections]
        )
        for d, p in zip(detections, probs):
            d["masks"] = p
        return detections


def paste_masks(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    size: tuple[int, int],
    threshold: float = 0.5,
    chunk: int = 16,
):
    """Yield bool (H, W) masks: 28x28 probabilities ``probs`` (N, 1, M, M) pasted into their boxes
    (N, 4) xyxy of an image of ``size`` (torchvision's ``paste_masks_in_image``), thresholded."""
    for start in range(0, len(boxes), chunk):
        pasted = paste_masks_in_image(
            probs[start : start + chunk].float(), boxes[start : start + chunk].float(), size
        )
        for m in pasted[:, 0]:
            yield (m >= threshold).cpu().numpy()
