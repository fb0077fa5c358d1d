"""What users of a trainer expect: gradient accumulation gives the update of the larger batch, a resumed accumulating
run continues exactly, early stopping on the best metric, and the effective recipe printed and saved."""

from __future__ import annotations

import json

import torch
from test_training_fixtures import make_tiny_data, tiny_raw_config

from cascade_rcnn.training import Trainer
from cascade_rcnn.training.config import experiment_from_dict


def one_step(data, out, batch_size: int, accumulate: int, max_iters: int = 1):
    """A Trainer after `max_iters` steps (no warm-up, lr as given), its initial weights and its logged losses."""
    # NCHW maps: oneDNN's channels-last weight gradients (the trainer's CPU default) sum over a batch in an order that
    # depends on the batch size, 4.8e-3 of the norm apart on this random net, which would hide the 1e-4 check below.
    raw = tiny_raw_config(data, out, batch_size=batch_size, accumulate=accumulate, max_iters=max_iters,
                          warmup_iters=0, clip_grad_norm=0.0, checkpoint_interval=0, lr=0.01,
                          memory_format="contiguous")  # fmt: skip
    trainer = Trainer(experiment_from_dict(raw), progress=False, log=lambda message: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer, before, logged


def test_accumulated_steps_make_the_update_of_one_large_batch(tmp_path):
    """Two accumulated micro-batches of 1 image == one batch of 2 images, BN frozen.

    The losses are means over each batch's samples; accumulation backpropagates each micro-batch's mean divided by
    the number of micro-batches. That is the 2-image batch's mean exactly when every image contributes as many
    samples (the tiny config's quotas, 64 anchors and 32 RoIs per image, are always full, as 256 / 512 are at the
    real sizes), so the two updates agree to float32 rounding. All images have one size (no padding differs) and
    sampling is seeded per image (it does not depend on the batch an image is in).
    """
    data = make_tiny_data(tmp_path / "data", num_train=4, num_val=1)
    large, start, large_log = one_step(data, tmp_path / "large", batch_size=2, accumulate=1)
    small, small_start, small_log = one_step(data, tmp_path / "small", batch_size=1, accumulate=2)
    single, _, _ = one_step(data, tmp_path / "single", batch_size=1, accumulate=1)  # one image: another update
    assert all(torch.equal(start[k], small_start[k]) for k in start)
    assert small.recipe["optimizer"]["total_batch"] == large.recipe["optimizer"]["total_batch"] == 2

    # The step's gradient (what SGD's first update is made of: lr x (gradient + weight decay x weight)).
    grads = {n: p.grad for n, p in large.model.named_parameters() if p.grad is not None and p.grad.norm() > 0}
    accumulated = {n: p.grad for n, p in small.model.named_parameters()}
    alone = {n: p.grad for n, p in single.model.named_parameters()}
    assert len(grads) > 50  # the heads, the FPN and backbone stages 2-4
    for name, grad in grads.items():
        # Measured: <= 2.1e-5 of the norm (float32 summation order); the same 2-image step with oneDNN convolutions
        # off differs from itself by up to 4.4e-3 on this randomly initialised net.
        difference = (accumulated[name] - grad).norm() / grad.norm()
        assert difference < 1e-4, f"{name}: accumulated gradient differs by {difference:.2e} of its norm"
    # The tolerance tells gradients apart: one image's is far from the 2-image batch's, and a sum of the micro-batch
    # means instead of their mean would be off by a factor of 2.
    assert max((alone[n] - g).norm() / g.norm() for n, g in grads.items()) > 0.1
    # The logged losses are the batch means too.
    for key in ("loss", "loss_rpn_cls", "loss_cls_stage0", "loss_box_stage2"):
        assert abs(small_log[0][key] - large_log[0][key]) <= 1e-5 * abs(large_log[0][key]) + 1e-7, key


def test_accumulating_run_resumes_exactly(tmp_path):
    data = make_tiny_data(tmp_path / "data", num_train=6, num_val=1)
    straight, _, _ = one_step(data, tmp_path / "straight", batch_size=1, accumulate=2, max_iters=3)
    assert straight.iters_per_epoch == 3 and straight.iteration == 3
    raw = tiny_raw_config(data, tmp_path / "resumed", batch_size=1, accumulate=2, max_iters=1, warmup_iters=0,
                          clip_grad_norm=0.0, checkpoint_interval=1, lr=0.01, memory_format="contiguous")  # fmt: skip
    Trainer(experiment_from_dict(raw), progress=False, log=lambda message: None).train()
    raw["train"]["max_iters"] = 3
    resumed = Trainer(experiment_from_dict(raw), resume=tmp_path / "resumed", progress=False, log=lambda m: None)
    assert resumed.iteration == 1
    resumed.train()
    ours, reference = resumed.model.state_dict(), straight.model.state_dict()
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_odd_batch_count_ends_the_epoch_with_a_shorter_step(tmp_path):
    data = make_tiny_data(tmp_path / "data", num_train=5, num_val=1)
    raw = tiny_raw_config(data, tmp_path / "run", batch_size=1, accumulate=2, epochs=1, lr_steps=[],
                          checkpoint_interval=0)  # fmt: skip
    trainer = Trainer(experiment_from_dict(raw), progress=False, log=lambda message: None)
    assert (trainer.batches_per_epoch, trainer.iters_per_epoch, trainer.total_iters) == (5, 3, 3)
    seen: list[int] = []
    step = trainer.accumulated_step
    counted = lambda batches: seen.append(len(batches)) or step(batches)  # noqa: E731
    trainer.accumulated_step = counted  # type: ignore[method-assign]
    trainer.train()
    assert seen == [2, 2, 1]


def test_early_stopping_on_the_best_metric_and_the_recipe_record(tmp_path):
    data = make_tiny_data(tmp_path / "data", num_train=4, num_val=2)
    # An lr too small to change anything: the metric cannot improve after the first evaluation.
    raw = tiny_raw_config(data, tmp_path / "run", val=True, epochs=6, lr_steps=[], lr=1e-12, patience=2,
                          checkpoint_interval=0, eval_batch_size=2)  # fmt: skip
    messages: list[str] = []
    result = Trainer(experiment_from_dict(raw), progress=False, log=messages.append).train()
    text = "\n".join(messages)
    # Evaluations after epochs 1 (the first best), 2 and 3 (no better): stop after epoch 3 of 6 (2 iterations each).
    assert result.stopped_early and result.iterations == 6
    assert result.best is not None and result.best["iteration"] == 2
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in evals if r["type"] == "eval"] == [2, 4, 6]
    assert "early stop at iteration 6: 2 evaluations without a new best AP (train.patience = 2)" in text
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "best.safetensors").exists()
    assert result.metrics is not None
    # The effective recipe: printed first, and saved in the run folder.
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["recipe"] == "mmdet_1x" and recipe["optimizer"]["lr"] == 1e-12
    assert recipe["schedule"]["lr_step_iters"] == [] and recipe["schedule"]["total_iters"] == 12
    assert "train.lr 0.02 -> 1e-12" in recipe["changed_from_recipe"]
    assert "recipe mmdet_1x, changed:" in text
    assert "optimizer: SGD, momentum 0.9, lr 1e-12 as given (not scaled)" in text
    assert "weight decay: 0.0001 on all " in text and "trained tensors, biases and norm affine included" in text
