"""Loading detectron2 weights: the name map, the model-zoo `.pkl` and trainer `.pth` layouts, the preset a file selects,
the mask branch of the published files, the known weights names, and refusal of pickles that would run code."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_rcnn import Detector
from cascade_rcnn.config import PRESETS, get_preset
from cascade_rcnn.io.download import KNOWN_WEIGHTS
from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.detectron2 import (
    MASK_PRESET,
    PRESET,
    convert_detectron2_state_dict,
    detectron2_to_project_name,
    infer_config,
    is_detectron2_state_dict,
)
from cascade_rcnn.io.detectron2_pkl import read_detectron2_pkl
from cascade_rcnn.modeling.detector import build_model
from cascade_rcnn.io.weights import load_checkpoint, load_into_model

# The box-path-free tensors of the published Cascade Mask R-CNN files (detectron2 MaskRCNNConvUpsampleHead).
MASK_HEAD = {
    **{f"roi_heads.mask_head.mask_fcn{i}.{p}": (256, 256, 3, 3) if p == "weight" else (256,)
       for i in range(1, 5) for p in ("weight", "bias")},
    "roi_heads.mask_head.deconv.weight": (256, 256, 2, 2),
    "roi_heads.mask_head.deconv.bias": (256,),
    "roi_heads.mask_head.predictor.weight": (80, 256, 1, 1),
    "roi_heads.mask_head.predictor.bias": (80,),
}


@pytest.fixture(scope="module")
def reference_keys(detectron2_reference_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the reference checkpoint, from `checkpoint_keys.txt`."""
    rows = [line.split("\t") for line in (detectron2_reference_dir / "checkpoint_keys.txt").read_text().splitlines()]
    return [(name, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())) for name, shape, _ in rows]


@pytest.fixture(scope="module")
def reference_arrays(detectron2_reference_checkpoint: Path) -> dict[str, np.ndarray]:
    arrays, info = read_detectron2_pkl(detectron2_reference_checkpoint)
    assert info == {"__author__": "Detectron2 Model Zoo"}
    return arrays


def test_name_map_covers_the_model_one_to_one(reference_keys):
    """Every detectron2 tensor maps to a distinct tensor of the preset's model with the same shape, and every model
    tensor is covered (311 = 311)."""
    own = {k: tuple(v.shape) for k, v in build_model(get_preset(PRESET)).state_dict().items()}
    mapped = {detectron2_to_project_name(name): shape for name, shape in reference_keys}
    assert None not in mapped
    assert len(mapped) == len(reference_keys) == len(own) == 311
    assert mapped == own


def test_reference_checkpoint_converts_with_nothing_missing_or_unexpected(
    detectron2_reference_checkpoint, reference_arrays
):
    checkpoint = load_checkpoint(detectron2_reference_checkpoint)
    assert checkpoint.source_format == "detectron2"
    assert checkpoint.preset == PRESET
    assert checkpoint.config == get_preset(PRESET)  # 80 COCO classes, class-agnostic boxes
    assert checkpoint.skipped == []
    model = build_model(checkpoint.config)
    report = load_into_model(model, checkpoint.state_dict, skipped=checkpoint.skipped)
    assert (len(report.loaded), report.missing, report.unexpected) == (311, [], [])
    own = model.state_dict()
    for name in ("backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.res5.2.conv3.norm.running_var",
                 "proposal_generator.rpn_head.anchor_deltas.weight", "roi_heads.box_predictor.2.cls_score.bias"):
        np.testing.assert_array_equal(own[detectron2_to_project_name(name)].numpy(), reference_arrays[name])


def test_published_layout_with_mask_branch_loads_it(tmp_path, reference_arrays):
    """A published Cascade *Mask* R-CNN file selects the detectron2 mask preset and loads its mask head; extra
    top-level keys (`matching_heuristics`) are accepted. With the box preset asked for, the mask head is skipped and
    listed."""
    model = OrderedDict(reference_arrays)
    rng = np.random.default_rng(0)
    for name, shape in MASK_HEAD.items():
        model[name] = rng.standard_normal(shape).astype(np.float32)
    path = tmp_path / "model_final_e9d89b.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f, protocol=4)
    detector = Detector.from_weights(path)
    assert detector.preset == "cascade_mask_rcnn_r50_fpn_detectron2"
    assert detector.config.transform.channel_order == "bgr" and detector.config.mask.heads == "single"
    report = detector.load_report
    assert (len(report.loaded), report.missing, report.unexpected, report.skipped) == (311 + len(MASK_HEAD), [], [], [])
    np.testing.assert_array_equal(
        detector.model.mask_heads.heads[0].logits.weight.detach().numpy(), model["roi_heads.mask_head.predictor.weight"]
    )
    box_only = Detector.from_weights(path, preset=PRESET)
    assert box_only.model.mask_heads is None
    report = box_only.load_report
    assert (len(report.loaded), report.missing, report.unexpected) == (311, [], [])
    assert sorted(report.skipped) == sorted(detectron2_to_project_name(n) for n in MASK_HEAD)
    assert f"skipped (not part of this model): {len(MASK_HEAD)}" in report.summary()


def test_trainer_pth_is_read_with_the_detectron2_map(tmp_path, reference_arrays):
    """detectron2's `Checkpointer.save` layout ({'model': state_dict, 'optimizer', 'scheduler', 'iteration'}) goes
    through the torch reader and the same name map; buffers older detectron2 versions saved are skipped."""
    state_dict = OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in reference_arrays.items())
    state_dict["pixel_mean"] = torch.tensor([103.53, 116.28, 123.675]).view(3, 1, 1)
    state_dict["pixel_std"] = torch.ones(3, 1, 1)
    path = tmp_path / "model_0089999.pth"
    torch.save({"model": state_dict, "optimizer": {"state": {}}, "scheduler": {}, "iteration": 89999}, path)
    checkpoint = load_checkpoint(path)
    assert (checkpoint.source_format, checkpoint.preset) == ("detectron2", PRESET)
    assert sorted(checkpoint.skipped) == ["pixel_mean", "pixel_std"]
    from_pkl, _ = convert_detectron2_state_dict({k: torch.from_numpy(np.array(v)) for k, v in reference_arrays.items()})
    assert list(checkpoint.state_dict) == list(from_pkl)
    assert all(torch.equal(checkpoint.state_dict[k], from_pkl[k]) for k in from_pkl)


def test_a_named_preset_wins_over_the_files_own(detectron2_reference_checkpoint):
    checkpoint = load_checkpoint(detectron2_reference_checkpoint, preset="cascade_rcnn_r50_fpn")
    assert checkpoint.preset == "cascade_rcnn_r50_fpn"
    assert checkpoint.config.transform.channel_order == "rgb"
    assert checkpoint.source_format == "detectron2"


def test_missing_and_unexpected_tensors(reference_arrays):
    state_dict = {k: torch.from_numpy(np.array(v)) for k, v in reference_arrays.items()}
    del state_dict["roi_heads.box_predictor.1.bbox_pred.weight"]
    state_dict["roi_heads.box_head.0.fc3.weight"] = torch.zeros(2)
    converted, skipped = convert_detectron2_state_dict(state_dict)
    assert skipped == []
    model = build_model(get_preset(PRESET))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: roi_heads\.box_heads\.1\.fc_reg\.weight"):
        load_into_model(model, converted)
    converted["roi_heads.box_heads.1.fc_reg.weight"] = model.state_dict()["roi_heads.box_heads.1.fc_reg.weight"]
    report = load_into_model(model, converted)
    assert report.unexpected == ["roi_heads.box_head.0.fc3.weight"] and report.missing == []


def test_config_follows_the_tensors():
    """Class count from cls_score (background is the last row), class-specific regression from bbox_pred, depth from
    the res4 block count."""

    def state_dict(res4_blocks: int, num_classes: int, reg_rows: int) -> dict[str, torch.Tensor]:
        sd = {f"backbone.bottom_up.res4.{i}.conv1.weight": torch.zeros(1) for i in range(res4_blocks)}
        sd["backbone.bottom_up.res2.0.conv2.weight"] = torch.zeros(64, 64, 3, 3)
        for s in range(3):
            sd[f"roi_heads.box_predictor.{s}.cls_score.weight"] = torch.zeros(num_classes + 1, 1)
            sd[f"roi_heads.box_predictor.{s}.bbox_pred.weight"] = torch.zeros(reg_rows, 1)
        return convert_detectron2_state_dict(sd)[0]

    config, preset = infer_config(state_dict(6, 80, 4), None)
    assert preset == PRESET and config == get_preset(PRESET)
    config, _ = infer_config(state_dict(23, 3, 12), None)
    assert (config.backbone.depth, config.num_classes, config.class_names) == (101, 3, None)
    assert config.cascade.class_agnostic is False
    assert config.backbone.stride_in_1x1 and config.transform.channel_order == "bgr"
    with pytest.raises(CheckpointError, match="res4 stage has 5 blocks"):
        infer_config(state_dict(5, 80, 4), None)
    resnext = state_dict(23, 80, 4)
    resnext["backbone.layer1.0.conv2.weight"] = torch.zeros(256, 8, 3, 3)  # X-101-32x8d
    with pytest.raises(CheckpointError, match="ResNeXt backbone.*pass a preset"):
        infer_config(resnext, None)


def test_detectron2_names_are_recognised():
    assert is_detectron2_state_dict(["backbone.bottom_up.stem.conv1.weight"])
    assert is_detectron2_state_dict(["roi_heads.box_predictor.0.cls_score.weight"])
    assert not is_detectron2_state_dict(["roi_heads.box_heads.0.fc_cls.weight", "backbone.conv1.weight"])
    assert not is_detectron2_state_dict(["roi_head.bbox_head.0.fc_cls.weight", "neck.fpn_convs.0.conv.weight"])


def test_a_pickle_of_arrays_that_is_not_a_detectron2_model_is_refused(tmp_path):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"model": {"layer.weight": np.zeros(3, np.float32)}}, protocol=4))
    with pytest.raises(CheckpointError, match=r"other\.pkl.*not a detectron2 model"):
        Detector.from_weights(path)


def test_known_weights_names():
    """The two published files, as detectron2's MODEL_ZOO.md lists them, run with the detectron2 mask preset (the
    one their mask head loads into)."""
    expected = {
        "detectron2-r50-1x": ("cascade_mask_rcnn_R_50_FPN_1x/138602847/model_final_e9d89b.pkl", 42.1, 36.4),
        "detectron2-r50-3x": ("cascade_mask_rcnn_R_50_FPN_3x/144998488/model_final_480dd8.pkl", 44.3, 38.5),
    }
    for name, (tail, box_ap, mask_ap) in expected.items():
        entry = KNOWN_WEIGHTS[name]
        assert entry.url == f"https://dl.fbaipublicfiles.com/detectron2/Misc/{tail}"
        assert (entry.format, entry.preset, entry.box_ap, entry.mask_ap) == ("detectron2", MASK_PRESET, box_ap, mask_ap)
        assert entry.preset in PRESETS


# ---------------------------------------------------------------------------------------------------------------------
# A crafted .pkl never runs code


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > '{self.marker}'",)


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_SystemPayload, _ExecPayload])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pkl_never_runs_through_the_loader(tmp_path, payload, protocol):
    """A model-zoo-looking `.pkl` whose array is a payload: plain `pickle.load` runs it (shown in a child process);
    `Detector.from_weights` and `load_checkpoint` refuse it, naming the file and the refused global; nothing runs."""
    marker = tmp_path / "marker"
    path = tmp_path / "model_final_abcdef.pkl"
    model = {"backbone.bottom_up.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "x": payload(marker)}
    path.write_bytes(pickle.dumps({"model": model, "__author__": "Detectron2 Model Zoo"}, protocol=protocol))

    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))", str(path)],
                   check=True, timeout=60)
    assert marker.exists(), "the payload must be live for this test to mean anything"
    marker.unlink()

    global_name = "posix.system" if payload is _SystemPayload and os.name == "posix" else None
    for load in (Detector.from_weights, load_checkpoint):
        with pytest.raises(CheckpointError) as error:
            load(path)
        message = str(error.value)
        assert str(path) in message and "refused global" in message
        if global_name:
            assert global_name in message
        assert not marker.exists()
