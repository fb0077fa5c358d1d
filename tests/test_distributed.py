"""Distributed training on CPU with Gloo: one DDP step over 2 processes equals one single-process step on the
combined batch; and `torchrun ... -m cascade_rcnn train` runs end to end (rank 0 writes, evaluation gathered)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from test_training_fixtures import REPO_ROOT, cli_env, make_tiny_data, tiny_raw_config, write_toml

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def combined_batch(data: dict, count: int = 4) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """`count` same-size training images (no flip) with their targets and fixed per-image sampling seeds."""
    from cascade_rcnn.data import load_coco
    from cascade_rcnn.data.transforms import DetectionTorchDataset

    dataset = DetectionTorchDataset(load_coco(data["train_annotations"], data["train_images"]), train=False)
    images, targets = [], []
    for index in range(count):
        image, target = dataset[index]
        target["sample_seed"] = torch.tensor(1000 + index)
        images.append(image)
        targets.append(target)
    return images, targets


def experiment(data: dict, tmp_path, batch_size: int):
    from cascade_rcnn.training.config import experiment_from_dict

    # warmup_iters 0: the first step uses the full lr, so that the updates are large enough to compare.
    raw = tiny_raw_config(data, tmp_path / f"run{batch_size}", batch_size=batch_size, warmup_iters=0)
    return experiment_from_dict(raw)


def ddp_worker(rank: int, world_size: int, port: int, data: dict, tmp_path, batch_file: str, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from cascade_rcnn.training import Trainer
    from cascade_rcnn.training.distributed import shutdown_distributed

    trainer = Trainer(experiment(data, tmp_path, batch_size=2), progress=False, log=lambda message: None)
    assert trainer.info.world_size == world_size and trainer.info.backend == "gloo"
    images, targets = torch.load(batch_file, weights_only=True)
    share = slice(rank * 2, rank * 2 + 2)
    trainer.step(images[share], targets[share])
    if rank == 0:
        torch.save(
            {"grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
             "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}},
            out_file,
        )  # fmt: skip
    shutdown_distributed(trainer.info)


def single_step(data: dict, tmp_path, images, targets) -> tuple[dict, dict]:
    from cascade_rcnn.training import Trainer

    trainer = Trainer(experiment(data, tmp_path, batch_size=len(images)), progress=False, log=lambda message: None)
    assert trainer.info.world_size == 1
    trainer.step(images, targets)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert len(grads) == len(trainer.params)  # every trainable tensor got a gradient
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return grads, params


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name in b:
        scale = b[name].norm().item()
        if scale > 0:
            worst = max(worst, (a[name] - b[name]).norm().item() / scale)
    return worst


def test_two_gloo_processes_step_equals_single_process_step_on_combined_batch(tmp_path):
    data = make_tiny_data(tmp_path / "data")
    images, targets = combined_batch(data)
    batch_file, out_file = str(tmp_path / "batch.pt"), str(tmp_path / "ddp.pt")
    torch.save((images, targets), batch_file)
    mp.spawn(ddp_worker, args=(2, free_port(), data, tmp_path, batch_file, out_file), nprocs=2, join=True)
    ddp = torch.load(out_file, weights_only=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grads, params = single_step(data, tmp_path, images, targets)
        first_half_grads, _ = single_step(data, tmp_path, images[:2], targets[:2])
    finally:
        torch.set_num_threads(threads)

    assert ddp["grads"].keys() == grads.keys()
    # Same gradient up to float summation order; a single process on half the batch is far from it, so the
    # comparison can tell a correct DDP step from a merely plausible one.
    assert relative_difference(ddp["grads"], grads) < 1e-4
    assert relative_difference(first_half_grads, grads) > 1e-2
    for name, value in params.items():
        torch.testing.assert_close(ddp["params"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_sampling_seed_makes_samples_independent_of_the_batch():
    """The RPN's and heads' sampling of an image depends on its `sample_seed`, not on its batch neighbours."""
    from cascade_rcnn.modeling.matcher import BACKGROUND, sample_indices, sampling_generator

    matches = torch.tensor([0, 1, BACKGROUND] * 100)
    target = {"sample_seed": torch.tensor(7)}
    first = sample_indices(matches, 64, 0.25, sampling_generator(target, 0))
    torch.rand(100)  # global generator moves on: no effect
    again = sample_indices(matches, 64, 0.25, sampling_generator(target, 0))
    other_stream = sample_indices(matches, 64, 0.25, sampling_generator(target, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other_stream[1])
    assert sampling_generator({}, 0) is None


def test_torchrun_two_processes_end_to_end(tmp_path):
    data = make_tiny_data(tmp_path / "data")
    out = tmp_path / "run"
    config = write_toml(tiny_raw_config(data, out, val=True, max_iters=2, batch_size=1), tmp_path / "tiny.toml")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "cascade_rcnn", "train", "--config", str(config), "--progress", "off"]  # fmt: skip
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert done.stdout.count("done: 2 iterations") == 1  # rank 0 alone reports
    assert "1 images x 2 processes" in done.stdout
    assert (out / "model_final.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_00000002.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics) == 12
    # Both processes' val images were gathered: the detections cover every val image.
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 1
    assert "on 4 val images" in done.stdout  # rank 0 scored both processes' shares (2 images each)
