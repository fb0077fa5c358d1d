"""Configuration: frozen dataclasses, read in one place (`cascade_rcnn.model.build_model`), and named presets.

Defaults follow mmdetection 3.x `cascade-rcnn_r50_fpn_1x_coco.py` exactly. Every place where detectron2 or the seed's
MindSpore code chose otherwise is a named field here, with mmdetection's choice as the default; the peers' presets are
collections of those fields (`cascade_rcnn_r50_fpn_detectron2`, `cascade_rcnn_r101_fpn_mindspore`).
"""

from __future__ import annotations

import dataclasses
import math
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


@dataclass(frozen=True)
class FPNConfig:
    out_channels: int = 256
    # Upsampling in the top-down path: nearest to the lateral's size (mmdet) or nearest x2 (same on /32-padded input).
    extra_level: Literal["maxpool"] = "maxpool"  # P6 = max_pool2d(P5, 1, stride 2)


@dataclass(frozen=True)
class AnchorConfig:
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    scales: tuple[float, ...] = (8.0,)  # anchor side = stride * scale
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # h / w
    # Anchor centre in units of stride: 0 (mmdet AnchorGenerator), 0.5 (detectron2 offset), or the legacy mmdet-v1
    # convention (centre (stride-1)/2, rounded sizes, "+1" extents) used by the seed.
    center_offset: float = 0.0
    legacy_v1: bool = False


@dataclass(frozen=True)
class BoxCoderConfig:
    scale_clamp: float = DEFAULT_SCALE_CLAMP  # clamp of dw, dh before exp
    plus_one: bool = False  # legacy "+1" widths (x2 - x1 + 1), as the seed's MindSpore code


@dataclass(frozen=True)
class RPNConfig:
    pre_nms_top_n_train: int = 2000  # per level
    pre_nms_top_n_test: int = 1000  # per level
    post_nms_top_n_train: int = 2000  # per image
    post_nms_top_n_test: int = 1000  # per image
    nms_thresh: float = 0.7
    nms_per_level: bool = True  # mmdet/MindSpore: NMS within each level; detectron2 too (batched by level)
    min_size: float = 0.0  # drop proposals with w or h <= min_size
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    low_quality_min_iou: float = 0.3  # best-anchor matches kept only above this IoU (mmdet min_pos_iou)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    smooth_l1_beta: float = 1.0 / 9.0
    loss_box_weight: float = 1.0


@dataclass(frozen=True)
class RoIAlignConfig:
    output_size: int = 7
    sampling_ratio: int = 0
    aligned: bool = True  # mmdet/detectron2 True (half-pixel shift); MindSpore and old torchvision False
    canonical_size: float = 56.0  # level = floor(log2(sqrt(wh) / canonical_size + eps)), clamped to P2..P5
    level_eps: float = 1e-6


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
    smooth_l1_beta: float = 1.0
    # How the stages' class scores are combined at inference:
    #   "mean_logits": softmax of the mean of the logits (mmdetection);
    #   "mean_probs":  mean of the per-stage softmax probabilities (detectron2, the paper);
    #   "last":        the last stage's softmax only (the seed).
    score_ensemble: Literal["mean_logits", "mean_probs", "last"] = "mean_logits"
    # Class-specific refinement between stages picks the box of: "label" (the gt label in training, the argmax over
    # foreground classes at test, mmdet) or "argmax_with_background" (argmax including background, the seed).
    refine_class: Literal["label", "argmax_with_background"] = "label"


@dataclass(frozen=True)
class PostProcessConfig:
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100


@dataclass(frozen=True)
class TransformConfig:
    min_size: int = 800  # short side
    max_size: int = 1333  # long side
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0-255
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    channel_order: Literal["rgb", "bgr"] = "rgb"  # what the network's first conv expects
    size_divisible: int = 32


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


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "cascade_rcnn_r50_fpn": cascade_rcnn_r50_fpn,
    "cascade_rcnn_r101_fpn": cascade_rcnn_r101_fpn,
    "cascade_rcnn_x101_32x4d_fpn": cascade_rcnn_x101_32x4d_fpn,
    "cascade_rcnn_x101_64x4d_fpn": cascade_rcnn_x101_64x4d_fpn,
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


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return `cfg` with fields replaced; keys may be dotted (`"rpn.nms_thresh"`). Unknown keys raise ConfigError.

    Setting `num_classes` without `class_names` drops names that no longer fit.
    """
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        names = {f.name for f in dataclasses.fields(cfg)}
        if head not in names:
            raise ConfigError(f"unknown config key {key!r} in {type(cfg).__name__}; known: {', '.join(sorted(names))}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = with_overrides(flat.get(head, getattr(cfg, head)), sub)
    for name, value in list(flat.items()):
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            flat[name] = with_overrides(current, value)
    if isinstance(cfg, ModelConfig) and "num_classes" in flat and "class_names" not in flat:
        if cfg.class_names is not None and len(cfg.class_names) != flat["num_classes"]:
            flat["class_names"] = None
    return dataclasses.replace(cfg, **flat)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], cls: type = ModelConfig) -> Any:
    """Rebuild a config dataclass from `config_to_dict` output (or a user's TOML/YAML mapping).

    Unknown keys raise ConfigError naming the key; lists become tuples; nested dataclasses are rebuilt.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r} in {cls.__name__}; known: {', '.join(sorted(fields))}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            kwargs[key] = config_from_dict(value, type(default))
        else:
            kwargs[key] = _to_tuples(value)
    return cls(**kwargs)


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value
