"""Cascade R-CNN RoI heads (Cai & Vasconcelos, CVPR 2018), on torchvision's detection ops.

Stage t pools RoIs (MultiScaleRoIAlign) from the boxes of stage t-1, classifies them and
regresses one class-agnostic box delta with its own box coder weights; training matches each
stage's input boxes to the ground truth at its own IoU threshold (0.5 / 0.6 / 0.7 by default).
At inference the class scores are averaged over the stages and the last stage's boxes are kept.
Every stage uses the one ``BoxHead`` of ``cachedet.models.heads``.

A mask branch, owned by the R-CNN head, trains on the positive RoIs of the first stage (IoU >=
its threshold, as detectron2's Cascade Mask R-CNN) that ``forward`` returns in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from cachedet.models.config import DEFAULT_IOUS
from cachedet.models.heads import BoxHead, roi_pool

DEFAULT_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)  # as in the Cascade R-CNN paper


class CascadeStage(nn.Module):
    """RoI features (N, channels, 7, 7) -> class logits (N, C + 1), class-agnostic deltas (N, 4)."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        iou: float,
        weights,
        convs: int,
        fcs: int,
        fc_dim: int,
    ):
        super().__init__()
        self.head = BoxHead(channels, convs, fcs, fc_dim)
        self.cls_score = nn.Linear(self.head.out_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(self.head.out_dim, 4)  # class-agnostic
        self.matcher = det_utils.Matcher(iou, iou, allow_low_quality_matches=False)
        self.box_coder = det_utils.BoxCoder(weights)
        self.iou = iou

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.head(pooled)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeRoIHeads(nn.Module):
    """forward(features, proposals, image_sizes, targets=None) -> (outputs, losses), as ``BoxRoIHeads``.

    Labels 1..C, 0 is background. With targets, outputs are the first stage's positive RoIs per
    image, dict(boxes (P_i, 4) xyxy, matched int64 (P_i,) ground-truth rows), and losses are
    ``loss_cls`` / ``loss_box`` (sums over the stages weighted by ``STAGE_LOSS_WEIGHTS``) and the
    logged-only terms ``stage{t}/loss_cls`` / ``stage{t}/loss_box`` (t = 1..stages, unweighted).
    Without targets, outputs are the detections: dict(boxes (N, 4), scores (N,), labels (N,)).
    """

    def __init__(
        self,
        roi_levels: list[str],
        channels: int,
        num_classes: int,
        ious=DEFAULT_IOUS,
        weights=DEFAULT_WEIGHTS,
        convs: int = 0,
        fcs: int = 2,
        fc_dim: int = 1024,
        rois_per_image: int = 512,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ):
        super().__init__()
        if len(ious) != len(weights):
            raise ValueError(f"{len(ious)} IoU thresholds but {len(weights)} box-coder weight sets")
        self.box_roi_pool = roi_pool(roi_levels)
        self.stages = nn.ModuleList(
            CascadeStage(channels, num_classes, iou, w, convs, fcs, fc_dim)
            for iou, w in zip(ious, weights)
        )
        self.sampler = det_utils.BalancedPositiveNegativeSampler(rois_per_image, 0.25)
        self.score_thresh, self.nms_thresh, self.detections_per_img = (
            score_thresh,
            nms_thresh,
            detections_per_img,
        )

    @property
    def logged_names(self) -> tuple[str, ...]:
        stages = range(1, len(self.stages) + 1)
        return tuple(f"stage{t}/{name}" for t in stages for name in ("loss_cls", "loss_box"))

    def _match(self, stage: CascadeStage, boxes: list[torch.Tensor], targets: list[dict]):
        """Per image: labels (0 background), matched ground-truth boxes, matched ground-truth rows."""
        labels, matched_gt, rows = [], [], []
        for b, t in zip(boxes, targets):
            if t["boxes"].numel() == 0:
                labels.append(torch.zeros(len(b), dtype=torch.int64, device=b.device))
                matched_gt.append(torch.zeros_like(b))
                rows.append(torch.zeros(len(b), dtype=torch.int64, device=b.device))
                continue
            idx = stage.matcher(box_iou(t["boxes"], b))
            lab = t["labels"][idx.clamp(min=0)].clone()
            lab[idx < 0] = 0  # below threshold (and between thresholds): background
            labels.append(lab)
            matched_gt.append(t["boxes"][idx.clamp(min=0)])
            rows.append(idx.clamp(min=0))
        return labels, matched_gt, rows

    def _sample_first_stage(self, proposals, targets):
        """Append the ground truth to the proposals, match at stage 0's IoU, sample a balanced subset."""
        proposals = [torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]
        labels, _, _ = self._match(self.stages[0], proposals, targets)
        pos, neg = self.sampler(labels)
        keep = [torch.where(p | n)[0] for p, n in zip(pos, neg)]
        return [p[k] for p, k in zip(proposals, keep)]

    def stage_outputs(self, features, boxes: list[torch.Tensor], image_sizes):
        """Run every stage; returns per stage (input boxes, class logits, refined boxes)."""
        outputs = []
        for stage in self.stages:
            pooled = self.box_roi_pool(features, boxes, image_sizes)
            logits, deltas = stage(pooled)
            refined = stage.box_coder.decode(deltas, boxes).reshape(-1, 4)
            per_image = [len(b) for b in boxes]
            refined = [
                clip_boxes_to_image(r, s) for r, s in zip(refined.split(per_image), image_sizes)
            ]
            outputs.append((boxes, logits, deltas, refined))
            boxes = [r.detach() for r in refined]
        return outputs

    def forward(self, features, proposals, image_sizes, targets=None):
        if targets is not None:
            return self._losses(features, proposals, image_sizes, targets)
        return self._detect(features, proposals, image_sizes), {}

    def _losses(self, features, proposals, image_sizes, targets):
        boxes = self._sample_first_stage([p.detach() for p in proposals], targets)
        losses, positives = {}, []
        total_cls = total_box = 0.0
        for t, stage in enumerate(self.stages):
            pooled = self.box_roi_pool(features, boxes, image_sizes)
            logits, deltas = stage(pooled)
            per_image, matched, rows = self._match(stage, boxes, targets)
            if t == 0:
                positives = [
                    {"boxes": b[lab > 0], "matched": r[lab > 0]}
                    for b, r, lab in zip(boxes, rows, per_image)
                ]
            labels = torch.cat(per_image)
            loss_cls = F.cross_entropy(logits, labels)
            pos = torch.where(labels > 0)[0]
            reg_targets = stage.box_coder.encode_single(
                torch.cat(matched)[pos], torch.cat(boxes)[pos]
            )
            loss_box = F.smooth_l1_loss(
                deltas[pos], reg_targets, beta=1 / 9, reduction="sum"
            ) / max(labels.numel(), 1)
            losses[f"stage{t + 1}/loss_cls"], losses[f"stage{t + 1}/loss_box"] = loss_cls, loss_box
            w = STAGE_LOSS_WEIGHTS[t] if t < len(STAGE_LOSS_WEIGHTS) else STAGE_LOSS_WEIGHTS[-1]
            total_cls, total_box = total_cls + w * loss_cls, total_box + w * loss_box
            refined = stage.box_coder.decode(deltas.detach(), boxes).reshape(-1, 4)
            boxes = [
                clip_boxes_to_image(r, s)
                for r, s in zip(refined.split([len(b) for b in boxes]), image_sizes)
            ]
        return positives, {"loss_cls": total_cls, "loss_box": total_box, **losses}

    def _detect(self, features, proposals, image_sizes) -> list[dict]:
        outputs = self.stage_outputs(features, proposals, image_sizes)
        scores = torch.stack([F.softmax(logits, -1) for _, logits, _, _ in outputs]).mean(
            0
        )  # ensemble
        final_boxes = outputs[-1][3]
        results = []
        for boxes, sc in zip(final_boxes, scores.split([len(b) for b in final_boxes])):
            num_classes = sc.shape[1] - 1
            b = boxes[:, None, :].expand(-1, num_classes, 4).reshape(-1, 4)
            s = sc[:, 1:].reshape(-1)
            lab = torch.arange(1, num_classes + 1, device=b.device).repeat(len(boxes))
            keep = torch.where(s > self.score_thresh)[0]
            b, s, lab = b[keep], s[keep], lab[keep]
            keep = remove_small_boxes(b, 1e-2)
            b, s, lab = b[keep], s[keep], lab[keep]
            keep = batched_nms(b, s, lab, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return results
