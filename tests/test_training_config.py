"""Training config: files, overrides, unknown keys, schedules, lr scaling. No model is built here."""

from __future__ import annotations

import argparse

import pytest

from cascade_rcnn.errors import ConfigError
from cascade_rcnn.training.config import (
    ExperimentConfig,
    apply_overrides,
    experiment_from_dict,
    load_experiment,
    parse_override,
    resolve_model_config,
    scaled_lr,
    schedule_of,
)
from cascade_rcnn.training.schedule import lr_factor

TOML = """
preset = "cascade_rcnn_r50_fpn"
[model]
transform = { min_size = 512, max_size = 853 }
anchors = { scales = [4.0] }
[data]
train_images = "imgs"
train_annotations = "ann.json"
multiscale_short_sides = [480, 512]
[train]
schedule = "20e"
batch_size = 4
"""

YAML = """
preset: cascade_rcnn_r50_fpn
model:
  transform: {min_size: 512, max_size: 853}
  anchors: {scales: [4.0]}
data:
  train_images: imgs
  train_annotations: ann.json
  multiscale_short_sides: [480, 512]
train:
  schedule: 20e
  batch_size: 4
"""


def test_toml_and_yaml_give_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text(TOML)
    (tmp_path / "a.yaml").write_text(YAML)
    a = load_experiment(tmp_path / "a.toml")
    b = load_experiment(tmp_path / "a.yaml")
    assert a == b
    assert a.train.batch_size == 4 and a.data.multiscale_short_sides == (480, 512)
    model = resolve_model_config(a, num_classes=3, class_names=("a", "b", "c"))
    assert model.transform.min_size == 512 and model.anchors.scales == (4.0,)
    assert model.num_classes == 3 and model.class_names == ("a", "b", "c")


def test_round_trip_through_dict():
    exp = experiment_from_dict({"model": {"rpn": {"nms_thresh": 0.6}}, "train": {"lr_steps": [3, 4]}})
    assert experiment_from_dict(exp.to_dict()) == exp


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"trian": {}}, "trian"),
        ({"train": {"lrr": 0.1}}, "lrr"),
        ({"data": {"train_image": "x"}}, "train_image"),
        ({"model": {"rpn": {"nms_tresh": 0.5}}}, "nms_tresh"),
        ({"model": {"backbone": {"depht": 50}}}, "depht"),
    ],
)
def test_unknown_keys_are_named(raw, key):
    with pytest.raises(ConfigError, match=key):
        experiment_from_dict(raw)


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nbatch_sise = 2\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        load_experiment(path)


def test_invalid_values_are_refused():
    with pytest.raises(ConfigError, match="train.batch_size"):
        experiment_from_dict({"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="amp"):
        experiment_from_dict({"train": {"amp": "fp8"}})
    with pytest.raises(ConfigError, match="best_metric"):
        experiment_from_dict({"train": {"best_metric": "mAP"}})
    with pytest.raises(ConfigError, match="val_annotations"):
        experiment_from_dict({"data": {"val_images": "v"}})
    with pytest.raises(ConfigError, match="unknown preset"):
        experiment_from_dict({"preset": "yolo"})


def test_dotted_overrides_parse_types_and_win(tmp_path):
    (tmp_path / "a.toml").write_text(TOML)
    sets = ["train.lr=0.01", "train.amp=bf16", "train.scale_lr=false", "model.rpn.nms_thresh=0.6",
            "data.multiscale_short_sides=[640, 672]", "train.weight_decay=1e-4"]  # fmt: skip
    exp = load_experiment(tmp_path / "a.toml", dict(parse_override(s) for s in sets))
    assert exp.train.lr == 0.01 and isinstance(exp.train.lr, float)
    assert exp.train.amp == "bf16" and exp.train.scale_lr is False
    assert exp.train.weight_decay == 1e-4
    assert exp.data.multiscale_short_sides == (640, 672)
    assert resolve_model_config(exp, 1, None).rpn.nms_thresh == 0.6
    assert exp.train.schedule == "20e"  # untouched keys keep the file's values
    with pytest.raises(ConfigError, match="lrr"):
        load_experiment(None, {"train.lrr": 1})
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")


def test_apply_overrides_does_not_modify_input():
    raw = {"train": {"lr": 0.02}}
    out = apply_overrides(raw, {"train.lr": 0.1, "data.format": "voc"})
    assert raw == {"train": {"lr": 0.02}}
    assert out == {"train": {"lr": 0.1}, "data": {"format": "voc"}}


def test_model_class_count_must_match_data():
    exp = experiment_from_dict({"model": {"num_classes": 5}})
    with pytest.raises(ConfigError, match="num_classes"):
        resolve_model_config(exp, num_classes=3, class_names=None)


def test_schedules_and_linear_lr_scaling():
    assert schedule_of(ExperimentConfig().train) == (12, (8, 11))
    assert schedule_of(experiment_from_dict({"train": {"schedule": "20e"}}).train) == (20, (16, 19))
    custom = experiment_from_dict({"train": {"schedule": "custom", "epochs": 3, "lr_steps": [2]}}).train
    assert schedule_of(custom) == (3, (2,))
    train = ExperimentConfig().train  # 0.02 at 16 images, batch 2 per process
    assert scaled_lr(train, world_size=8) == pytest.approx(0.02)
    assert scaled_lr(train, world_size=1) == pytest.approx(0.0025)
    fixed = experiment_from_dict({"train": {"scale_lr": False, "lr": 0.01}}).train
    assert scaled_lr(fixed, world_size=4) == 0.01


def test_lr_factor_warmup_and_steps():
    # mmdetection LinearLR(start_factor=0.001, end=500) + MultiStepLR([8, 11] epochs of 100 iterations).
    steps = (800, 1100)
    assert lr_factor(0, 500, 0.001, steps, 0.1) == pytest.approx(0.001)
    assert lr_factor(250, 500, 0.001, steps, 0.1) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(500, 500, 0.001, steps, 0.1) == 1.0
    assert lr_factor(799, 500, 0.001, steps, 0.1) == 1.0
    assert lr_factor(800, 500, 0.001, steps, 0.1) == pytest.approx(0.1)
    assert lr_factor(1100, 500, 0.001, steps, 0.1) == pytest.approx(0.01)


def test_cli_flags_map_onto_config_keys(tmp_path):
    from cascade_rcnn.commands import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--train-images", "i", "--train-annotations", "a.json", "--epochs", "3",
                              "--batch-size", "1", "--preset", "cascade_rcnn_r101_fpn", "--set", "train.epochs=5"])  # fmt: skip
    exp = train.experiment_from_args(args)
    assert exp.data.train_images == "i" and exp.train.batch_size == 1
    assert exp.preset == "cascade_rcnn_r101_fpn"
    assert exp.train.epochs == 5  # --set comes last
    resume_only = parser.parse_args(["--resume", str(tmp_path)])
    assert train.experiment_from_args(resume_only) is None
