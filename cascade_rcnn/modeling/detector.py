"""Cascade R-CNN: the whole detection flow, and `build_model`, the one place that reads a config.

    images -> Transform (resize, normalise, pad) -> ResNet -> FPN -> RPN proposals
           -> CascadeROIHeads (stage 1 -> refine -> stage 2 -> refine -> stage 3, scores combined)
           -> per-class NMS -> boxes mapped back to original-image pixels
           [-> mask heads on the final boxes -> mask probabilities -> pasted into the original image]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cascade_rcnn.config import ModelConfig
from cascade_rcnn.modeling.anchors import AnchorGenerator
from cascade_rcnn.modeling.backbone import ResNetBackbone
from cascade_rcnn.modeling.box_coder import BoxCoder
from cascade_rcnn.modeling.cascade_heads import (
    REFINE_RULES,
    SCORE_ENSEMBLES,
    BoxHead,
    CascadeROIHeads,
    rois_to_proposals,
)
from cascade_rcnn.modeling.fpn import FPN
from cascade_rcnn.modeling.masks import CascadeMaskHeads, MaskHead, paste_per_image
from cascade_rcnn.modeling.matcher import Matcher
from cascade_rcnn.modeling.postprocess import PostProcessor
from cascade_rcnn.modeling.roi_align import MultiScaleRoIAlign
from cascade_rcnn.modeling.rpn import RegionProposalNetwork, RPNHead
from cascade_rcnn.modeling.transform import ImageBatch, Transform, resize_bilinear_cv2, resize_bilinear_pil
from cascade_rcnn.preprocess import input_convention
from cascade_rcnn.structures import Detections


class CascadeRCNN(nn.Module):
    def __init__(
        self,
        *,
        transform: Transform,
        backbone: ResNetBackbone,
        fpn: FPN,
        rpn: RegionProposalNetwork,
        roi_heads: CascadeROIHeads,
        postprocessor: PostProcessor,
        mask_heads: CascadeMaskHeads | None = None,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.postprocessor = postprocessor
        self.mask_heads = mask_heads
        self.mask_threshold = mask_threshold
        # Training forward on channels-last (NHWC) maps: on the CPU oneDNN's own layout, where its convolutions skip
        # their layout reorders and the RoI pooling reads the FPN maps as rows without a copy (a batch-2 800x1333
        # step in 0.77x the time). The same computation up to float rounding; off by default, so `model(images,
        # targets)` runs the ops mmdetection runs in the order it runs them; the trainer sets it (`train.memory_format`).
        self.channels_last = False

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]], min_size: int | None = None
    ) -> dict[str, Tensor]:
        """Training losses for `images` ((3, H, W) RGB 0-255, original size) and `targets` (`boxes` (G, 4) xyxy in
        original pixels, `labels` (G,) in 0..K-1, optional `iscrowd` (G,) bool; for mask models `masks` (G, H, W)
        0/1 over the image). Returns a flat dict of scalar losses: loss_rpn_cls, loss_rpn_box, loss_cls_stage{k},
        loss_box_stage{k}, and loss_mask_stage{k} for each stage a mask head trains on."""
        batch, targets = self.transform(images, targets, min_size)
        pixels = batch.tensor
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        features = self.fpn(self.backbone.feature_maps(pixels))
        rois, _, rpn_losses = self.rpn(features, batch.image_sizes, targets)
        proposals = rois_to_proposals(rois, len(images))
        if self.mask_heads is None:
            return {**rpn_losses, **self.roi_heads.loss(features, proposals, targets, batch.image_sizes)}
        losses, positives = self.roi_heads.loss_and_positives(features, proposals, targets, batch.image_sizes)
        gt_masks = [t.get("masks") for t in targets]
        if any(m is None for m in gt_masks):
            raise ValueError("a mask model trains on targets with instance masks: every target needs 'masks'")
        for stage, stage_positives in enumerate(positives):
            losses.update(self.mask_heads.loss(features, stage, stage_positives, gt_masks))
        return {**rpn_losses, **losses}

    @torch.no_grad()
    def predict(self, images: list[Tensor], return_stages: bool = False) -> list[Detections]:
        """Detections for `images` ((3, H, W) RGB 0-255, any size), in original-image pixels."""
        batch, _ = self.transform(images)
        return self.predict_batch(batch, return_stages)

    @torch.no_grad()
    def predict_batch(self, batch: ImageBatch, return_stages: bool = False) -> list[Detections]:
        """`detect` on a transformed batch, split into one `Detections` per image (with each stage's own when
        `return_stages`)."""
        inputs = batch.as_tensors()
        outputs = self.detect(*inputs, return_stages=return_stages)
        results = split_by_image(outputs[:4], len(batch.image_sizes))
        if self.mask_heads is not None:
            paste_per_image(results, outputs[4], batch.original_sizes, self.mask_threshold)
        if return_stages:
            per_stage = [split_by_image(stage, len(batch.image_sizes)) for stage in outputs[-1]]
            for i, detections in enumerate(results):
                detections.stages = [stage[i] for stage in per_stage]
        return results

    def detect(
        self,
        images: Tensor,
        image_sizes: Tensor,
        scale_factors: Tensor,
        original_sizes: Tensor,
        return_stages: bool = False,
    ) -> tuple:
        """The detection flow on a normalised, padded batch, batch-vectorised and traceable (the ONNX graph is this
        function traced; the optimised inference copy runs it with some modules swapped).

        images (B, 3, H, W); image_sizes (B, 2) int64 (h, w) of each image's extent in it; scale_factors (B, 2) float64
        (w_scale, h_scale); original_sizes (B, 2) int64 (h, w). Returns boxes (D, 4) in original pixels, scores (D,),
        labels (D,), batch_index (D,), grouped by image, each image's by decreasing score; with `return_stages`, a
        last item: the same four for each cascade stage on its own. Mask models return a fifth item (before the
        stages): the detections' mask probabilities (D, 2S, 2S), to paste with their boxes (`paste_masks`).
        """
        features = self.fpn(self.backbone.feature_maps(images))
        sizes = image_sizes.to(torch.float32)
        rois, _, _ = self.rpn(features, sizes)
        scores, stage_boxes, stage_scores = self.roi_heads.predict_rois(features, rois, sizes)
        roi_images = rois[:, 0].long()
        *detections, frame_boxes = self.postprocessor.select(
            stage_boxes[-1], scores, roi_images, scale_factors, original_sizes
        )
        detections = tuple(detections)
        if self.mask_heads is not None:
            # The mask heads pool the final detections' boxes in the frame the network saw.
            mask_rois = torch.cat([detections[3][:, None].to(frame_boxes.dtype), frame_boxes], dim=1)
            detections += (self.mask_heads.predict(features, mask_rois, detections[2]),)
        if not return_stages:
            return detections
        stages = [
            self.postprocessor(boxes, s, roi_images, scale_factors, original_sizes)
            for boxes, s in zip(stage_boxes, stage_scores)
        ]
        return (*detections, stages)

    def postprocess_image(
        self, boxes: Tensor, scores: Tensor, scale_factor: tuple[float, float], original_size: tuple[int, int]
    ) -> Detections:
        """`postprocessor` on one image's candidates (boxes (N, 4) or (N, 4K) in the resized frame, scores (N, K))."""
        device = boxes.device
        images = torch.zeros((scores.shape[0],), dtype=torch.int64, device=device)
        factors = torch.tensor([scale_factor], dtype=torch.float64, device=device)
        sizes = torch.tensor([original_size], dtype=torch.int64, device=device)
        boxes, scores, labels, _ = self.postprocessor(boxes, scores, images, factors, sizes)
        return Detections(boxes, scores, labels)


def split_by_image(detections: tuple[Tensor, ...], num_images: int) -> list[Detections]:
    """(boxes, scores, labels, batch_index) of a batch, grouped by image -> one `Detections` per image."""
    boxes, scores, labels, image = detections
    counts = torch.bincount(image, minlength=num_images).tolist()
    return [Detections(*parts) for parts in zip(boxes.split(counts), scores.split(counts), labels.split(counts))]


def build_model(cfg: ModelConfig) -> CascadeRCNN:
    """Build the detector described by `cfg` (untrained heads; backbone weights as initialised by torchvision).

    The one place that reads a config: every peer convention becomes a module or an object here (the transform's
    resize and canvas policies, the box coders, the post-processor), and the modules never ask which peer they imitate.
    """
    b, a, r, c, ra = cfg.backbone, cfg.anchors, cfg.rpn, cfg.cascade, cfg.roi_align
    backbone = ResNetBackbone(
        depth=b.depth,
        groups=b.groups,
        width_per_group=b.width_per_group,
        frozen_stages=b.frozen_stages,
        bn_eps=b.bn_eps,
        stride_in_1x1=b.stride_in_1x1,
        stem_pool=b.stem_pool,
        norm_trainable=b.norm_trainable,
    )
    fpn = FPN(in_channels=backbone.out_channels, out_channels=cfg.fpn.out_channels)
    anchor_generator = AnchorGenerator(
        strides=a.strides, scales=a.scales, ratios=a.ratios, center_offset=a.center_offset, legacy_v1=a.legacy_v1
    )
    rpn = RegionProposalNetwork(
        anchor_generator=anchor_generator,
        head=RPNHead(in_channels=cfg.fpn.out_channels, num_anchors=anchor_generator.num_anchors_per_location),
        box_coder=build_box_coder(cfg, stds=(1.0, 1.0, 1.0, 1.0)),
        matcher=Matcher(r.fg_iou_thresh, r.bg_iou_thresh, r.low_quality_min_iou, ignore_iof_thresh=r.ignore_iof_thresh),
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n={"train": r.pre_nms_top_n_train, "test": r.pre_nms_top_n_test},
        post_nms_top_n={"train": r.post_nms_top_n_train, "test": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
        nms_per_level=r.nms_per_level,
        min_size=r.min_size,
        smooth_l1_beta=r.smooth_l1_beta,
        loss_box_weight=r.loss_box_weight,
        # Ranking by logits (detectron2) keeps apart what float32 sigmoids round to the same value near 1.
        proposal_score=torch.sigmoid if r.proposal_score == "sigmoid" else None,
    )

    def pooler(output_size: int) -> MultiScaleRoIAlign:
        """RoIAlign over P2-P5 by `cfg.roi_align`'s rules, at `output_size` (7 for the box heads, 14 for masks)."""
        return MultiScaleRoIAlign(
            strides=backbone.strides,
            output_size=output_size,
            sampling_ratio=ra.sampling_ratio,
            aligned=ra.aligned,
            canonical_size=ra.canonical_size,
            level_eps=ra.level_eps,
            plus_one=ra.plus_one,
            canonical_level=ra.canonical_level,
        )

    roi_align = pooler(ra.output_size)
    in_features = cfg.fpn.out_channels * ra.output_size**2
    num_reg_classes = 1 if c.class_agnostic else cfg.num_classes + int(c.reg_background_slot)
    roi_heads = CascadeROIHeads(
        roi_align=roi_align,
        box_heads=[
            BoxHead(in_features=in_features, fc_dim=c.fc_dim, num_classes=cfg.num_classes,
                    num_reg_classes=num_reg_classes)
            for _ in c.stage_ious
        ],
        box_coders=[build_box_coder(cfg, stds=stds) for stds in c.stage_stds],
        # Later stages take no low-quality matches: a stage's positives must really reach its IoU.
        matchers=[Matcher(iou, iou, ignore_iof_thresh=c.ignore_iof_thresh) for iou in c.stage_ious],
        num_classes=cfg.num_classes,
        batch_size_per_image=c.batch_size_per_image,
        positive_fraction=c.positive_fraction,
        add_gt_as_proposals=c.add_gt_as_proposals,
        stage_loss_weights=c.stage_loss_weights,
        smooth_l1_beta=c.smooth_l1_beta,
        score_ensemble=SCORE_ENSEMBLES[c.score_ensemble],
        refine_class=REFINE_RULES[c.refine_class],
        refine_box_dtype=getattr(torch, c.refine_box_dtype),
    )
    mask_heads = None
    if cfg.has_masks:
        m = cfg.mask
        train_stages = tuple(range(len(c.stage_ious))) if m.heads == "per_stage" else (0,)
        weights = c.stage_loss_weights if m.heads == "per_stage" else (1.0,)
        mask_heads = CascadeMaskHeads(
            roi_align=pooler(m.roi_size),
            heads=[
                MaskHead(in_channels=cfg.fpn.out_channels, conv_dim=m.conv_dim, num_convs=m.num_convs,
                         num_classes=cfg.num_classes)
                for _ in train_stages
            ],
            train_stages=train_stages,
            loss_weights=tuple(m.loss_weight * w for w in weights),
        )
    p = cfg.postprocess
    postprocessor = PostProcessor(
        score_thresh=p.score_thresh,
        nms_thresh=p.nms_thresh,
        detections_per_image=p.detections_per_image,
        class_nms=p.class_nms,
        rescale=p.rescale,
    )
    return CascadeRCNN(
        transform=build_transform(cfg), backbone=backbone, fpn=fpn, rpn=rpn, roi_heads=roi_heads,
        postprocessor=postprocessor, mask_heads=mask_heads, mask_threshold=cfg.mask.threshold,
    )


def build_box_coder(cfg: ModelConfig, *, stds: tuple[float, float, float, float]) -> BoxCoder:
    """The box coder of `cfg`'s convention with the given stds (the RPN's are 1, each cascade stage has its own)."""
    coder = cfg.box_coder
    return BoxCoder(
        stds=stds,
        scale_clamp=coder.scale_clamp,
        plus_one=coder.plus_one,
        clip_offset=coder.clip_offset,
        clamp_below=coder.clamp_below,
    )


def build_transform(cfg: ModelConfig) -> Transform:
    """The input transform `cfg` describes (what `build_model` gives the model; ONNX backends use it alone): the
    convention `input_convention` reads from the config, with its pixel resize on tensors."""
    c = input_convention(cfg.transform)
    return Transform(
        resize=c.resize,
        resize_pixels={"cv2_bilinear": resize_bilinear_cv2, "pil_bilinear": resize_bilinear_pil}[c.resize_method],
        canvas=c.canvas,
        box_factors=c.box_factors,
        pixel_mean=c.pixel_mean,
        pixel_std=c.pixel_std,
        channels=c.channels,
    )
