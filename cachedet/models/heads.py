"""Detection heads on pyramid features, built from torchvision's detection components.

Every head (and every R-CNN part: proposals, box stages, the mask branch's caller) is called as
``head(features, image_sizes, targets=None) -> (outputs, losses)``:

- with ``targets`` (training): ``outputs`` is an empty list and ``losses`` holds the terms named
  in ``head.loss_names`` (the shared vocabulary ``loss_rpn_cls, loss_rpn_box, loss_cls, loss_box``
  and, with a mask branch, ``loss_mask``; one-stage heads report the proposal terms as exact
  zeros), plus logged-only terms named in ``head.logged_names`` (the cascade's ``stage{t}/...``);
- without: ``outputs`` is a list of dict(boxes (N, 4) xyxy canvas pixels, scores (N,), labels (N,)
  in 0..C-1, and with a mask branch masks float (N, 1, 28, 28) probabilities inside each box) and
  ``losses`` is empty.

Targets: list of dict(boxes float (N, 4) xyxy view pixels, labels int64 (N,) in 0..C-1, and for
mask heads masks uint8 (N, H, W) canvas masks). Features: OrderedDict{p3: (B, C, H/8, W/8), ...}.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from cachedet.core.structures import FeatureSpec
from cachedet.models.masks import MaskBranch

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")
MASK_LOSS = "loss_mask"
ROI_SIZE = 7  # the box head's RoIs: 7x7


def _image_list(
    features: "OrderedDict[str, torch.Tensor]", image_sizes: list[tuple[int, int]]
) -> ImageList:
    """An ImageList without pixels: anchors need only the canvas size, dtype and device."""
    first = next(iter(features.values()))
    h = max(s[0] for s in image_sizes)
    w = max(s[1] for s in image_sizes)
    return ImageList(first.new_empty((len(image_sizes), 0, h, w)), image_sizes)


class BoxHead(FastRCNNConvFCHead):
    """The one box head of Faster R-CNN and of every cascade stage (torchvision's FastRCNNConvFCHead).

    RoI features (N, channels, 7, 7) -> ``convs`` 3x3 conv+BN+ReLU layers of ``channels`` (the
    neck width) -> flatten -> ``fcs`` FC+ReLU layers of ``fc_dim`` -> (N, out_dim), where
    ``out_dim`` is ``fc_dim``, or ``channels * 7 * 7`` without FC layers.
    """

    def __init__(self, channels: int, convs: int, fcs: int, fc_dim: int = 1024):
        super().__init__(
            (channels, ROI_SIZE, ROI_SIZE),
            [channels] * convs,
            [fc_dim] * fcs,
            norm_layer=nn.BatchNorm2d,
        )
        self.out_dim = fc_dim if fcs else channels * ROI_SIZE * ROI_SIZE


def roi_pool(levels: list[str]) -> MultiScaleRoIAlign:
    """7x7 RoIAlign from the pyramid levels ``levels`` (each RoI from the level its size maps to)."""
    return MultiScaleRoIAlign(levels, output_size=ROI_SIZE, sampling_ratio=2)


class Proposals(RegionProposalNetwork):
    """torchvision's RPN with anchors of size 4 x stride (3 aspect ratios) on every pyramid level.

    forward(images, features, targets=None) -> (proposals list of (P_i, 4) xyxy, losses
    ``loss_rpn_cls`` / ``loss_rpn_box`` in training mode, else empty). Targets: labels 1..C.
    """

    NAMES = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_box"}

    def __init__(self, specs: list[FeatureSpec], proposals_per_image: int = 1000):
        anchors = AnchorGenerator(
            sizes=tuple((4 * s.stride,) for s in specs),
            aspect_ratios=((0.5, 1.0, 2.0),) * len(specs),
        )
        super().__init__(
            anchors,
            RPNHead(specs[0].channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n=dict(training=2000, testing=1000),
            post_nms_top_n=dict(training=proposals_per_image, testing=proposals_per_image),
            nms_thresh=0.7,
        )

    def forward(self, images, features, targets=None):
        proposals, losses = super().forward(images, features, targets)
        return proposals, {self.NAMES[k]: v for k, v in losses.items()}


class BoxRoIHeads(RoIHeads):
    """Faster R-CNN's box stage: torchvision's RoIHeads (sampling, class-specific box regression,
    ``fastrcnn_loss``, post-processing) on a ``BoxHead``; its mask path is unused (the R-CNN head
    owns the mask branch).

    forward(features, proposals, image_sizes, targets=None) -> (outputs, losses), labels 1..C:
    with targets, outputs are the positive RoIs per image, dict(boxes (P_i, 4), matched int64
    (P_i,) ground-truth rows), and losses ``loss_cls`` / ``loss_box``; without, the detections.
    """

    logged_names: tuple[str, ...] = ()

    def __init__(
        self,
        levels: list[str],
        channels: int,
        num_classes: int,
        convs: int,
        fcs: int,
        fc_dim: int,
        rois_per_image: int,
    ):
        head = BoxHead(channels, convs, fcs, fc_dim)
        super().__init__(
            roi_pool(levels),
            head,
            FastRCNNPredictor(head.out_dim, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=rois_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=100,
        )

    def _predict(self, features, boxes, image_sizes):
        return self.box_predictor(self.box_head(self.box_roi_pool(features, boxes, image_sizes)))

    def forward(self, features, proposals, image_sizes, targets=None):
        if targets is None:
            logits, deltas = self._predict(features, proposals, image_sizes)
            boxes, scores, labels = self.postprocess_detections(
                logits, deltas, proposals, image_sizes
            )
            return [
                {"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)
            ], {}
        proposals, matched, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        logits, deltas = self._predict(features, proposals, image_sizes)
        loss_cls, loss_box = fastrcnn_loss(logits, deltas, labels, regression_targets)
        positives = [
            {"boxes": p[lab > 0], "matched": m[lab > 0]}
            for p, m, lab in zip(proposals, matched, labels)
        ]
        return positives, {"loss_cls": loss_cls, "loss_box": loss_box}


class RCNNHead(nn.Module):
    """Two-stage head: ``rpn`` proposals -> ``roi_heads`` box stage(s) (``BoxRoIHeads`` or the
    cascade) -> optionally ``mask_branch`` (Mask R-CNN), trained on the box stage's positive RoIs
    and run on its detections. Parts follow torchvision's label convention (1..C, 0 background);
    this head shifts the caller's 0..C-1 labels in and out. See the module docstring for the call.
    """

    def __init__(self, rpn: Proposals, roi_heads: nn.Module, mask_branch: MaskBranch | None = None):
        super().__init__()
        self.rpn, self.roi_heads, self.mask_branch = rpn, roi_heads, mask_branch
        self.register_load_state_dict_pre_hook(_old_mask_keys)

    @property
    def loss_names(self) -> tuple[str, ...]:
        return LOSS_NAMES + ((MASK_LOSS,) if self.mask_branch is not None else ())

    @property
    def logged_names(self) -> tuple[str, ...]:
        return self.roi_heads.logged_names

    def forward(self, features, image_sizes, targets=None):
        images = _image_list(features, image_sizes)
        if targets is None:
            proposals, _ = self.rpn(images, features)
            detections, _ = self.roi_heads(features, proposals, image_sizes)
            if self.mask_branch is not None:
                detections = self.mask_branch.predict(features, detections, image_sizes)
            return [{**d, "labels": d["labels"] - 1} for d in detections], {}
        targets = [
            {**t, "labels": t["labels"] + 1} for t in targets
        ]  # torchvision reserves 0 for background
        proposals, losses = self.rpn(images, features, targets)
        positives, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        losses.update(roi_losses)
        if self.mask_branch is not None:
            losses[MASK_LOSS] = self.mask_branch.loss(
                features,
                [p["boxes"] for p in positives],
                [p["matched"] for p in positives],
                targets,
                image_sizes,
            )
        return [], losses


# Where checkpoints written before the R-CNN head owned its mask branch kept it.
OLD_MASK_PREFIXES = {
    "roi_heads.mask_head.": "mask_branch.head.",  # plugged into torchvision's RoIHeads
    "roi_heads.mask_predictor.": "mask_branch.predictor.",
    "roi_heads.mask_branch.": "mask_branch.",
}  # the cascade's attribute


def _old_mask_keys(module, state_dict, prefix, *_):
    """Load-time key map: old mask-branch keys (``OLD_MASK_PREFIXES``) renamed in place."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in OLD_MASK_PREFIXES.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)


class RetinaNetDetHead(nn.Module):
    """torchvision's RetinaNetHead with its matcher, focal loss and post-processing.

    Anchors: 3 scales (4 x stride x 2^{0, 1/3, 2/3}) x 3 aspect ratios on every pyramid level.
    Losses: ``loss_cls`` (sigmoid focal), ``loss_box`` (L1), and the proposal terms as exact zeros.
    """

    compute_loss = RetinaNet.compute_loss
    postprocess_detections = RetinaNet.postprocess_detections
    loss_names = LOSS_NAMES
    logged_names: tuple[str, ...] = ()

    def __init__(self, specs: list[FeatureSpec], num_classes: int):
        super().__init__()
        self.anchor_generator = AnchorGenerator(
            sizes=tuple(tuple(4 * s.stride * 2 ** (k / 3) for k in range(3)) for s in specs),
            aspect_ratios=((0.5, 1.0, 2.0),) * len(specs),
        )
        self.head = RetinaNetHead(
            specs[0].channels, self.anchor_generator.num_anchors_per_location()[0], num_classes
        )
        self.proposal_matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.score_thresh, self.nms_thresh, self.detections_per_img, self.topk_candidates = (
            0.05,
            0.5,
            100,
            1000,
        )

    def forward(self, features, image_sizes, targets=None):
        feats = list(features.values())
        outputs = self.head(feats)
        anchors = self.anchor_generator(_image_list(features, image_sizes), feats)
        if targets is not None:
            losses = self.compute_loss(targets, outputs, anchors)
            zero = losses["classification"].new_zeros(())
            return [], {
                "loss_rpn_cls": zero,
                "loss_rpn_box": zero,
                "loss_cls": losses["classification"],
                "loss_box": losses["bbox_regression"],
            }
        per_level = [f.size(2) * f.size(3) for f in feats]
        a = outputs["cls_logits"].size(1) // sum(per_level)
        split = [n * a for n in per_level]
        split_outputs = {k: list(v.split(split, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(x.split(split)) for x in anchors]
        return self.postprocess_detections(split_outputs, split_anchors, image_sizes), {}
