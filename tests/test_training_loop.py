"""The loop itself: the loss falls on a batch it sees repeatedly; bf16 autocast on CPU and gradient clipping run;
metrics.jsonl records; and the CLI trains on real COCO images (coco128) end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_training_fixtures import REPO_ROOT, make_tiny_data, run_cli, tiny_raw_config

from cascade_rcnn.training import Trainer
from cascade_rcnn.training.config import experiment_from_dict

COCO128 = Path(os.environ.get("CASCADE_RCNN_COCO128", REPO_ROOT / ".." / "shared" / "data" / "coco128"))


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_loss_falls_when_fitting_two_images(tmp_path):
    data = make_tiny_data(tmp_path / "data", num_train=2, num_val=1)
    raw = tiny_raw_config(data, tmp_path / "run", epochs=14, lr_steps=[], checkpoint_interval=0, keep_checkpoints=1,
                          clip_grad_norm=5.0)
    raw["data"]["flip_prob"] = 0.0
    Trainer(experiment_from_dict(raw), progress=False, log=lambda message: None).train()
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert len(losses) == 14 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses


def test_bf16_autocast_and_gradient_clipping_on_cpu(tmp_path):
    data = make_tiny_data(tmp_path / "data")
    raw = tiny_raw_config(data, tmp_path / "run", amp="bf16", clip_grad_norm=1.0, max_iters=2)
    result = Trainer(experiment_from_dict(raw), progress=False, log=lambda message: None).train()
    assert result.iterations == 2
    logged = records(tmp_path / "run")
    assert [r["iteration"] for r in logged] == [1, 2]
    for r in logged:
        assert all(k in r for k in ("lr", "loss", "loss_rpn_cls", "loss_cls_stage2", "images_per_s", "eta_s"))
        assert r["grad_norm"] > 0 and torch.isfinite(torch.tensor(r["loss"]))


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: fp16 is allowed")
    from cascade_rcnn.errors import ConfigError

    data = make_tiny_data(tmp_path / "data")
    with pytest.raises(ConfigError, match="fp16"):
        Trainer(experiment_from_dict(tiny_raw_config(data, tmp_path / "run", amp="fp16")), log=lambda message: None)


@pytest.mark.skipif(not COCO128.is_dir(), reason=f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128)")
def test_cli_trains_on_coco128(tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "train",
        "--train-images", str(COCO128 / "train2017"),
        "--train-annotations", str(COCO128 / "annotations" / "instances_train2017.json"),
        "--output-dir", str(out), "--batch-size", "2", "--max-iters", "2", "--workers", "1", "--progress", "off",
        "--set", "model.transform.min_size=128", "--set", "model.transform.max_size=192",
        "--set", "model.rpn.post_nms_top_n_train=200", "--set", "model.cascade.batch_size_per_image=64",
        "--set", "train.calibration_images=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "with 80 classes" in done.stdout and "128 training images" in done.stdout
    logged = records(out)
    assert len(logged) == 1 and logged[0]["iteration"] == 2  # log_interval 20: one record, at the end
    assert torch.isfinite(torch.tensor(logged[0]["loss"]))
    assert (out / "model_final.safetensors").exists() and (out / "config.json").exists()
