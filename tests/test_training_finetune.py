"""Fine-tuning starts: another class count re-initialises only the class-dependent layers of the three stages; a
backbone-only torchvision file loads under `backbone.` with its classifier ignored; the trainer reports it all."""

from __future__ import annotations

import pytest
import torch
from test_training_fixtures import TINY_MODEL, make_tiny_data, tiny_raw_config
from torchvision.models.resnet import Bottleneck, ResNet

from cascade_rcnn.config import get_preset, with_overrides
from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.modeling.detector import build_model
from cascade_rcnn.training.initialization import describe_load, load_initial_weights
from cascade_rcnn.io.weights import save_weights


def tiny_config(num_classes: int, **overrides):
    dotted = {f"{section}.{key}": tuple(value) if isinstance(value, list) else value
              for section, fields in TINY_MODEL.items() for key, value in fields.items()}  # fmt: skip
    return with_overrides(get_preset("cascade_rcnn_r50_fpn", num_classes=num_classes), {**dotted, **overrides})


@pytest.mark.parametrize("class_agnostic", [True, False])
def test_other_class_count_reinitialises_only_class_layers(tmp_path, class_agnostic):
    torch.manual_seed(0)
    source_cfg = tiny_config(3, **{"cascade.class_agnostic": class_agnostic})
    source = build_model(source_cfg)
    path = save_weights(source, source_cfg, tmp_path / "three_classes.safetensors")
    torch.manual_seed(1)
    model = build_model(tiny_config(5, **{"cascade.class_agnostic": class_agnostic}))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}

    loaded = load_initial_weights(model, path)
    report = loaded.report

    layers = ("fc_cls",) if class_agnostic else ("fc_cls", "fc_reg")
    expected = sorted(f"roi_heads.box_heads.{s}.{layer}.{p}" for s in range(3) for layer in layers
                      for p in ("weight", "bias"))  # fmt: skip
    assert sorted(report.reinitialised) == expected
    assert not report.missing and not report.unexpected
    state, loaded_from = model.state_dict(), source.state_dict()
    for name in state:
        if name in expected:
            assert torch.equal(state[name], fresh[name]), name  # kept its fresh initialisation
        else:
            assert torch.equal(state[name], loaded_from[name]), name
    summary, listing = describe_load(loaded, model, path)
    assert all(name in summary for name in expected)
    assert "warning" not in summary
    assert "3 classes in the file, 5 in this model" in summary
    assert f"kept {len(report.loaded)} tensors" in summary and "dropped 0 tensors" in summary
    # The re-initialised classifier shows both shapes: 3 + 1 and 5 + 1 rows (background last).
    assert "roi_heads.box_heads.0.fc_cls.weight: file (4, 128) -> model (6, 128)" in summary
    assert all(name in listing for name in report.loaded)


def test_backbone_only_torchvision_file(tmp_path):
    torch.manual_seed(0)
    # A torchvision ResNet-50 as ImageNet training leaves it (the tiny config's bottleneck width), saved as a plain
    # state_dict: conv1/bn1/layer*/fc names, batch-norm running statistics and step counters.
    imagenet = ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=16)
    for module in imagenet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    path = tmp_path / "resnet50_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_model(tiny_config(4))

    loaded = load_initial_weights(model, path)
    report, source_format = loaded.report, loaded.source

    backbone = [n for n in model.state_dict() if n.startswith("backbone.")]
    assert sorted(report.loaded) == sorted(backbone)
    assert {"fc.weight", "fc.bias"} <= set(report.unexpected)
    assert all(n in ("fc.weight", "fc.bias") or n.endswith("num_batches_tracked") for n in report.unexpected)
    assert report.missing and all(not n.startswith("backbone.") for n in report.missing)
    assert not report.reinitialised
    source = imagenet.state_dict()
    assert torch.equal(model.backbone.layer1[0].conv1.weight, source["layer1.0.conv1.weight"])
    assert torch.equal(model.backbone.layer4[2].bn3.running_var, source["layer4.2.bn3.running_var"])
    assert "backbone-only" in source_format


def test_unrelated_file_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError):
        load_initial_weights(build_model(tiny_config(4)), path)


def test_trainer_reports_the_weights_it_loaded(tmp_path):
    from cascade_rcnn.training import Trainer
    from cascade_rcnn.training.config import experiment_from_dict

    data = make_tiny_data(tmp_path / "data")
    source_cfg = tiny_config(80)
    weights = save_weights(build_model(source_cfg), source_cfg, tmp_path / "coco80.safetensors")
    raw = tiny_raw_config(data, tmp_path / "run")
    raw["weights"] = str(weights)
    messages: list[str] = []
    Trainer(experiment_from_dict(raw), progress=False, log=messages.append)
    text = "\n".join(messages)
    assert "80 classes in the file, 4 in this model" in text
    assert "re-initialised 6 tensors (shape differs from the file" in text
    assert "roi_heads.box_heads.2.fc_cls.weight: file (81, 128) -> model (5, 128)" in text  # background included
    assert "dropped 0 tensors of the file" in text
    assert "calibrated" not in text  # weights given: no from-scratch initialisation
    assert (tmp_path / "run" / "weights_load.txt").read_text().count("backbone.layer1.0.conv1.weight") == 1
