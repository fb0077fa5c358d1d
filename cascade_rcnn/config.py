"""Configuration: frozen dataclasses, read in one place (`cascade_rcnn.modeling.detector.build_model`), and named presets.

Defaults follow mmdetection 3.x `cascade-rcnn_r50_fpn_1x_coco.py` exactly. Every place where detectron2 or the seed's
MindSpore code chose otherwise is a named field here, with mmdetection's choice as the default; the peers' presets are
collections of those fields (`cascade_rcnn_r50_fpn_detectron2`, `cascade_rcnn_r101_fpn_mindspore`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from cascade_rcnn.errors import ConfigError

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

# mmdetection's DeltaXYWHBBoxCoder clamp of dw/dh: |log(16/1000)|.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 50  # 50 or 101
    groups: int = 1  # ResNeXt cardinality (32 or 64); 1 for ResNet
    width_per_group: int = 64  # ResNeXt bottleneck width (4); 64 for ResNet
    frozen_stages: int = 1  # stem + this many residual stages get no gradient
    bn_eps: float = 1e-5
    stride_in_1x1: bool = False  # False: stride on the 3x3 conv (mmdet 'pytorch' style); True: on the 1x1 (detectron2 MSRA)
    stem_pool: Literal["pad1", "tf_same"] = "pad1"  # 3x3/2 max-pool padding: 1 (torchvision) or TF 'SAME' (MindSpore)
    # Batch norm always normalises with its frozen running statistics; its affine weight and bias are trained in the
    # stages not frozen (True: mmdetection's requires_grad=True with norm_eval=True, and the MindSpore seed's) or frozen
    # too (False: detectron2's FrozenBN). The state_dict is the same either way.
    norm_trainable: bool = True


@dataclass(frozen=True)
class FPNConfig:
    out_channels: int = 256
    # Upsampling in the top-down path: nearest to the lateral's size (mmdet) or nearest x2 (same on /32-padded input).


@dataclass(frozen=True)
class AnchorConfig:
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    scales: tuple[float, ...] = (8.0,)  # anchor side = stride * scale
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # h / w
    # Anchor centre in units of stride: 0 (mmdet AnchorGenerator; detectron2's ANCHOR_GENERATOR.OFFSET 0.0 too, its
    # default and the Cascade R-CNN configs'), 0.5 (detectron2 OFFSET=0.5), or the legacy mmdet-v1 convention (centre
    # (stride-1)/2, rounded sizes, "+1" extents) used by the seed.
    center_offset: float = 0.0
    legacy_v1: bool = False


@dataclass(frozen=True)
class BoxCoderConfig:
    scale_clamp: float = DEFAULT_SCALE_CLAMP  # clamp of dw, dh before exp
    plus_one: bool = False  # legacy "+1" widths (x2 - x1 + 1), as the seed's MindSpore code
    # Decoded boxes are clipped to [0, w - clip_offset] x [0, h - clip_offset]. None: 1 with plus_one (mmdetection v1),
    # else 0. The seed's BoundingBoxDecode clips to (w, h) even with "+1" widths: 0.
    clip_offset: float | None = None
    # dw, dh are clamped to [-scale_clamp, scale_clamp] (mmdetection); False: from above only (detectron2's
    # Box2BoxTransform, which lets boxes shrink without limit).
    clamp_below: bool = True


@dataclass(frozen=True)
class RPNConfig:
    pre_nms_top_n_train: int = 2000  # per level
    pre_nms_top_n_test: int = 1000  # per level
    post_nms_top_n_train: int = 2000  # per image
    post_nms_top_n_test: int = 1000  # per image
    nms_thresh: float = 0.7
    nms_per_level: bool = True  # mmdet/MindSpore: NMS within each level; detectron2 too (batched by level)
    min_size: float | None = 0.0  # drop proposals with w or h <= min_size; None: no filter at all (the seed)
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    low_quality_min_iou: float = 0.3  # best-anchor matches kept only above this IoU (mmdet min_pos_iou)
    # Crowd boxes (iscrowd) are never ground truth. None: they have no effect at all (mmdetection's ignore_iof_thr=-1;
    # detectron2 and the seed drop them); a float t: anchors a crowd box covers (intersection / anchor area > t) are
    # ignored (mmdetection's ignore_iof_thr).
    ignore_iof_thresh: float | None = None
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    smooth_l1_beta: float = 1.0 / 9.0
    loss_box_weight: float = 1.0
    # What proposals are ranked by (per-level top-k, NMS) at inference: "sigmoid" probabilities (mmdetection) or raw
    # "logit"s (detectron2; the same order, except that float32 sigmoids of large logits tie where logits do not).
    proposal_score: Literal["sigmoid", "logit"] = "sigmoid"


@dataclass(frozen=True)
class RoIAlignConfig:
    output_size: int = 7
    sampling_ratio: int = 0
    aligned: bool = True  # mmdet/detectron2 True (half-pixel shift); MindSpore and old torchvision False
    canonical_size: float = 56.0  # level = floor(log2(sqrt(wh) / canonical_size + eps)), clamped to P2..P5
    level_eps: float = 1e-6
    # Legacy "+1" RoI extents (mmdetection v1; MindSpore ROIAlign roi_end_mode=1): a RoI covers [x1, x2 + 1] on the
    # image, with no 1-cell minimum size, and its level comes from sqrt((w + 1) * (h + 1)). Used with aligned=False.
    plus_one: bool = False
    # None: the formula above (mmdetection). An int k: level P(floor(k + log2(sqrt(wh) / canonical_size + eps))), i.e.
    # a canonical_size box on P(k), as detectron2's assign_boxes_to_levels (k 4, canonical_size 224, eps 1e-8): the
    # same bins as (56, 4e-8) mathematically, but adding k after the log rounds differently within ~1e-7 of a bin edge.
    canonical_level: int | None = None


@dataclass(frozen=True)
class CascadeConfig:
    stage_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    # Box-delta stds per stage (the reciprocal of detectron2's weights (10,10,5,5), (20,20,10,10), (30,30,15,15)).
    stage_stds: tuple[tuple[float, float, float, float], ...] = (
        (0.1, 0.1, 0.2, 0.2),
        (0.05, 0.05, 0.1, 0.1),
        (0.033, 0.033, 0.067, 0.067),
    )
    stage_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25)
    fc_dim: int = 1024
    class_agnostic: bool = True
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    add_gt_as_proposals: bool = True
    ignore_iof_thresh: float | None = None  # crowd boxes, as rpn.ignore_iof_thresh, for each stage's proposals
    smooth_l1_beta: float = 1.0
    # How the stages' class scores are combined at inference:
    #   "mean_logits": softmax of the mean of the logits (mmdetection);
    #   "mean_probs":  mean of the per-stage softmax probabilities (detectron2, the paper);
    #   "last":        the last stage's softmax only (the seed).
    score_ensemble: Literal["mean_logits", "mean_probs", "last"] = "mean_logits"
    # Class-specific refinement between stages picks the box of: "label" (the gt label in training, the argmax over
    # foreground classes at test, mmdet) or "argmax_with_background" (argmax including background, the seed).
    refine_class: Literal["label", "argmax_with_background"] = "label"
    # Class-specific regression has a background slot too: 4 * (num_classes + 1) outputs, background last as in the
    # logits (the seed's 324 = 81 x 4); argmax_with_background refinement may then pick the background's box.
    reg_background_slot: bool = False
    # Boxes are rounded to this dtype before each inter-stage decode: "float32" (no rounding) or "float16" (the seed
    # casts the RoIs to float16 in get_rois_decode; coordinates >= 1024 move by up to 0.5 px).
    refine_box_dtype: Literal["float32", "float16"] = "float32"


@dataclass(frozen=True)
class MaskConfig:
    # Instance-mask heads (Cascade Mask R-CNN):
    #   "none":      a box-only Cascade R-CNN;
    #   "per_stage": one FCN mask head per cascade stage (mmdetection): each trained on its own stage's positives with
    #                the stage's loss weight; at test time all of them run on the final detections and their sigmoid
    #                probabilities are averaged;
    #   "single":    one mask head (detectron2): trained on the first stage's positives, run on the final detections.
    heads: Literal["none", "per_stage", "single"] = "none"
    roi_size: int = 14  # RoIAlign output of the mask heads (the 7x7 box RoIAlign's other settings)
    num_convs: int = 4  # 3x3 convs, then a stride-2 2x2 transposed conv: masks of 2 * roi_size cells per side
    conv_dim: int = 256
    threshold: float = 0.5  # a pixel is in the mask when its pasted probability is >= threshold
    loss_weight: float = 1.0  # times the stage loss weight (per_stage) or alone (single)


@dataclass(frozen=True)
class PostProcessConfig:
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    # How NMS keeps classes apart: "offset" (mmcv's batched_nms: below 10000 boxes one call on boxes shifted apart by
    # class) or "per_class" (one NMS call per class, as the seed's NMSWithMask loop; same result up to float rounding),
    # or "torchvision" (torchvision.ops.batched_nms itself, as detectron2: per class above 1000 boxes on the CPU, the
    # offset trick below, and its own order among tied scores at the detections_per_image cut).
    class_nms: Literal["offset", "per_class", "torchvision"] = "offset"
    # Where the boxes go back to original pixels: "before_nms" (mmdetection's box-only models), "after_nms"
    # (detectron2's detector_postprocess): NMS in the resized frame, then the kept boxes are rescaled, clipped to the
    # original image, and empty ones dropped; or "divide_after_nms" (mmdetection's models with a mask head): NMS in the
    # resized frame, then the kept boxes divided by the scale factors, not clipped.
    rescale: Literal["before_nms", "after_nms", "divide_after_nms"] = "before_nms"
    # COCO results files write w = x2 - x1 + 1 and h = y2 - y1 + 1 (the seed's det2json) instead of x2 - x1, y2 - y1.
    coco_wh_plus_one: bool = False


@dataclass(frozen=True)
class TransformConfig:
    min_size: int = 800  # short side
    max_size: int = 1333  # long side
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0-255
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    channel_order: Literal["rgb", "bgr"] = "rgb"  # what the network's first conv expects
    size_divisible: int = 32
    # The seed's portrait rule: an image still taller than min_size after the keep-ratio resize is resized again, in a
    # second bilinear pass, to height min_size (mmcv imrescale to (min_size, min_size)), so it fits the canvas.
    second_rescale: bool = False
    # Pad every image into this fixed (h, w) canvas, bottom/right, instead of the batch's largest size rounded up to
    # size_divisible. An image larger than the canvas is an error.
    pad_to: tuple[int, int] | None = None
    # Pad the 0-255 image with zeros before normalising, so padding becomes -mean/std (the seed), instead of after (0).
    pad_before_normalize: bool = False
    # How boxes go back to original pixels: "per_axis" through new_w / w and new_h / h (mmdetection), or "scalar"
    # through the resize scale itself on both axes (mmcv imrescale's returned scale, the seed's img_metas).
    box_scale: Literal["per_axis", "scalar"] = "per_axis"
    # What the RPN and heads clip boxes to (and, in training, keep anchors inside): each resized "image" (mmdetection)
    # or the whole padded "canvas" (the seed clips to 768 x 1280 whatever the image size).
    clip_to: Literal["image", "canvas"] = "image"
    # How the resized size is computed: "keep_ratio" s = min(max_size / long, min_size / short), side * s + 0.5
    # truncated (mmcv imrescale); "shortest_edge": short side to min_size, long side with it, both scaled down when the
    # long side exceeds max_size, then + 0.5 truncated (detectron2 ResizeShortestEdge; ~1 size in 10^4 differs by 1 px).
    resize_rule: Literal["keep_ratio", "shortest_edge"] = "keep_ratio"
    # How pixels are resized: "cv2_bilinear" (OpenCV INTER_LINEAR's fixed-point arithmetic, mmcv) or "pil_bilinear"
    # (Pillow's BILINEAR on the uint8 image, detectron2's; antialiased when shrinking).
    resize_method: Literal["cv2_bilinear", "pil_bilinear"] = "cv2_bilinear"


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 80
    class_names: tuple[str, ...] | None = COCO_CLASSES
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    box_coder: BoxCoderConfig = field(default_factory=BoxCoderConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_align: RoIAlignConfig = field(default_factory=RoIAlignConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}"
            )
        n = len(self.cascade.stage_ious)
        if not (len(self.cascade.stage_stds) == len(self.cascade.stage_loss_weights) == n):
            raise ConfigError("cascade.stage_ious, stage_stds and stage_loss_weights must have the same length")
        if self.backbone.depth not in (50, 101):
            raise ConfigError(f"backbone.depth must be 50 or 101, got {self.backbone.depth}")
        if self.cascade.reg_background_slot and self.cascade.class_agnostic:
            raise ConfigError("cascade.reg_background_slot needs class-specific regression (class_agnostic=False)")
        if self.roi_align.plus_one and self.roi_align.aligned:
            raise ConfigError("roi_align.plus_one is the legacy extent of aligned=False; set roi_align.aligned=False")

    @property
    def has_masks(self) -> bool:
        """True for a Cascade Mask R-CNN (instance masks beside the boxes)."""
        return self.mask.heads != "none"

    @property
    def names(self) -> tuple[str, ...]:
        """Class names, or "class_<i>" when none were given."""
        return self.class_names or tuple(f"class_{i}" for i in range(self.num_classes))


# ---------------------------------------------------------------------------------------------------------------------
# Presets


def cascade_rcnn_r50_fpn(**overrides: Any) -> ModelConfig:
    """mmdetection's `cascade-rcnn_r50_fpn_1x_coco` (69.4 M parameters with 80 classes)."""
    return with_overrides(ModelConfig(), overrides)


def cascade_rcnn_r101_fpn(**overrides: Any) -> ModelConfig:
    """mmdetection's `cascade-rcnn_r101_fpn_1x_coco` (88.4 M parameters with 80 classes)."""
    return with_overrides(ModelConfig(backbone=BackboneConfig(depth=101)), overrides)


def cascade_rcnn_x101_32x4d_fpn(**overrides: Any) -> ModelConfig:
    """mmdetection's `cascade-rcnn_x101-32x4d_fpn_1x_coco`: ResNeXt-101, 32 groups of width 4 (88.0 M parameters)."""
    return with_overrides(ModelConfig(backbone=BackboneConfig(depth=101, groups=32, width_per_group=4)), overrides)


def cascade_rcnn_x101_64x4d_fpn(**overrides: Any) -> ModelConfig:
    """mmdetection's `cascade-rcnn_x101-64x4d_fpn_1x_coco`: ResNeXt-101, 64 groups of width 4 (127.3 M parameters)."""
    return with_overrides(ModelConfig(backbone=BackboneConfig(depth=101, groups=64, width_per_group=4)), overrides)


def cascade_rcnn_r101_fpn_mindspore(**overrides: Any) -> ModelConfig:
    """The seed's MindSpore model-zoo Cascade R-CNN R-101-FPN (`research/cv/CascadeRCNN`), inference quirks included,
    for its published checkpoint (37.3 AP on COCO val2017). Each quirk is one named setting; see
    `shared/specs/mindspore_cascadercnn.md` §5-6 and `shared/reference/mindspore/README.md`."""
    seed_stds = (0.1, 0.1, 0.2, 0.2)
    cfg = ModelConfig(
        backbone=BackboneConfig(depth=101, stem_pool="tf_same"),
        anchors=AnchorConfig(legacy_v1=True),
        box_coder=BoxCoderConfig(plus_one=True, clip_offset=0.0),
        rpn=RPNConfig(min_size=None),
        roi_align=RoIAlignConfig(sampling_ratio=2, aligned=False, plus_one=True),
        cascade=CascadeConfig(
            stage_stds=(seed_stds, seed_stds, seed_stds),
            stage_loss_weights=(1.0, 1.0, 1.0),
            class_agnostic=False,
            reg_background_slot=True,
            score_ensemble="last",
            refine_class="argmax_with_background",
            refine_box_dtype="float16",
        ),
        postprocess=PostProcessConfig(detections_per_image=128, class_nms="per_class", coco_wh_plus_one=True),
        transform=TransformConfig(
            min_size=768,
            max_size=1280,
            second_rescale=True,
            pad_to=(768, 1280),
            pad_before_normalize=True,
            box_scale="scalar",
            clip_to="canvas",
        ),
    )
    return with_overrides(cfg, overrides)


def cascade_rcnn_r50_fpn_detectron2(**overrides: Any) -> ModelConfig:
    """detectron2's `Misc/cascade_mask_rcnn_R_50_FPN_{1x,3x}` box path (42.1 / 44.3 box AP with its model-zoo weights).
    Each difference from mmdetection is one named setting; see `shared/reference/detectron2/README.md`."""
    cfg = ModelConfig(
        backbone=BackboneConfig(stride_in_1x1=True, norm_trainable=False),  # MSRA ResNet (STRIDE_IN_1X1), FrozenBN
        box_coder=BoxCoderConfig(clamp_below=False),  # Box2BoxTransform clamps dw, dh from above only
        rpn=RPNConfig(proposal_score="logit"),  # find_top_rpn_proposals ranks raw logits
        roi_align=RoIAlignConfig(canonical_size=224.0, canonical_level=4, level_eps=1e-8),  # ROIPooler levels
        cascade=CascadeConfig(
            # 1 / ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS (10,10,5,5), (20,20,10,10), (30,30,15,15)
            stage_stds=((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (1 / 30, 1 / 30, 1 / 15, 1 / 15)),
            score_ensemble="mean_probs",
        ),
        postprocess=PostProcessConfig(class_nms="torchvision", rescale="after_nms"),
        transform=TransformConfig(
            # MODEL.PIXEL_MEAN / PIXEL_STD, in the network's BGR order
            pixel_mean=(103.53, 116.28, 123.675),
            pixel_std=(1.0, 1.0, 1.0),
            channel_order="bgr",
            resize_rule="shortest_edge",
            resize_method="pil_bilinear",
        ),
    )
    return with_overrides(cfg, overrides)


def _with_masks(box_preset: Callable[..., ModelConfig], heads: str, rescale: str) -> Callable[..., ModelConfig]:
    def preset(**overrides: Any) -> ModelConfig:
        cfg = box_preset()
        cfg = dataclasses.replace(
            cfg,
            mask=MaskConfig(heads=heads),
            postprocess=dataclasses.replace(cfg.postprocess, rescale=rescale),
        )
        return with_overrides(cfg, overrides)

    return preset


# Cascade Mask R-CNN: the box presets with mask heads. mmdetection's keep the box post-processing in the resized frame
# when a mask head exists (its BaseRoIHead passes rescale=False to the box head), and divide the kept boxes by the
# scale factors afterwards; detectron2's post-processing is the same with or without masks.
cascade_mask_rcnn_r50_fpn = _with_masks(cascade_rcnn_r50_fpn, "per_stage", "divide_after_nms")
cascade_mask_rcnn_r50_fpn.__doc__ = "mmdetection's `cascade-mask-rcnn_r50_fpn_1x_coco` (41.2 box / 35.9 mask AP with its weights)."
cascade_mask_rcnn_r101_fpn = _with_masks(cascade_rcnn_r101_fpn, "per_stage", "divide_after_nms")
cascade_mask_rcnn_r101_fpn.__doc__ = "mmdetection's `cascade-mask-rcnn_r101_fpn_1x_coco` (42.9 / 37.3)."
cascade_mask_rcnn_x101_32x4d_fpn = _with_masks(cascade_rcnn_x101_32x4d_fpn, "per_stage", "divide_after_nms")
cascade_mask_rcnn_x101_32x4d_fpn.__doc__ = "mmdetection's `cascade-mask-rcnn_x101-32x4d_fpn_1x_coco` (44.3 / 38.3)."
cascade_mask_rcnn_x101_64x4d_fpn = _with_masks(cascade_rcnn_x101_64x4d_fpn, "per_stage", "divide_after_nms")
cascade_mask_rcnn_x101_64x4d_fpn.__doc__ = "mmdetection's `cascade-mask-rcnn_x101-64x4d_fpn_1x_coco` (45.3 / 39.2)."
cascade_mask_rcnn_r50_fpn_detectron2 = _with_masks(cascade_rcnn_r50_fpn_detectron2, "single", "after_nms")
cascade_mask_rcnn_r50_fpn_detectron2.__doc__ = (
    "detectron2's `Misc/cascade_mask_rcnn_R_50_FPN_{1x,3x}` with its mask head (36.4 / 38.5 mask AP with its weights)."
)


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "cascade_rcnn_r50_fpn": cascade_rcnn_r50_fpn,
    "cascade_rcnn_r101_fpn": cascade_rcnn_r101_fpn,
    "cascade_rcnn_x101_32x4d_fpn": cascade_rcnn_x101_32x4d_fpn,
    "cascade_rcnn_x101_64x4d_fpn": cascade_rcnn_x101_64x4d_fpn,
    "cascade_rcnn_r101_fpn_mindspore": cascade_rcnn_r101_fpn_mindspore,
    "cascade_rcnn_r50_fpn_detectron2": cascade_rcnn_r50_fpn_detectron2,
    "cascade_mask_rcnn_r50_fpn": cascade_mask_rcnn_r50_fpn,
    "cascade_mask_rcnn_r101_fpn": cascade_mask_rcnn_r101_fpn,
    "cascade_mask_rcnn_x101_32x4d_fpn": cascade_mask_rcnn_x101_32x4d_fpn,
    "cascade_mask_rcnn_x101_64x4d_fpn": cascade_mask_rcnn_x101_64x4d_fpn,
    "cascade_mask_rcnn_r50_fpn_detectron2": cascade_mask_rcnn_r50_fpn_detectron2,
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a preset by name; `overrides` are dotted or top-level field names (`num_classes=3`, `rpn.nms_thresh=0.6`)."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
    return preset(**overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Overrides and (de)serialisation


def with_overrides(cfg: Any, overrides: dict[str, Any], _prefix: str = "") -> Any:
    """Return `cfg` with fields replaced; keys may be dotted (`"rpn.nms_thresh"`). Unknown keys raise ConfigError
    naming the full key.

    Setting `num_classes` without `class_names` drops names that no longer fit.
    """
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(
                f"unknown config key {_prefix + key!r} ({type(cfg).__name__} has: {', '.join(sorted(names))})"
            )
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = with_overrides(flat.get(head, getattr(cfg, head)), sub, f"{_prefix}{head}.")
    hints = typing.get_type_hints(type(cfg))
    for name, value in list(flat.items()):
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            flat[name] = with_overrides(current, value, f"{_prefix}{name}.")
        elif not dataclasses.is_dataclass(value):
            flat[name] = check_value(value, hints[name], _prefix + name)
    if isinstance(cfg, ModelConfig) and "num_classes" in flat and "class_names" not in flat:
        if cfg.class_names is not None and len(cfg.class_names) != flat["num_classes"]:
            flat["class_names"] = None
    return dataclasses.replace(cfg, **flat)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(cfg)


# Keys that configs stored by earlier versions carry (weights files, ONNX metadata, training checkpoints) and this
# version has no field for, each with the one value it could hold. `config_from_dict` drops them, so those files load.
LEGACY_KEYS: dict[str, Any] = {
    "fpn.extra_level": "maxpool",  # P6 = max_pool2d(P5, 1, stride 2): the only extra level there ever was
}


def config_from_dict(data: dict[str, Any], cls: type = ModelConfig, _prefix: str = "") -> Any:
    """Rebuild a config dataclass from `config_to_dict` output (or a user's TOML/YAML mapping).

    Unknown keys raise ConfigError naming the key, except a `LEGACY_KEYS` entry with its one value (a config stored by
    an earlier version), which is dropped; lists become tuples; nested dataclasses are rebuilt.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields and _prefix + key in LEGACY_KEYS and LEGACY_KEYS[_prefix + key] == value:
            continue
        if key not in fields:
            raise ConfigError(f"unknown config key {_prefix + key!r} ({cls.__name__} has: {', '.join(sorted(fields))})")
        hint = typing.get_type_hints(cls)[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = config_from_dict(value, hint, f"{_prefix}{key}.")
        else:
            kwargs[key] = check_value(value, hint, _prefix + key)
    return cls(**kwargs)


def check_value(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to the field type `hint` (lists to tuples, ints to floats), or ConfigError naming `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return check_value(value, option, key)
            except ConfigError:
                continue
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) == len(value):
            return tuple(check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif hint is type(None):
        if value is None:
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    expected = " or ".join(repr(a) for a in args) if origin is typing.Literal else _type_name(hint)
    raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "")
