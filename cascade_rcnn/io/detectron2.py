"""detectron2 Cascade R-CNN weights (model-zoo `.pkl`, trainer `.pth`) -> the project's model.

detectron2's conventions differ from the default (mmdetection) preset in several places; each is a named setting, and
together they form the preset `cascade_rcnn_r50_fpn_detectron2` that a detectron2 file selects unless the caller names
another. The tensors need only a name map:

    detectron2                                                  project
    backbone.bottom_up.stem.conv1.weight                        backbone.conv1.weight
    backbone.bottom_up.stem.conv1.norm.*                        backbone.bn1.*
    backbone.bottom_up.res{k}.{i}.conv{j}.weight                backbone.layer{k-1}.{i}.conv{j}.weight
    backbone.bottom_up.res{k}.{i}.conv{j}.norm.*                backbone.layer{k-1}.{i}.bn{j}.*
    backbone.bottom_up.res{k}.0.shortcut.weight                 backbone.layer{k-1}.0.downsample.0.weight
    backbone.bottom_up.res{k}.0.shortcut.norm.*                 backbone.layer{k-1}.0.downsample.1.*
    backbone.fpn_lateral{k}.*                                   fpn.lateral_convs.{k-2}.*
    backbone.fpn_output{k}.*                                    fpn.fpn_convs.{k-2}.*
    proposal_generator.rpn_head.conv.*                          rpn.head.conv.*
    proposal_generator.rpn_head.objectness_logits.*             rpn.head.cls_logits.*
    proposal_generator.rpn_head.anchor_deltas.*                 rpn.head.bbox_pred.*
    roi_heads.box_head.{s}.fc{j}.*                              roi_heads.box_heads.{s}.shared_fcs.{j-1}.*
    roi_heads.box_predictor.{s}.cls_score.*                     roi_heads.box_heads.{s}.fc_cls.*
    roi_heads.box_predictor.{s}.bbox_pred.*                     roi_heads.box_heads.{s}.fc_reg.*

The layouts agree without reordering: detectron2's `cls_score` has background last (row num_classes), as the project's
`fc_cls`; `anchor_deltas` channels are anchor * 4 + k, as `bbox_pred`; `bbox_pred` of the cascade is class-agnostic (4
rows). The published files are Cascade *Mask* R-CNN: their one mask head maps to the project's single mask head
(`mask_fcn{1..4}` -> `mask_heads.heads.0.convs.{0..3}`, `deconv` -> `upsample`, `predictor` -> `logits`), and the mask
preset is inferred; with a box-only preset asked for, those tensors are skipped and listed as such in the load
report. Buffers that older detectron2 versions saved but that the config decides here (`pixel_mean`, `pixel_std`, the
anchor generator's `cell_anchors`) are skipped too. Anything else unmapped passes through under its
own name and shows up as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cascade_rcnn.config import ModelConfig, get_preset
from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.mmdet import has_mask_heads, skip_mask_heads
from cascade_rcnn.io.weights import Checkpoint

PRESET = "cascade_rcnn_r50_fpn_detectron2"
MASK_PRESET = "cascade_mask_rcnn_r50_fpn_detectron2"

_NORM = r"(weight|bias|running_mean|running_var)"
_FPN = {"lateral": "lateral_convs", "output": "fpn_convs"}
_RPN = {"conv": "conv", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}
_PREDICTOR = {"cls_score": "fc_cls", "bbox_pred": "fc_reg"}
_MASK = {"deconv": "upsample", "predictor": "logits"}


def _res(match: re.Match[str]) -> str:
    """detectron2's stage `res{k}` is torchvision's `layer{k-1}`."""
    return f"layer{int(match.group(1)) - 1}.{match.group(2)}"


# (detectron2 name pattern, project name builder), tried in order; the first full match wins.
NAME_MAP: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"backbone\.bottom_up\.stem\.conv1\.weight"), lambda m: "backbone.conv1.weight"),
    (re.compile(rf"backbone\.bottom_up\.stem\.conv1\.norm\.{_NORM}"), lambda m: f"backbone.bn1.{m.group(1)}"),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([123])\.weight"),
        lambda m: f"backbone.{_res(m)}.conv{m.group(3)}.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([123])\.norm\.{_NORM}"),
        lambda m: f"backbone.{_res(m)}.bn{m.group(3)}.{m.group(4)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight"),
        lambda m: f"backbone.{_res(m)}.downsample.0.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.{_NORM}"),
        lambda m: f"backbone.{_res(m)}.downsample.1.{m.group(3)}",
    ),
    (
        re.compile(r"backbone\.fpn_(lateral|output)([2-5])\.(weight|bias)"),
        lambda m: f"fpn.{_FPN[m.group(1)]}.{int(m.group(2)) - 2}.{m.group(3)}",
    ),
    (
        re.compile(r"proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)"),
        lambda m: f"rpn.head.{_RPN[m.group(1)]}.{m.group(2)}",
    ),
    (
        re.compile(r"roi_heads\.box_head\.(\d+)\.fc([12])\.(weight|bias)"),
        lambda m: f"roi_heads.box_heads.{m.group(1)}.shared_fcs.{int(m.group(2)) - 1}.{m.group(3)}",
    ),
    (
        re.compile(r"roi_heads\.box_predictor\.(\d+)\.(cls_score|bbox_pred)\.(weight|bias)"),
        lambda m: f"roi_heads.box_heads.{m.group(1)}.{_PREDICTOR[m.group(2)]}.{m.group(3)}",
    ),
    (
        re.compile(r"roi_heads\.mask_head\.mask_fcn([1-9])\.(weight|bias)"),
        lambda m: f"mask_heads.heads.0.convs.{int(m.group(1)) - 1}.{m.group(2)}",
    ),
    (
        re.compile(r"roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)"),
        lambda m: f"mask_heads.heads.0.{_MASK[m.group(1)]}.{m.group(2)}",
    ),
]

# Parts of a detectron2 checkpoint that this detector does not have, or that its config decides.
SKIPPED_PREFIXES = ("roi_heads.keypoint_head.", "proposal_generator.anchor_generator.")
SKIPPED_NAMES = ("pixel_mean", "pixel_std")
# Names only a detectron2 model has (the project's own names use `roi_heads.box_heads.`, never `roi_heads.box_head.`).
DETECTRON2_PREFIXES = (
    "backbone.bottom_up.", "proposal_generator.", "roi_heads.box_head.", "roi_heads.box_predictor.", "roi_heads.mask_head."
)


def detectron2_to_project_name(name: str) -> str | None:
    """The project's name for a detectron2 tensor name, or None when the name is not a mapped model tensor."""
    for pattern, build in NAME_MAP:
        match = pattern.fullmatch(name)
        if match:
            return build(match)
    return None


def is_detectron2_state_dict(names: Iterable[str]) -> bool:
    """True when a state_dict's names are detectron2's (e.g. a trainer `.pth`, `{'model': state_dict, ...}`)."""
    return any(name.startswith(DETECTRON2_PREFIXES) for name in names)


def convert_detectron2_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a detectron2 state_dict; returns (project-named tensors, skipped detectron2 names).

    Unmapped names are kept as they are (the load report lists them as unexpected); two source names mapping to one
    project name are an error.
    """
    converted: dict[str, Tensor] = {}
    skipped: list[str] = []
    for name, tensor in state_dict.items():
        if name.endswith(".num_batches_tracked"):
            continue
        if name.startswith(SKIPPED_PREFIXES) or name in SKIPPED_NAMES:
            skipped.append(name)
            continue
        target = detectron2_to_project_name(name) or name
        if target in converted:
            raise CheckpointError(f"two checkpoint tensors map to {target!r} (the second is {name!r})")
        converted[target] = tensor
    return converted, skipped


def infer_config(state_dict: Mapping[str, Tensor], preset: str | None) -> tuple[ModelConfig, str]:
    """The config of a converted (project-named) detectron2 state_dict.

    Without a `preset`, the detectron2 preset (the mask one when the file has a mask head) with the checkpoint's ResNet
    depth (the number of `res4` blocks: 6 or
    23); ResNeXt files are refused, since detectron2's ResNeXt configs change what the tensors cannot tell (stride on
    the 3x3 conv, another pixel std). With a `preset`, that preset. Either way the class count comes
    from `cls_score` (background is its last row) and class-agnostic regression from `bbox_pred` (4 rows). detectron2
    files carry no class names: 80 classes are taken to be COCO's, in detectron2's (= the project's) order.
    """
    overrides: dict[str, Any] = {}
    if preset is None:
        res4 = re.compile(r"backbone\.layer3\.(\d+)\.conv1\.weight")
        blocks = {int(m.group(1)) for n in state_dict if (m := res4.fullmatch(n))}
        depth = {6: 50, 23: 101}.get(len(blocks))
        if depth is None:
            raise CheckpointError(
                f"the backbone's res4 stage has {len(blocks)} blocks; expected 6 (ResNet-50) or 23 (ResNet-101)"
            )
        conv2 = state_dict.get("backbone.layer1.0.conv2.weight")
        if conv2 is None or conv2.dim() != 4:
            raise CheckpointError("checkpoint is missing backbone.bottom_up.res2.0.conv2.weight")
        groups = conv2.shape[0] // conv2.shape[1]
        if groups > 1:
            raise CheckpointError(
                f"a ResNeXt backbone ({groups} groups of width {conv2.shape[1]}): detectron2's ResNeXt configs put the "
                "stride on the 3x3 conv and use another pixel std, which the file does not record; pass a preset"
            )
        overrides["backbone.depth"] = depth
    fc_cls = state_dict.get("roi_heads.box_heads.0.fc_cls.weight")
    if fc_cls is not None:
        num_classes = fc_cls.shape[0] - 1
        overrides["num_classes"] = num_classes  # a count other than the preset's drops the (COCO) names
        fc_reg = state_dict.get("roi_heads.box_heads.0.fc_reg.weight")
        if fc_reg is not None:
            overrides["cascade.class_agnostic"] = fc_reg.shape[0] == 4
    default = MASK_PRESET if has_mask_heads(state_dict) else PRESET
    preset = preset or default
    config = get_preset(preset, **overrides)
    stages = {int(m.group(1)) for n in state_dict if (m := re.fullmatch(r"roi_heads\.box_heads\.(\d+)\..+", n))}
    if stages and len(stages) != len(config.cascade.stage_ious):
        raise CheckpointError(
            f"checkpoint has {len(stages)} cascade stages, preset {preset!r} has {len(config.cascade.stage_ious)}"
        )
    return config, preset


def detectron2_checkpoint(
    state_dict: Mapping[str, Tensor], preset: str | None = None, source_format: str = "detectron2"
) -> Checkpoint:
    """A `Checkpoint` from a detectron2-named state_dict (of a `.pkl` or a trainer `.pth`)."""
    converted, skipped = convert_detectron2_state_dict(state_dict)
    config, preset_name = infer_config(converted, preset)
    return Checkpoint(config, skip_mask_heads(config, converted, skipped), preset_name, source_format, skipped)


def convert_detectron2_pkl(path: Path, preset: str | None = None) -> Checkpoint:
    """Read a detectron2 model-zoo `.pkl` (through the restricted unpickler: nothing in the file is ever run) and
    convert it to the project's names and the detectron2 preset (or `preset`)."""
    from cascade_rcnn.io.detectron2_pkl import read_detectron2_pkl

    arrays, _info = read_detectron2_pkl(path)
    if not is_detectron2_state_dict(arrays):
        raise CheckpointError(
            f"{path}: a pickle of arrays, but not a detectron2 model (no 'backbone.bottom_up.*', "
            "'proposal_generator.*' or 'roi_heads.box_predictor.*' names)"
        )
    # A copy: arrays unpickled from bytes are read-only, and torch tensors must own writable memory.
    state_dict = {name: torch.from_numpy(np.array(array)) for name, array in arrays.items()}
    return detectron2_checkpoint(state_dict, preset, "detectron2")
