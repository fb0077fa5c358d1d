"""Loading mmdetection checkpoints: the name map, architecture and class names read from the file, the layouts of
mmdetection 2.x and 3.x files, refusals with clear messages, the ResNeXt presets, and `cascade-rcnn convert`.

Most tests build small synthetic checkpoints (tensors of the right names, tiny shapes) or models on the meta device,
so they need neither the shared data nor much time; the key list and the conversion of the real reference checkpoint
use `shared/reference/mmdet` and skip without it.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cascade_rcnn.cli import main as cli_main
from cascade_rcnn.config import COCO_CLASSES, get_preset
from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.mmdet import (
    class_names_from_meta,
    convert_mmdet_state_dict,
    infer_preset,
    mmdet_to_project_name,
)
from cascade_rcnn.modeling.detector import build_model
from cascade_rcnn.io.weights import load_checkpoint, load_into_model

# The inverse of the name map, written out independently of cascade_rcnn.io.mmdet, to build mmdetection-named files.
PROJECT_TO_MMDET = [
    (r"fpn\.(lateral|fpn)_convs\.(\d+)\.(weight|bias)", r"neck.\1_convs.\2.conv.\3"),
    (r"rpn\.head\.conv\.(.+)", r"rpn_head.rpn_conv.\1"),
    (r"rpn\.head\.cls_logits\.(.+)", r"rpn_head.rpn_cls.\1"),
    (r"rpn\.head\.bbox_pred\.(.+)", r"rpn_head.rpn_reg.\1"),
    (r"roi_heads\.box_heads\.(.+)", r"roi_head.bbox_head.\1"),
    (r"backbone\.(.+)", r"backbone.\1"),
]


def to_mmdet_name(name: str) -> str:
    for pattern, template in PROJECT_TO_MMDET:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, template, name)
    raise AssertionError(f"no mmdet name for {name}")


def meta_model(preset: str, **overrides):
    """The model of a preset with shapes only (meta device): instant even for ResNeXt-101 64x4d."""
    with torch.device("meta"):
        return build_model(get_preset(preset, **overrides))


def mmdet_state_dict(model, make=lambda shape: torch.zeros(shape)) -> OrderedDict[str, torch.Tensor]:
    """An mmdetection-named state_dict for `model`, with the BN step counters mmdetection saves."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in model.state_dict().items():
        out[to_mmdet_name(name)] = make(tuple(tensor.shape))
        if name.endswith(".running_var"):
            out[to_mmdet_name(name).replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return out


def small_mmdet_checkpoint(num_classes: int = 3, conv2: tuple[int, ...] = (64, 64, 3, 3), blocks3: int = 6,
                           reg_outputs: int = 4) -> OrderedDict[str, torch.Tensor]:
    """The names of an mmdetection Cascade R-CNN checkpoint with 1-element tensors, except the few whose shapes the
    converter reads (layer1.0.conv2, fc_cls, fc_reg)."""
    names = ["backbone.conv1.weight", "backbone.bn1.weight", "backbone.bn1.num_batches_tracked",
             "backbone.layer1.0.conv2.weight"]
    names += [f"backbone.layer3.{i}.conv1.weight" for i in range(blocks3)]
    names += ["neck.lateral_convs.0.conv.weight", "neck.fpn_convs.3.conv.bias", "rpn_head.rpn_conv.weight",
              "rpn_head.rpn_cls.bias", "rpn_head.rpn_reg.weight"]
    for s in range(3):
        names += [f"roi_head.bbox_head.{s}.shared_fcs.0.weight", f"roi_head.bbox_head.{s}.fc_cls.weight",
                  f"roi_head.bbox_head.{s}.fc_reg.weight"]
    sd = OrderedDict((n, torch.zeros(1)) for n in names)
    sd["backbone.layer1.0.conv2.weight"] = torch.zeros(conv2)
    for s in range(3):
        sd[f"roi_head.bbox_head.{s}.fc_cls.weight"] = torch.zeros(num_classes + 1, 2)
        sd[f"roi_head.bbox_head.{s}.fc_reg.weight"] = torch.zeros(reg_outputs, 2)
    return sd


class MmcvConfigDict(dict):
    """Stands for an object that torch.load(weights_only=True) refuses (mmcv ConfigDict in old `meta`)."""


# ---------------------------------------------------------------------------------------------------------------------
# The name map


def test_name_map_examples() -> None:
    name = "backbone.layer2.0.downsample.1.running_var"
    assert mmdet_to_project_name(name) == name
    assert mmdet_to_project_name("neck.lateral_convs.3.conv.weight") == "fpn.lateral_convs.3.weight"
    assert mmdet_to_project_name("neck.fpn_convs.0.conv.bias") == "fpn.fpn_convs.0.bias"
    assert mmdet_to_project_name("rpn_head.rpn_conv.weight") == "rpn.head.conv.weight"
    assert mmdet_to_project_name("rpn_head.rpn_cls.bias") == "rpn.head.cls_logits.bias"
    assert mmdet_to_project_name("rpn_head.rpn_reg.weight") == "rpn.head.bbox_pred.weight"
    assert mmdet_to_project_name("roi_head.bbox_head.2.shared_fcs.1.bias") == "roi_heads.box_heads.2.shared_fcs.1.bias"
    assert mmdet_to_project_name("roi_head.bbox_head.0.fc_cls.bias") == "roi_heads.box_heads.0.fc_cls.bias"
    assert mmdet_to_project_name("roi_head.mask_head.0.convs.0.conv.weight") == "mask_heads.heads.0.convs.0.weight"
    assert mmdet_to_project_name("roi_head.mask_head.2.upsample.bias") == "mask_heads.heads.2.upsample.bias"
    assert mmdet_to_project_name("roi_head.mask_head.1.conv_logits.weight") == "mask_heads.heads.1.logits.weight"
    assert mmdet_to_project_name("neck.fpn_convs.0.conv.weight.extra") is None


def test_every_reference_key_maps_onto_the_r50_model(mmdet_reference_dir: Path) -> None:
    """The 364 names and shapes that mmdetection saved (checkpoint_keys.txt) against the project's R50 model: 311 map
    one to one onto its tensors with equal shapes, the 53 num_batches_tracked are dropped, nothing is left over."""
    rows = [line.split("\t") for line in (mmdet_reference_dir / "checkpoint_keys.txt").read_text().splitlines()]
    keys = {name: ast.literal_eval(shape) for name, shape, _dtype in rows}
    assert len(keys) == 364
    own = meta_model("cascade_rcnn_r50_fpn").state_dict()
    converted, skipped = convert_mmdet_state_dict({n: torch.empty(s, device="meta") for n, s in keys.items()})
    assert skipped == []
    assert sum(n.endswith("num_batches_tracked") for n in keys) == 53
    assert sorted(converted) == sorted(own)
    for name, tensor in converted.items():
        assert tuple(tensor.shape) == tuple(own[name].shape), name


PRESETS = ["cascade_rcnn_r50_fpn", "cascade_rcnn_r101_fpn", "cascade_rcnn_x101_32x4d_fpn", "cascade_rcnn_x101_64x4d_fpn"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_converts_with_nothing_missing_or_unexpected(preset: str) -> None:
    model = meta_model(preset)
    sd = mmdet_state_dict(model, lambda shape: torch.empty(shape, device="meta"))
    converted, skipped = convert_mmdet_state_dict(sd)
    assert skipped == []
    assert infer_preset(converted) == preset
    report = load_into_model(model, converted)
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(model.state_dict())


def test_a_missing_tensor_is_an_error_that_names_it() -> None:
    model = meta_model("cascade_rcnn_r50_fpn")
    sd = mmdet_state_dict(model, lambda shape: torch.empty(shape, device="meta"))
    del sd["rpn_head.rpn_reg.bias"]
    converted, _ = convert_mmdet_state_dict(sd)
    with pytest.raises(CheckpointError, match=r"rpn\.head\.bbox_pred\.bias"):
        load_into_model(model, converted)


def test_branches_not_in_the_model_are_skipped_and_unknown_names_are_reported() -> None:
    sd = small_mmdet_checkpoint()
    sd["roi_head.semantic_head.conv_logits.weight"] = torch.zeros(1)
    sd["some_new_head.weight"] = torch.zeros(1)
    converted, skipped = convert_mmdet_state_dict(sd)
    assert skipped == ["roi_head.semantic_head.conv_logits.weight"]
    assert "some_new_head.weight" in converted  # passes through: the load report lists it as unexpected
    assert not any(name.endswith("num_batches_tracked") for name in converted)


# ---------------------------------------------------------------------------------------------------------------------
# ResNeXt: the mmdetection layout


@pytest.mark.parametrize(("preset", "groups"), [(PRESETS[2], 32), (PRESETS[3], 64)])
def test_resnext_presets_have_the_mmdet_layout(preset: str, groups: int) -> None:
    """mmdetection's ResNeXt Bottleneck: width = floor(planes * base_width / 64) * groups with planes = 64 * 2^i and
    base_width 4; conv1 1x1 (width), conv2 3x3 grouped with the stride, conv3 1x1 (planes * 4); names as ResNet's."""
    model = meta_model(preset)
    sd = model.state_dict()
    in_channels = 64
    for i, blocks in enumerate([3, 4, 23, 3]):
        planes = 64 * 2**i
        width = (planes * 4 // 64) * groups
        for b in range(blocks):
            block = getattr(model.backbone, f"layer{i + 1}")[b]
            prefix = f"backbone.layer{i + 1}.{b}"
            assert sd[f"{prefix}.conv1.weight"].shape == (width, in_channels if b == 0 else planes * 4, 1, 1)
            assert sd[f"{prefix}.conv2.weight"].shape == (width, width // groups, 3, 3)
            assert sd[f"{prefix}.conv3.weight"].shape == (planes * 4, width, 1, 1)
            assert block.conv2.groups == groups
            assert block.conv2.stride == ((2, 2) if b == 0 and i > 0 else (1, 1))
            assert block.conv1.stride == (1, 1)
        assert sd[f"backbone.layer{i + 1}.0.downsample.0.weight"].shape == (planes * 4, in_channels, 1, 1)
        in_channels = planes * 4


def test_architecture_and_classes_are_read_from_the_checkpoint(tmp_path: Path) -> None:
    sd = small_mmdet_checkpoint(num_classes=3, conv2=(128, 4, 3, 3), blocks3=23)
    path = tmp_path / "x101.pth"
    torch.save({"state_dict": sd, "meta": {"dataset_meta": {"classes": ("cat", "dog", "bird")}}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.preset == "cascade_rcnn_x101_32x4d_fpn"
    assert ckpt.source_format == "mmdet"
    assert ckpt.config.num_classes == 3 and ckpt.config.class_names == ("cat", "dog", "bird")
    assert ckpt.config.backbone.groups == 32 and ckpt.config.backbone.width_per_group == 4
    assert ckpt.config.cascade.class_agnostic
    assert torch.equal(ckpt.state_dict["backbone.layer1.0.conv2.weight"], sd["backbone.layer1.0.conv2.weight"])


def test_mmdet2_layout_with_extra_keys_and_refused_meta_objects(tmp_path: Path) -> None:
    """mmdetection 2.x: `meta['CLASSES']`, an `optimizer` entry, and meta objects that weights_only refuses."""
    sd = small_mmdet_checkpoint(num_classes=80, reg_outputs=320)
    path = tmp_path / "mmdet2.pth"
    meta = {"CLASSES": COCO_CLASSES, "config": MmcvConfigDict(model="...")}
    torch.save({"meta": meta, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the fallback reader is really needed here
    ckpt = load_checkpoint(path)
    assert ckpt.preset == "cascade_rcnn_r50_fpn"
    assert ckpt.config.class_names == COCO_CLASSES
    assert not ckpt.config.cascade.class_agnostic  # fc_reg with 4 * 80 outputs
    assert set(ckpt.state_dict) == {mmdet_to_project_name(n) for n in sd if not n.endswith("num_batches_tracked")}


def test_class_names_from_meta() -> None:
    assert class_names_from_meta({"dataset_meta": {"classes": ["a", "b"]}}) == ("a", "b")
    assert class_names_from_meta({"CLASSES": ("a",)}) == ("a",)
    assert class_names_from_meta({"CLASSES": "a"}) == ("a",)
    assert class_names_from_meta({"epoch": 12}) is None


def test_names_that_do_not_fit_the_class_count_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save({"state_dict": small_mmdet_checkpoint(num_classes=3), "meta": {"CLASSES": ("a", "b")}}, path)
    assert load_checkpoint(path).config.class_names is None


def test_preset_argument_overrides_the_inferred_one(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save({"state_dict": small_mmdet_checkpoint(num_classes=80)}, path)
    ckpt = load_checkpoint(path, preset="cascade_rcnn_r101_fpn")
    assert ckpt.preset == "cascade_rcnn_r101_fpn" and ckpt.config.backbone.depth == 101
    assert ckpt.config.class_names == COCO_CLASSES  # no names in meta: 80 classes keep the COCO names


def test_detectron2_trainer_file_is_not_read_as_mmdetection(tmp_path: Path) -> None:
    """A detectron2 `{'model': ...}` .pth is the detectron2 reader's business (or refused while there is none): never
    renamed with the mmdetection map, whose error would talk about `layer3`."""
    path = tmp_path / "model_final.pth"
    names = ("backbone.bottom_up.stem.conv1.weight", "proposal_generator.rpn_head.conv.weight")
    torch.save({"model": {name: torch.zeros(1) for name in names}, "iteration": 10}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert "layer3" not in str(error.value)


def test_caffe_style_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "caffe.pth"
    meta = {"config": "model = dict(backbone=dict(type='ResNet', depth=50, style='caffe'))"}
    torch.save({"state_dict": small_mmdet_checkpoint(), "meta": meta}, path)
    with pytest.raises(CheckpointError, match="caffe"):
        load_checkpoint(path)


def test_unsupported_depth_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r34ish.pth"
    torch.save({"state_dict": small_mmdet_checkpoint(blocks3=4)}, path)
    with pytest.raises(CheckpointError, match="layer3 has 4 blocks"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------------------
# The reference checkpoint and `cascade-rcnn convert`


def test_convert_reference_checkpoint(mmdet_reference_checkpoint: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "r50.safetensors"
    assert cli_main(["convert", str(mmdet_reference_checkpoint), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "loaded 311 tensors" in printed and "missing" not in printed and "unexpected" not in printed
    with safe_open(str(output), framework="pt") as f:
        metadata = f.metadata()
        assert tuple(json.loads(metadata["class_names"])) == COCO_CLASSES
        assert metadata["preset"] == "cascade_rcnn_r50_fpn"
        # the converted tensors are the checkpoint's, renamed
        original = torch.load(mmdet_reference_checkpoint, weights_only=True)["state_dict"]
        for mmdet_name in ("neck.fpn_convs.2.conv.weight", "roi_head.bbox_head.1.fc_cls.bias", "backbone.bn1.bias"):
            assert torch.equal(f.get_tensor(mmdet_to_project_name(mmdet_name)), original[mmdet_name])
    reloaded = load_checkpoint(output)
    assert reloaded.preset == "cascade_rcnn_r50_fpn" and reloaded.config.class_names == COCO_CLASSES


def test_convert_refuses_to_overwrite_its_source(tmp_path: Path, capsys) -> None:
    path = tmp_path / "w.pth"
    torch.save({"state_dict": small_mmdet_checkpoint()}, path)
    assert cli_main(["convert", str(path), "--output", str(path)]) == 2
    assert "overwrite" in capsys.readouterr().err
