"""Checkpoints and resuming: a run killed with SIGKILL (or stopped with SIGINT) and resumed ends bit-identical to an
uninterrupted run; a non-finite loss stops training naming the iteration and the loss term, and the last good
checkpoint stays."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_fixtures import REPO_ROOT, cli_command, cli_env, make_tiny_data, run_cli, tiny_raw_config, write_toml

from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.training import checkpoint as ckpt

TOTAL_ITERS = 8  # 2 epochs x 4 batches of 2 images


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny dataset, its config file, and an uninterrupted run's final weights."""
    root = tmp_path_factory.mktemp("resume")
    data = make_tiny_data(root / "data")
    config = write_toml(tiny_raw_config(data, root / "unused"), root / "tiny.toml")
    done = run_cli("train", "--config", str(config), "--output-dir", str(root / "straight"), "--progress", "off")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "config": config, "reference": load_file(root / "straight" / "model_final.safetensors")}


def start_and_stop(config: Path, out: Path, sig: int) -> subprocess.Popen:
    """Start a training run, and send `sig` as soon as its first checkpoint (iteration 2) exists."""
    process = subprocess.Popen(
        cli_command("train", "--config", str(config), "--output-dir", str(out), "--progress", "off"),
        cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = ckpt.checkpoint_path(out, 2)
    deadline = time.monotonic() + 240
    while not first.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("no checkpoint within 240 s")
        time.sleep(0.01)
    process.send_signal(sig)
    process.wait(timeout=240)
    return process


def assert_same_weights(path: Path, reference: dict[str, torch.Tensor]) -> None:
    resumed = load_file(path)
    assert resumed.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(resumed[name], reference[name])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"


def test_sigkill_then_resume_is_bit_identical(runs):
    out = runs["root"] / "killed"
    process = start_and_stop(runs["config"], out, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model_final.safetensors").exists(), "the run finished before it was killed"
    left = ckpt.list_checkpoints(out)
    assert left and int(left[-1].stem.split("_")[1]) < TOTAL_ITERS
    resumed = run_cli("train", "--resume", str(out), "--progress", "off")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at iteration" in resumed.stdout
    assert_same_weights(out / "model_final.safetensors", runs["reference"])


def test_sigint_writes_a_checkpoint_and_exits_cleanly(runs):
    out = runs["root"] / "interrupted"
    process = start_and_stop(runs["config"], out, signal.SIGINT)
    stderr = process.stderr.read()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "interrupted at iteration" in stderr and "--resume" in stderr
    state = ckpt.load_training_checkpoint(ckpt.latest_checkpoint(out))
    assert 2 <= state["iteration"] < TOTAL_ITERS
    # The same config given again (not --resume alone) is accepted, since nothing that matters changed.
    resumed = run_cli("train", "--config", str(runs["config"]), "--resume", str(out), "--progress", "off")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(out / "model_final.safetensors", runs["reference"])


def test_resume_refuses_a_changed_config(runs):
    out = runs["root"] / "straight"
    changed = run_cli("train", "--config", str(runs["config"]), "--resume", str(out), "--set", "train.lr=0.5")
    assert changed.returncode == 2
    assert "train.lr" in changed.stderr


def test_final_weights_and_export_are_detector_loadable(runs, tmp_path):
    from cascade_rcnn.api import Detector

    out = runs["root"] / "straight"
    exported = tmp_path / "exported.safetensors"
    done = run_cli("train", "--resume", str(ckpt.latest_checkpoint(out)), "--export-weights", str(exported))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(exported, runs["reference"])
    detector = Detector.from_weights(out / "model_final.safetensors")
    assert detector.class_names == ("circle", "square", "triangle", "cross")
    assert detector.config.transform.min_size == 64
    records = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(records) == TOTAL_ITERS  # log_interval 1, no evaluation configured


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(runs, tmp_path, monkeypatch):
    from cascade_rcnn.modeling.detector import CascadeRCNN
    from cascade_rcnn.training import NonFiniteLossError, Trainer
    from cascade_rcnn.training.config import experiment_from_dict
    data = {k: runs["root"] / "data" / v for k, v in
            (("train_images", "train"), ("train_annotations", "train.json"))}  # fmt: skip
    exp = experiment_from_dict(tiny_raw_config(data, tmp_path / "run"))
    forward = CascadeRCNN.forward
    calls = []

    def poisoned(self, images, targets, min_size=None):
        losses = forward(self, images, targets, min_size)
        calls.append(1)
        if len(calls) == 3:
            losses["loss_box_stage1"] = losses["loss_box_stage1"] * float("nan")
        return losses

    monkeypatch.setattr(CascadeRCNN, "forward", poisoned)
    trainer = Trainer(exp, progress=False, log=lambda message: None)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    assert "iteration 3" in message and "loss_box_stage1 = nan" in message
    kept = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["iter_00000002.pt"]
    assert str(kept[0]) in message
    assert ckpt.load_training_checkpoint(kept[0])["iteration"] == 2
    assert not (tmp_path / "run" / "model_final.safetensors").exists()


def test_checkpoint_files_are_atomic_and_pruned(tmp_path):
    for iteration in (2, 4, 6, 8):
        ckpt.save_atomic({"format": ckpt.FORMAT, "version": ckpt.VERSION, "iteration": iteration},
                         ckpt.checkpoint_path(tmp_path, iteration))  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iter_00000002.pt", "iter_00000004.pt", "iter_00000006.pt", "iter_00000008.pt"]  # no temporary files left
    (tmp_path / "checkpoints" / ".iter_00000010.pt.tmp123").write_bytes(b"half a file")  # a write cut short
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["iter_00000002.pt", "iter_00000004.pt"]
    assert ckpt.resolve_resume(tmp_path) == ckpt.checkpoint_path(tmp_path, 8)
    assert ckpt.load_training_checkpoint(ckpt.checkpoint_path(tmp_path, 8))["iteration"] == 8
    torch.save({"state_dict": {}}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="--weights"):
        ckpt.load_training_checkpoint(tmp_path / "weights.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no training checkpoints"):
        ckpt.resolve_resume(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(tmp_path / "missing")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    generator = torch.Generator().manual_seed(5)
    path = ckpt.save_atomic({"rng": ckpt.capture_rng_states(generator)}, tmp_path / "rng.pt")
    states = torch.load(path, weights_only=True)["rng"]
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    ckpt.restore_rng_states(states, generator)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item()) == expected
