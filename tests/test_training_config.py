"""Training config: files, overrides, unknown keys, schedules, lr scaling. No model is built here."""

from __future__ import annotations

import argparse
import json

import pytest
from helpers import SHARED

from cascade_rcnn.config import get_preset

from cascade_rcnn.errors import ConfigError
from cascade_rcnn.training.config import (
    ExperimentConfig,
    apply_overrides,
    experiment_from_dict,
    load_experiment,
    parse_override,
    resolve_model_config,
    resolve_schedule,
    scaled_lr,
    schedule_of,
    total_batch,
)
from cascade_rcnn.training.schedule import build_optimizer, lr_factor, split_parameters

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


def mmengine_linear_then_multistep(iterations: int, start_factor: float, end: int, milestones: list[int],
                                   gamma: float) -> list[float]:
    """The lr factor of each iteration as mmengine computes it: `LinearLR(start_factor, begin=0, end, by_epoch=False)`
    and `MultiStepLR(milestones, gamma)` (given here in iterations), both chained (each multiplies the current lr),
    with mmengine's recursive `_get_value` formulas (mmengine/optim/scheduler/param_scheduler.py) and its `step()`
    that only updates while begin <= step < end."""
    lr, out = 1.0, []
    total_iters = end - 0 - 1  # LinearParamScheduler.total_iters = end - begin - 1
    for step in range(iterations):
        if step < end:  # LinearLR._get_value at last_step = step
            lr *= start_factor if step == 0 else 1.0 + (1.0 - start_factor) / (
                total_iters * start_factor + (step - 1) * (1.0 - start_factor))
        if step in milestones:
            lr *= gamma
        out.append(lr)
    return out


def test_lr_factor_is_mmengines_warmup_and_steps():
    # mmdetection's schedule_1x: LinearLR(start_factor=0.001, end=500) + MultiStepLR([8, 11] epochs of 100 iters).
    steps = (800, 1100)
    reference = mmengine_linear_then_multistep(1200, 0.001, 500, list(steps), 0.1)
    ours = [lr_factor(i, 500, 0.001, steps, 0.1) for i in range(1200)]
    assert ours == pytest.approx(reference, rel=1e-9)
    assert ours[0] == pytest.approx(0.001) and ours[499] == 1.0 and ours[498] < 1.0  # full lr at iteration 499
    assert ours[800] == pytest.approx(0.1) and ours[1100] == pytest.approx(0.01)


def test_lr_factor_detectron2_warmup_reaches_lr_after_warmup():
    # detectron2: factor = f * (1 - alpha) + alpha with alpha = iter / WARMUP_ITERS, 1 from iteration WARMUP_ITERS.
    factors = [lr_factor(i, 1000, 0.001, (60000, 80000), 0.1, "after") for i in (0, 500, 999, 1000, 60000, 80000)]
    assert factors == pytest.approx([0.001, 0.001 * 0.5 + 0.5, 0.001 * 0.001 + 0.999, 1.0, 0.1, 0.01])


def test_mmdet_recipe_is_the_reference_config():
    """The defaults (recipe mmdet_1x) against what mmdetection 3.3.0 itself loaded from
    cascade-rcnn_r50_fpn_1x_coco.py (shared/reference/mmdet_train/train_reference.json, schedule_1x and settings)."""
    path = SHARED / "reference" / "mmdet_train" / "train_reference.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    reference = json.loads(path.read_text())
    sched, settings = reference["schedule_1x"], reference["settings"]
    exp = ExperimentConfig()
    t, d = exp.train, exp.data
    assert exp.recipe == "mmdet_1x" and experiment_from_dict({}).to_dict() == exp.to_dict()
    optimizer = sched["optim_wrapper"]["optimizer"]
    assert (optimizer["type"], t.lr, t.momentum, t.weight_decay) == ("SGD", optimizer["lr"], optimizer["momentum"],
                                                                    optimizer["weight_decay"])  # fmt: skip
    assert "paramwise_cfg" not in sched["optim_wrapper"] and t.weight_decay_norm is None  # decay on everything
    warmup, steps = sched["param_scheduler"]
    assert (warmup["type"], warmup["by_epoch"], warmup["begin"]) == ("LinearLR", False, 0)
    assert (t.warmup_factor, t.warmup_iters, t.warmup_end) == (warmup["start_factor"], warmup["end"], "last_iter")
    assert (steps["type"], steps["by_epoch"], steps["gamma"]) == ("MultiStepLR", True, t.gamma)
    assert schedule_of(t) == (sched["train_loop"]["max_epochs"], tuple(steps["milestones"]))
    assert t.lr_reference_batch == sched["auto_scale_lr"]["base_batch_size"] == sched["total_batch_size"]
    assert scaled_lr(t, world_size=sched["total_batch_size"] // t.batch_size) == pytest.approx(optimizer["lr"])
    pipeline = {step["type"]: step for step in sched["train_dataloader"]["pipeline"]}
    model = get_preset(exp.preset, num_classes=80)
    assert tuple(pipeline["Resize"]["scale"]) == (model.transform.max_size, model.transform.min_size)
    assert pipeline["Resize"]["keep_ratio"] and model.transform.resize_rule == "keep_ratio"
    assert pipeline["RandomFlip"]["prob"] == d.flip_prob and not d.multiscale_short_sides
    assert settings["data_preprocessor"]["pad_size_divisor"] == model.transform.size_divisible
    stock = settings["model_train_cfg_stock"]
    proposal, rpn = stock["rpn_proposal"], stock["rpn"]
    assert (proposal["nms_pre"], proposal["max_per_img"], proposal["nms"]["iou_threshold"]) == (
        model.rpn.pre_nms_top_n_train, model.rpn.post_nms_top_n_train, model.rpn.nms_thresh)
    assert proposal["min_bbox_size"] == model.rpn.min_size
    assert (rpn["sampler"]["num"], rpn["sampler"]["pos_fraction"]) == (model.rpn.batch_size_per_image,
                                                                       model.rpn.positive_fraction)  # fmt: skip
    for stage, iou in zip(stock["rcnn"], model.cascade.stage_ious):
        assert (stage["sampler"]["num"], stage["sampler"]["pos_fraction"], stage["assigner"]["pos_iou_thr"]) == (
            model.cascade.batch_size_per_image, model.cascade.positive_fraction, iou)
        assert stage["sampler"]["add_gt_as_proposals"] == model.cascade.add_gt_as_proposals


def test_detectron2_recipe_and_iteration_schedules():
    exp = experiment_from_dict({"recipe": "detectron2_1x"})
    t = exp.train
    assert (t.lr, t.lr_reference_batch, t.momentum, t.weight_decay, t.weight_decay_norm) == (0.02, 16, 0.9, 1e-4, 0.0)
    assert (t.warmup_iters, t.warmup_factor, t.warmup_end, t.gamma) == (1000, 0.001, "after", 0.1)
    assert exp.data.multiscale_short_sides == (640, 672, 704, 736, 768, 800) and exp.data.flip_prob == 0.5
    assert schedule_of(t) == (90000, (60000, 80000))
    # At detectron2's total batch of 16 the iterations are its own; at 2 images they scale by 8 (auto_scale_workers).
    full = resolve_schedule(t, iters_per_epoch=100, world_size=8)
    assert (full.total_iters, full.step_iters, full.warmup_iters, full.lr) == (90000, (60000, 80000), 1000, 0.02)
    small = resolve_schedule(t, iters_per_epoch=100, world_size=1)
    assert (small.total_iters, small.step_iters, small.warmup_iters) == (720000, (480000, 640000), 8000)
    assert small.lr == pytest.approx(0.0025)
    assert schedule_of(experiment_from_dict({"recipe": "detectron2_3x"}).train) == (270000, (210000, 250000))
    # The file and the overrides are layered on the recipe, and the recipe is kept in the saved config.
    exp = experiment_from_dict({"recipe": "detectron2_1x", "train": {"warmup_iters": 10}})
    assert exp.train.warmup_iters == 10 and exp.train.weight_decay_norm == 0.0
    assert experiment_from_dict(exp.to_dict()) == exp
    with pytest.raises(ConfigError, match="unknown recipe 'mmdet_3x'"):
        experiment_from_dict({"recipe": "mmdet_3x"})
    with pytest.raises(ConfigError, match="counts iterations"):
        experiment_from_dict({"recipe": "detectron2_1x", "train": {"epochs": 3}})


def test_epoch_schedules_keep_the_warmup_and_scale_only_the_lr():
    train = ExperimentConfig().train
    resolved = resolve_schedule(train, iters_per_epoch=50, world_size=1)
    assert (resolved.total_iters, resolved.step_iters, resolved.warmup_iters) == (600, (400, 550), 500)
    assert resolved.lr == pytest.approx(0.0025)
    accumulated = experiment_from_dict({"train": {"accumulate": 4}}).train
    assert total_batch(accumulated, world_size=2) == 16 and scaled_lr(accumulated, world_size=2) == pytest.approx(0.02)


def test_weight_decay_groups():
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    groups = split_parameters(model)
    assert groups.norm == ["1.weight", "1.bias"] and groups.frozen == ["0.bias"]
    assert groups.decayed == ["0.weight", "2.weight", "2.bias"]
    everything = build_optimizer(model, 0.1, 0.9, 1e-4)  # mmdetection: one group, decay on all trained tensors
    assert len(everything.param_groups) == 1 and len(everything.param_groups[0]["params"]) == 5
    detectron2 = build_optimizer(model, 0.1, 0.9, 1e-4, weight_decay_norm=0.0)
    assert [len(g["params"]) for g in detectron2.param_groups] == [3, 2]
    assert [g["weight_decay"] for g in detectron2.param_groups] == [1e-4, 0.0]


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
