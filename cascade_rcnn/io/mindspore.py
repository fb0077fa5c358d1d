"""MindSpore Cascade R-CNN checkpoints (the seed's `research/cv/CascadeRCNN`, `.ckpt`) -> the project's model.

The file is read by `cascade_rcnn.io.mindspore_ckpt` (protobuf wire format, no MindSpore needed; optimizer state and
bookkeeping are skipped there). This module maps names and layouts (spec §3, `shared/specs/mindspore_cascadercnn.md`):

    MindSpore                                                 project                                   layout
    backbone.conv1 / layerL.b.convN                           backbone.(same)                           -
    backbone.*.bn*.{gamma,beta,moving_mean,moving_variance}   backbone.*.bn*.{weight,bias,running_*}    -
    backbone.layerL.0.{conv,bn}_down_sample                   backbone.layerL.0.downsample.{0,1}        -
    fpn_ncek.{lateral,fpn}_convs_list.i  (sic: "ncek")        fpn.{lateral,fpn}_convs.i                 -
    rpn_with_loss.rpn_convs_list.0.rpn_{conv,cls,reg}         rpn.head.{conv,cls_logits,bbox_pred}      -
    rcnn / rcnn1 / rcnn2 .shared_fc_{j}                       roi_heads.box_heads.{0,1,2}.shared_fcs.j  [in,out] -> T
    rcnn*.cls_scores  (81: background at column 0)            roi_heads.box_heads.s.fc_cls              T, bg moved last
    rcnn*.reg_scores  (324: column 4k+j, class k, bg k=0)     roi_heads.box_heads.s.fc_reg              T, bg group last

Background sits last in the project (see `cascade_rcnn.modeling.cascade_heads`), so the classifier rows and the regression's
4-row groups are rotated by one class. The regression keeps its background group when the config has
`cascade.reg_background_slot` (the seed's refinement takes the argmax over all 81 classes, background included) and
drops it otherwise. The RPN head is one set of tensors shared by the 5 levels; MindSpore saves only the `.0` copy, and
identical `.1`-`.4` copies are accepted and skipped. `rcnn{,1}.reg_scores_class_ang` (an unused class-agnostic branch)
is skipped. Anything else keeps its MindSpore name, so the load report lists it as unexpected.

A `.ckpt` converts to the preset `cascade_rcnn_r101_fpn_mindspore` unless the caller names another.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cascade_rcnn.config import COCO_CLASSES, ModelConfig, get_preset, with_overrides
from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.weights import Checkpoint

PRESET = "cascade_rcnn_r101_fpn_mindspore"
STAGE_NAMES = {"rcnn": 0, "rcnn1": 1, "rcnn2": 2}
BN_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
RPN_NAMES = {"rpn_conv": "conv", "rpn_cls": "cls_logits", "rpn_reg": "bbox_pred"}
DEPTHS = {6: 50, 23: 101}  # number of layer3 blocks -> ResNet depth

_BACKBONE = re.compile(r"backbone\.(.+)")
_FPN = re.compile(r"fpn_ncek\.(lateral|fpn)_convs_list\.(\d+)\.(weight|bias)")
_RPN = re.compile(r"rpn_with_loss\.rpn_convs_list\.(\d+)\.(rpn_conv|rpn_cls|rpn_reg)\.(weight|bias)")
_HEAD = re.compile(r"(rcnn|rcnn1|rcnn2)\.(shared_fc_\d|cls_scores|reg_scores|reg_scores_class_ang)\.(weight|bias)")


def backbone_name(rest: str) -> str:
    """Project name of `backbone.<rest>`: torchvision's ResNet names with `downsample.{0,1}` and BN parameter names."""
    rest = rest.replace("conv_down_sample", "downsample.0").replace("bn_down_sample", "downsample.1")
    head, _, leaf = rest.rpartition(".")
    return f"backbone.{head}.{BN_NAMES.get(leaf, leaf)}"


def background_last(rows: np.ndarray, group: int) -> np.ndarray:
    """Rotate the first `group` rows (the background class) of a class-major array to the end."""
    return np.concatenate([rows[group:], rows[:group]], axis=0)


def convert_mindspore_state_dict(
    tensors: dict[str, np.ndarray], reg_background_slot: bool = True
) -> tuple[dict[str, Tensor], list[str]]:
    """Map MindSpore tensors (name -> array, as read from the `.ckpt`) to the project's names and layouts.

    Returns the project's state dict (float32 tensors) and the MindSpore names that were deliberately left out.
    Raises CheckpointError when the copies of the shared RPN head differ.
    """
    if tensors and all(name.startswith("network.") for name in tensors):
        tensors = {name[len("network.") :]: value for name, value in tensors.items()}  # export.py's wrapper prefix
    state_dict: dict[str, Tensor] = {}
    skipped: list[str] = []
    rpn_copies: dict[str, list[tuple[int, str, np.ndarray]]] = {}  # project name -> (copy index, name, array)
    for name, value in tensors.items():
        array = np.asarray(value)
        if match := _BACKBONE.fullmatch(name):
            target = backbone_name(match.group(1))
        elif match := _FPN.fullmatch(name):
            kind, index, leaf = match.groups()
            target = f"fpn.{kind}_convs.{index}.{leaf}"
        elif match := _RPN.fullmatch(name):
            copy, layer, leaf = match.groups()
            rpn_copies.setdefault(f"rpn.head.{RPN_NAMES[layer]}.{leaf}", []).append((int(copy), name, array))
            continue
        elif match := _HEAD.fullmatch(name):
            head, layer, leaf = match.groups()
            if layer == "reg_scores_class_ang":
                skipped.append(name)
                continue
            array = array.T if leaf == "weight" else array  # DenseNoTranpose stores [in, out]
            stage = STAGE_NAMES[head]
            if layer == "cls_scores":
                target, array = f"roi_heads.box_heads.{stage}.fc_cls.{leaf}", background_last(array, 1)
            elif layer == "reg_scores":
                array = background_last(array, 4) if reg_background_slot else array[4:]
                target = f"roi_heads.box_heads.{stage}.fc_reg.{leaf}"
            else:
                target = f"roi_heads.box_heads.{stage}.shared_fcs.{layer[-1]}.{leaf}"
        else:
            target = name  # not part of this model: reported as unexpected by the loader
        state_dict[target] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    for target, copies in rpn_copies.items():
        copies.sort(key=lambda c: c[0])
        _, kept_name, kept = copies[0]
        for _, name, array in copies[1:]:
            if array.shape != kept.shape or not np.array_equal(array, kept):
                raise CheckpointError(f"{name} differs from {kept_name}: the RPN head is shared by all levels")
            skipped.append(name)
        state_dict[target] = torch.from_numpy(np.ascontiguousarray(kept, dtype=np.float32))
    return state_dict, skipped


def infer_config(state_dict: dict[str, Tensor], preset: str | None) -> tuple[ModelConfig, str]:
    """The config for converted MindSpore tensors: the MindSpore preset (or `preset`), with the class count of the
    classifier and the ResNet depth of the backbone."""
    fc_cls = state_dict.get("roi_heads.box_heads.0.fc_cls.weight")
    if fc_cls is None:
        raise CheckpointError("not a MindSpore Cascade R-CNN checkpoint: no rcnn.cls_scores.weight")
    num_classes = fc_cls.shape[0] - 1
    class_names = COCO_CLASSES if num_classes == len(COCO_CLASSES) else None
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    name = preset or PRESET
    config = get_preset(name, num_classes=num_classes, class_names=class_names)
    depth = DEPTHS.get(len(blocks))
    if depth is not None and depth != config.backbone.depth:
        config = with_overrides(config, {"backbone.depth": depth})
    return config, name


def convert_mindspore_checkpoint(path: Path, preset: str | None = None) -> Checkpoint:
    """Read a MindSpore `.ckpt` and convert it to the project's names, layouts and config."""
    from cascade_rcnn.io.mindspore_ckpt import read_mindspore_ckpt

    tensors = read_mindspore_ckpt(path)
    config = get_preset(preset or PRESET)
    if config.cascade.class_agnostic:
        raise CheckpointError(
            f"{path}: MindSpore Cascade R-CNN regression is class-specific; preset {preset!r} is class-agnostic "
            f"(use {PRESET} or a preset with cascade.class_agnostic=False)"
        )
    try:
        state_dict, skipped = convert_mindspore_state_dict(tensors, config.cascade.reg_background_slot)
        config, name = infer_config(state_dict, preset)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return Checkpoint(config, state_dict, name, "mindspore", skipped)
