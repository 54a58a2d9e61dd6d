"""Detection heads on pyramid features, built from torchvision's detection components.

Every head has ``loss(features, targets, image_sizes) -> dict`` with the keys in ``LOSS_NAMES``
(one-stage heads report the proposal losses as exact zeros) and
``predict(features, image_sizes) -> list[dict(boxes (N, 4) xyxy, scores (N,), labels (N,))]``.
Targets: list of dict(boxes float (N, 4) xyxy view pixels, labels int64 (N,) in 0..C-1, and for
mask heads masks uint8 (N, H, W) canvas masks). With a mask branch, R-CNN heads add ``loss_mask``
and their detections carry ``masks`` float (N, 1, 28, 28) probabilities inside each box.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.models.detection import _utils as det_utils

from cachedet.models.masks import MaskBranch
from cachedet.structures import FeatureSpec

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")
MASK_LOSS = "loss_mask"


def _image_list(features: "OrderedDict[str, torch.Tensor]", image_sizes: list[tuple[int, int]]) -> ImageList:
    """An ImageList without pixels: anchors need only the canvas size, dtype and device."""
    first = next(iter(features.values()))
    h = max(s[0] for s in image_sizes)
    w = max(s[1] for s in image_sizes)
    return ImageList(first.new_empty((len(image_sizes), 0, h, w)), image_sizes)


class FasterRCNNHead(nn.Module):
    """RPN + RoI heads (torchvision), with anchors of size 4 x stride on every pyramid level.

    RoIs are pooled (MultiScaleRoIAlign, 7x7) from every level but the coarsest extra one, as in
    torchvision's FPN models. The box head is torchvision's FastRCNNConvFCHead with ``box_convs``
    3x3 conv+BN layers and ``box_fcs`` FC layers (default 4conv1fc). ``roi_heads`` can be replaced
    (the cascade plugs in here). ``add_mask_branch`` adds Mask R-CNN's mask head.
    """

    def __init__(self, specs: list[FeatureSpec], num_classes: int, roi_levels: list[str] | None = None,
                 roi_heads: nn.Module | None = None, representation: int = 1024, rois_per_image: int = 512,
                 proposals_per_image: int = 1000, box_convs: int = 4, box_fcs: int = 1):
        super().__init__()
        channels = specs[0].channels
        anchors = AnchorGenerator(sizes=tuple((4 * s.stride,) for s in specs), aspect_ratios=((0.5, 1.0, 2.0),) * len(specs))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n=dict(training=2000, testing=1000),
            post_nms_top_n=dict(training=proposals_per_image, testing=proposals_per_image),
            nms_thresh=0.7,
        )
        self.roi_levels = roi_levels or [s.name for s in specs[:-1]]
        if roi_heads is None:
            pool = MultiScaleRoIAlign(self.roi_levels, output_size=7, sampling_ratio=2)
            head = FastRCNNConvFCHead((channels, 7, 7), [channels] * box_convs, [representation] * box_fcs,
                                      norm_layer=nn.BatchNorm2d)
            out_dim = representation if box_fcs else channels * 7 * 7
            roi_heads = RoIHeads(
                pool, head, FastRCNNPredictor(out_dim, num_classes + 1),
                fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=rois_per_image, positive_fraction=0.25,
                bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
            )
        self.roi_heads = roi_heads
        self.with_masks = False

    def add_mask_branch(self, mask_branch: MaskBranch):
        """Attach Mask R-CNN's mask branch: into torchvision's RoIHeads (its own mask path), or the cascade."""
        if isinstance(self.roi_heads, RoIHeads):
            self.roi_heads.mask_roi_pool, self.roi_heads.mask_head = mask_branch.pool, mask_branch.head
            self.roi_heads.mask_predictor = mask_branch.predictor
        else:
            self.roi_heads.mask_branch = mask_branch
        self.with_masks = True

    @staticmethod
    def _shift(targets, by: int):
        return [{**t, "labels": t["labels"] + by} for t in targets]

    def loss(self, features, targets, image_sizes) -> dict[str, torch.Tensor]:
        images = _image_list(features, image_sizes)
        targets = self._shift(targets, 1)  # torchvision reserves label 0 for background
        proposals, rpn_losses = self.rpn(images, features, targets)
        _, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        losses = {
            "loss_rpn_cls": rpn_losses["loss_objectness"],
            "loss_rpn_box": rpn_losses["loss_rpn_box_reg"],
            "loss_cls": roi_losses["loss_classifier"],
            "loss_box": roi_losses["loss_box_reg"],
        }
        if self.with_masks:
            losses[MASK_LOSS] = roi_losses[MASK_LOSS]
        return losses

    def predict(self, features, image_sizes) -> list[dict[str, torch.Tensor]]:
        images = _image_list(features, image_sizes)
        proposals, _ = self.rpn(images, features)
        detections, _ = self.roi_heads(features, proposals, image_sizes)
        return [{**d, "labels": d["labels"] - 1} for d in detections]


class RetinaNetDetHead(nn.Module):
    """torchvision's RetinaNetHead with its matcher, focal loss and post-processing.

    Anchors: 3 scales (4 x stride x 2^{0, 1/3, 2/3}) x 3 aspect ratios on every pyramid level.
    """

    compute_loss = RetinaNet.compute_loss
    postprocess_detections = RetinaNet.postprocess_detections

    def __init__(self, specs: list[FeatureSpec], num_classes: int):
        super().__init__()
        self.anchor_generator = AnchorGenerator(
            sizes=tuple(tuple(4 * s.stride * 2 ** (k / 3) for k in range(3)) for s in specs),
            aspect_ratios=((0.5, 1.0, 2.0),) * len(specs),
        )
        self.head = RetinaNetHead(specs[0].channels, self.anchor_generator.num_anchors_per_location()[0], num_classes)
        self.proposal_matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.score_thresh, self.nms_thresh, self.detections_per_img, self.topk_candidates = 0.05, 0.5, 100, 1000

    def _run(self, features, image_sizes):
        feats = list(features.values())
        outputs = self.head(feats)
        anchors = self.anchor_generator(_image_list(features, image_sizes), feats)
        return feats, outputs, anchors

    def loss(self, features, targets, image_sizes) -> dict[str, torch.Tensor]:
        _, outputs, anchors = self._run(features, image_sizes)
        losses = self.compute_loss(targets, outputs, anchors)
        zero = losses["classification"].new_zeros(())
        return {"loss_rpn_cls": zero, "loss_rpn_box": zero,
                "loss_cls": losses["classification"], "loss_box": losses["bbox_regression"]}

    def predict(self, features, image_sizes) -> list[dict[str, torch.Tensor]]:
        feats, outputs, anchors = self._run(features, image_sizes)
        per_level = [f.size(2) * f.size(3) for f in feats]
        hwa = outputs["cls_logits"].size(1)
        a = hwa // sum(per_level)
        split = [n * a for n in per_level]
        split_outputs = {k: list(v.split(split, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(x.split(split)) for x in anchors]
        return self.postprocess_detections(split_outputs, split_anchors, image_sizes)

