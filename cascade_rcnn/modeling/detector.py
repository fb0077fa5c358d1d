"""Cascade R-CNN: the whole detection flow, and `build_model`, the one place that reads a config.

    images -> Transform (resize, normalise, pad) -> ResNet -> FPN -> RPN proposals
           -> CascadeROIHeads (stage 1 -> refine -> stage 2 -> refine -> stage 3, scores combined)
           -> per-class NMS -> boxes mapped back to original-image pixels
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascade_rcnn.modeling.anchors import AnchorGenerator
from cascade_rcnn.modeling.backbone import ResNetBackbone
from cascade_rcnn.modeling.box_coder import BoxCoder, clip_boxes
from cascade_rcnn.modeling.cascade_heads import BoxHead, CascadeROIHeads
from cascade_rcnn.config import ModelConfig
from cascade_rcnn.modeling.fpn import FPN
from cascade_rcnn.modeling.matcher import Matcher
from cascade_rcnn.modeling.postprocess import multiclass_nms
from cascade_rcnn.modeling.roi_align import MultiScaleRoIAlign
from cascade_rcnn.modeling.rpn import RegionProposalNetwork, RPNHead
from cascade_rcnn.structures import Detections
from cascade_rcnn.modeling.transform import ImageBatch, Transform


class CascadeRCNN(nn.Module):
    def __init__(
        self,
        transform: Transform,
        backbone: ResNetBackbone,
        fpn: FPN,
        rpn: RegionProposalNetwork,
        roi_heads: CascadeROIHeads,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        class_nms: str = "offset",
        rescale: str = "before_nms",
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.class_nms = class_nms
        self.rescale = rescale

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]], min_size: int | None = None) -> dict[str, Tensor]:
        """Training losses for `images` ((3, H, W) RGB 0-255, original size) and `targets` (`boxes` (G, 4) xyxy in
        original pixels, `labels` (G,) in 0..K-1, optional `iscrowd` (G,) bool). Returns a flat dict of scalar losses:
        loss_rpn_cls, loss_rpn_box, loss_cls_stage{k}, loss_box_stage{k}."""
        batch, targets = self.transform(images, targets, min_size)
        features = self.fpn(self.backbone(batch.tensor))
        proposals, _, rpn_losses = self.rpn(features, batch.image_sizes, targets)
        return {**rpn_losses, **self.roi_heads.loss(features, proposals, targets, batch.image_sizes)}

    @torch.no_grad()
    def predict(self, images: list[Tensor], return_stages: bool = False) -> list[Detections]:
        """Detections for `images` ((3, H, W) RGB 0-255, any size), in original-image pixels."""
        batch, _ = self.transform(images)
        return self.predict_batch(batch, return_stages)

    @torch.no_grad()
    def predict_batch(self, batch: ImageBatch, return_stages: bool = False) -> list[Detections]:
        features = self.fpn(self.backbone(batch.tensor))
        proposals, _, _ = self.rpn(features, batch.image_sizes)
        candidates = self.roi_heads.predict(features, proposals, batch.image_sizes)
        results = []
        for cand, factor, size in zip(candidates, batch.scale_factors, batch.original_sizes):
            detections = self.detect(cand["boxes"], cand["scores"], factor, size)
            if return_stages:
                detections.stages = [
                    self.detect(boxes, scores, factor, size)
                    for boxes, scores in zip(cand["stage_boxes"], cand["stage_scores"])
                ]
            results.append(detections)
        return results

    def detect(
        self, boxes: Tensor, scores: Tensor, scale_factor: tuple[float, float], original_size: tuple[int, int]
    ) -> Detections:
        """Per-class NMS of candidate boxes, and the way back to original pixels ((h, w) = `original_size`).

        mmdetection maps the boxes to original pixels, then runs NMS; with rescale="after_nms" (detectron2's
        `detector_postprocess`) NMS runs in the resized frame, then the kept boxes are mapped back, clipped to the
        original image, and boxes left empty are dropped (so fewer than detections_per_image may remain).
        """
        if self.rescale == "before_nms":
            boxes = self.transform.to_original(boxes, scale_factor)
        boxes, scores, labels = multiclass_nms(
            boxes,
            scores,
            self.score_thresh,
            self.nms_thresh,
            self.detections_per_image,
            self.class_nms == "per_class",
            self.class_nms == "torchvision",
        )
        if self.rescale == "after_nms":
            boxes = clip_boxes(self.transform.to_original(boxes, scale_factor), original_size)
            keep = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).squeeze(1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return Detections(boxes, scores, labels)


def build_model(cfg: ModelConfig) -> CascadeRCNN:
    """Build the detector described by `cfg` (untrained heads; backbone weights as initialised by torchvision)."""
    b, a, r, c = cfg.backbone, cfg.anchors, cfg.rpn, cfg.cascade
    backbone = ResNetBackbone(
        b.depth, b.groups, b.width_per_group, b.frozen_stages, b.bn_eps, b.stride_in_1x1, b.stem_pool,
        norm_trainable=b.norm_trainable,
    )
    fpn = FPN(backbone.out_channels, cfg.fpn.out_channels)
    anchor_generator = AnchorGenerator(a.strides, a.scales, a.ratios, a.center_offset, a.legacy_v1)
    coder = cfg.box_coder
    rpn = RegionProposalNetwork(
        anchor_generator,
        RPNHead(cfg.fpn.out_channels, anchor_generator.num_anchors_per_location),
        BoxCoder((1.0, 1.0, 1.0, 1.0), coder.scale_clamp, coder.plus_one, coder.clip_offset, coder.clamp_below),
        Matcher(r.fg_iou_thresh, r.bg_iou_thresh, r.low_quality_min_iou, ignore_iof_thresh=r.ignore_iof_thresh),
        r.batch_size_per_image,
        r.positive_fraction,
        {"train": r.pre_nms_top_n_train, "test": r.pre_nms_top_n_test},
        {"train": r.post_nms_top_n_train, "test": r.post_nms_top_n_test},
        r.nms_thresh,
        r.nms_per_level,
        r.min_size,
        r.smooth_l1_beta,
        r.loss_box_weight,
        r.proposal_score,
    )
    ra = cfg.roi_align
    roi_align = MultiScaleRoIAlign(
        backbone.strides,
        ra.output_size,
        ra.sampling_ratio,
        ra.aligned,
        ra.canonical_size,
        ra.level_eps,
        ra.plus_one,
        ra.canonical_level,
    )
    in_features = cfg.fpn.out_channels * ra.output_size**2
    num_reg_classes = 1 if c.class_agnostic else cfg.num_classes + int(c.reg_background_slot)
    roi_heads = CascadeROIHeads(
        roi_align,
        [BoxHead(in_features, c.fc_dim, cfg.num_classes, num_reg_classes) for _ in c.stage_ious],
        [
            BoxCoder(stds, coder.scale_clamp, coder.plus_one, coder.clip_offset, coder.clamp_below)
            for stds in c.stage_stds
        ],
        # Later stages take no low-quality matches: a stage's positives must really reach its IoU.
        [Matcher(iou, iou, ignore_iof_thresh=c.ignore_iof_thresh) for iou in c.stage_ious],
        cfg.num_classes,
        c.batch_size_per_image,
        c.positive_fraction,
        c.add_gt_as_proposals,
        c.stage_loss_weights,
        c.smooth_l1_beta,
        c.score_ensemble,
        c.refine_class,
        getattr(torch, c.refine_box_dtype),
    )
    transform = build_transform(cfg)
    p = cfg.postprocess
    return CascadeRCNN(
        transform,
        backbone,
        fpn,
        rpn,
        roi_heads,
        p.score_thresh,
        p.nms_thresh,
        p.detections_per_image,
        p.class_nms,
        p.rescale,
    )


def build_transform(cfg: ModelConfig) -> Transform:
    """The input transform `cfg` describes (what `build_model` gives the model; ONNX backends use it alone)."""
    t = cfg.transform
    return Transform(
        t.min_size,
        t.max_size,
        t.pixel_mean,
        t.pixel_std,
        t.channel_order,
        t.size_divisible,
        t.second_rescale,
        t.pad_to,
        t.pad_before_normalize,
        t.box_scale,
        t.clip_to,
        t.resize_rule,
        t.resize_method,
    )
