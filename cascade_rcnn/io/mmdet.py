"""mmdetection Cascade R-CNN checkpoints (`.pth`, mmdetection 2.x and 3.x) -> the project's model.

The project's default presets follow mmdetection 3.x semantics, so a checkpoint needs a name map and nothing else:

    mmdetection                                           project
    backbone.*                                            backbone.*  (mmdet's ResNet/ResNeXt names are torchvision's)
    neck.{lateral,fpn}_convs.{i}.conv.{weight,bias}       fpn.{lateral,fpn}_convs.{i}.{weight,bias}
    rpn_head.rpn_conv.*                                   rpn.head.conv.*
    rpn_head.rpn_cls.*                                    rpn.head.cls_logits.*
    rpn_head.rpn_reg.*                                    rpn.head.bbox_pred.*
    roi_head.bbox_head.{s}.{shared_fcs.{j},fc_cls,fc_reg}.*   roi_heads.box_heads.{s}.{...}.*
    roi_head.mask_head.{s}.convs.{i}.conv.*               mask_heads.heads.{s}.convs.{i}.*   (Cascade Mask R-CNN)
    roi_head.mask_head.{s}.{upsample,conv_logits}.*       mask_heads.heads.{s}.{upsample,logits}.*

`*.num_batches_tracked` (a batch-norm step counter; the project's batch norm is frozen and has none) is dropped. Tensors
of branches this model does not have (`roi_head.semantic_head.*` of HTC; the mask heads when a box-only preset is
asked for) are listed as skipped. Any other name passes through unchanged, so the load report shows it as unexpected.

The architecture is read from the tensors: depth from the number of `layer3` blocks, ResNeXt groups and width from
`layer1.0.conv2`, class count from `fc_cls`, class-agnostic regression from `fc_reg`; class names from `meta`
(`dataset_meta.classes` in 3.x, `CLASSES` in 2.x) when present.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from cascade_rcnn.config import ModelConfig, get_preset
from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.weights import Checkpoint

# (mmdetection name pattern, project name template), tried in order; the first match wins.
NAME_MAP: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"backbone\.(.+)"), r"backbone.\1"),
    (re.compile(r"neck\.(lateral|fpn)_convs\.(\d+)\.conv\.(weight|bias)"), r"fpn.\1_convs.\2.\3"),
    (re.compile(r"rpn_head\.rpn_conv\.(weight|bias)"), r"rpn.head.conv.\1"),
    (re.compile(r"rpn_head\.rpn_cls\.(weight|bias)"), r"rpn.head.cls_logits.\1"),
    (re.compile(r"rpn_head\.rpn_reg\.(weight|bias)"), r"rpn.head.bbox_pred.\1"),
    (
        re.compile(r"roi_head\.bbox_head\.(\d+)\.(shared_fcs\.\d+|fc_cls|fc_reg)\.(weight|bias)"),
        r"roi_heads.box_heads.\1.\2.\3",
    ),
    (re.compile(r"roi_head\.mask_head\.(\d+)\.convs\.(\d+)\.conv\.(weight|bias)"), r"mask_heads.heads.\1.convs.\2.\3"),
    (re.compile(r"roi_head\.mask_head\.(\d+)\.upsample\.(weight|bias)"), r"mask_heads.heads.\1.upsample.\2"),
    (re.compile(r"roi_head\.mask_head\.(\d+)\.conv_logits\.(weight|bias)"), r"mask_heads.heads.\1.logits.\2"),
]
# Parts of mmdetection models that this detector does not have.
SKIPPED_PREFIXES = ("roi_head.mask_roi_extractor.", "roi_head.semantic_head.")
PROJECT_PREFIXES = ("fpn.", "rpn.head.", "roi_heads.box_heads.", "mask_heads.")

# (groups, width_per_group) -> preset name prefix of the ResNeXt presets.
RESNEXT_NAMES = {(32, 4): "x101_32x4d", (64, 4): "x101_64x4d"}


def mmdet_to_project_name(name: str) -> str | None:
    """The project's name for an mmdetection tensor name, or None when the name is not a mapped model tensor."""
    for pattern, template in NAME_MAP:
        match = pattern.fullmatch(name)
        if match:
            return match.expand(template)
    return None


def convert_mmdet_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an mmdetection state_dict; returns (project-named tensors, skipped mmdetection names).

    Unmapped names are kept as they are (they become "unexpected" in the load report); two source names mapping to
    one project name are an error.
    """
    converted: dict[str, Tensor] = {}
    skipped: list[str] = []
    for name, tensor in state_dict.items():
        if name.endswith(".num_batches_tracked"):
            continue
        if name.startswith(SKIPPED_PREFIXES):
            skipped.append(name)
            continue
        target = mmdet_to_project_name(name) or name
        if target in converted:
            raise CheckpointError(f"two checkpoint tensors map to {target!r} (the second is {name!r})")
        converted[target] = tensor
    return converted, skipped


def infer_preset(state_dict: dict[str, Tensor]) -> str:
    """The preset whose backbone matches a project-named state_dict: depth from the `layer3` block count, ResNeXt
    groups and width from `layer1.0.conv2.weight` ((groups * width, width, 3, 3))."""
    blocks = {int(m.group(1)) for n in state_dict if (m := re.fullmatch(r"backbone\.layer3\.(\d+)\.conv1\.weight", n))}
    depth = {6: 50, 23: 101}.get(len(blocks))
    if depth is None:
        raise CheckpointError(
            f"backbone.layer3 has {len(blocks)} blocks; expected 6 (ResNet-50) or 23 (ResNet-101 / ResNeXt-101)"
        )
    conv2 = state_dict.get("backbone.layer1.0.conv2.weight")
    if conv2 is None or conv2.dim() != 4:
        raise CheckpointError("checkpoint is missing backbone.layer1.0.conv2.weight")
    out_channels, in_per_group = conv2.shape[:2]
    groups = out_channels // in_per_group
    family = "cascade_mask_rcnn" if has_mask_heads(state_dict) else "cascade_rcnn"
    if groups == 1:
        return f"{family}_r{depth}_fpn"
    name = RESNEXT_NAMES.get((groups, in_per_group))
    if depth != 101 or name is None:
        raise CheckpointError(
            f"backbone with {depth} layers, {groups} groups of width {in_per_group}: no preset for this ResNeXt "
            f"(known: {', '.join(RESNEXT_NAMES.values())})"
        )
    return f"{family}_{name}_fpn"


def has_mask_heads(state_dict: dict[str, Tensor]) -> bool:
    """True when a project-named state_dict has mask-head tensors (a Cascade Mask R-CNN)."""
    return any(name.startswith("mask_heads.") for name in state_dict)


def skip_mask_heads(config: ModelConfig, state_dict: dict[str, Tensor], skipped: list[str]) -> dict[str, Tensor]:
    """The state_dict for `config`: a box-only config leaves a mask model's mask heads out (listed in `skipped`)."""
    if config.has_masks:
        return state_dict
    skipped.extend(name for name in state_dict if name.startswith("mask_heads."))
    return {name: tensor for name, tensor in state_dict.items() if not name.startswith("mask_heads.")}


def infer_config(state_dict: dict[str, Tensor], meta: dict[str, Any], preset: str | None) -> tuple[ModelConfig, str]:
    """The config of a project-named state_dict: `preset` (or the inferred one) with the checkpoint's class count,
    class names and box-regression layout."""
    preset = preset or infer_preset(state_dict)
    overrides: dict[str, Any] = {}
    fc_cls = state_dict.get("roi_heads.box_heads.0.fc_cls.weight")
    if fc_cls is not None:
        num_classes = fc_cls.shape[0] - 1  # background is the last row
        names = class_names_from_meta(meta)
        overrides["num_classes"] = num_classes
        if names is not None and len(names) == num_classes:
            overrides["class_names"] = names
        # Without names in meta, the preset's COCO names stay when the class count is 80, and are dropped otherwise.
        fc_reg = state_dict.get("roi_heads.box_heads.0.fc_reg.weight")
        if fc_reg is not None:
            overrides["cascade.class_agnostic"] = fc_reg.shape[0] == 4
    stages = {int(m.group(1)) for n in state_dict if (m := re.fullmatch(r"roi_heads\.box_heads\.(\d+)\..+", n))}
    config = get_preset(preset, **overrides)
    if stages and len(stages) != len(config.cascade.stage_ious):
        raise CheckpointError(
            f"checkpoint has {len(stages)} cascade stages, preset {preset!r} has {len(config.cascade.stage_ious)}"
        )
    return config, preset


def class_names_from_meta(meta: dict[str, Any]) -> tuple[str, ...] | None:
    """Class names of an mmdetection checkpoint: `meta['dataset_meta']['classes']` (3.x) or `meta['CLASSES']` (2.x)."""
    dataset_meta = meta.get("dataset_meta")
    names = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
    if names is None:
        names = meta.get("CLASSES")
    if isinstance(names, str):  # a one-class dataset stored as a bare string
        names = (names,)
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


def check_supported_style(meta: dict[str, Any], path: Path) -> None:
    """Refuse Caffe-style ResNet checkpoints: they expect BGR input with std 1 and stride in the 1x1 conv, so loading
    them into the PyTorch-style presets would give wrong detections without any error."""
    config_text = meta.get("config")
    if isinstance(config_text, str) and re.search(r"style\s*=\s*['\"]caffe['\"]", config_text):
        raise CheckpointError(
            f"{path}: a Caffe-style mmdetection checkpoint (style='caffe': BGR input, std 1, stride in the 1x1 conv); "
            "only PyTorch-style checkpoints are supported"
        )


def convert_torch_checkpoint(path: Path, preset: str | None = None) -> Checkpoint:
    """Read a `torch.save` checkpoint (mmdetection's layout, or a bare state_dict in mmdetection or project names)
    and convert it to the project's names and config."""
    from cascade_rcnn.io.detectron2 import detectron2_checkpoint, is_detectron2_state_dict
    from cascade_rcnn.io.torch_checkpoint import read_torch_checkpoint

    state_dict, meta = read_torch_checkpoint(path)
    if is_detectron2_state_dict(state_dict):
        # A detectron2 trainer file (`{'model': state_dict, ...}`): detectron2's names, conventions and preset.
        return detectron2_checkpoint(state_dict, preset)
    if any(name.startswith(PROJECT_PREFIXES) for name in state_dict):
        converted, skipped, source_format = dict(state_dict), [], "torch"
    else:
        check_supported_style(meta, path)
        converted, skipped = convert_mmdet_state_dict(state_dict)
        source_format = "mmdet"
    config, preset_name = infer_config(converted, meta, preset)
    return Checkpoint(config, skip_mask_heads(config, converted, skipped), preset_name, source_format, skipped)
