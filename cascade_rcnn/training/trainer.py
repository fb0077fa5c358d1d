"""The training loop: one place that reads an `ExperimentConfig` and runs it, on one process or under torchrun.

    data (cascade_rcnn.data) -> model(images, targets) -> losses -> finite? -> backward [x accumulate] -> [clip]
    -> SGD step -> lr schedule step -> [log, checkpoint, evaluate, keep best, stop early?] -> ...
    -> model_final.safetensors, metrics.json

Output folder (`train.output_dir`, written by rank 0 only):

    config.json               the run's config and the resolved model config
    recipe.json               the effective recipe (optimiser, schedule in iterations, data, sampling), also printed
    metrics.jsonl             one JSON record per log interval ("train") and per evaluation ("eval")
    checkpoints/iter_*.pt     resumable training state, the last `keep_checkpoints` kept
    best.safetensors          weights of the best evaluation so far (by `best_metric`), and best.json
    model_final.safetensors   final weights (Detector-loadable, like every .safetensors here)
    metrics.json, per_class_ap.json, pr_curves*   the final COCO evaluation
    weights_load.txt          with --weights: what happened to every tensor of the file

Exactness. Nothing in a training step draws from a global random generator: batch order is a function of
(seed, epoch), augmentation of (seed, epoch, image index), anchor/RoI sampling of a per-image seed. With model,
optimiser, scheduler and scaler states and the data position restored, a resumed CPU run repeats the remaining steps
of an uninterrupted one bit for bit. (The global generator states are saved and restored all the same.)

Distributed normalisation and gradient accumulation. Each process computes the mean losses of its own images (the
RPN and heads normalise by their sampled count, `rpn.batch_size_per_image` anchors and `cascade.batch_size_per_image`
RoIs per image), DDP averages gradients over processes, and `train.accumulate = k` backpropagates each of k
micro-batches' losses divided by k before one optimiser step. Both equal the combined batch's mean, so that k steps
of b images make the update of one step of k x b images, when every image contributes the same number of samples: the
usual case (2000 proposals per image leave the RoI quota full, and an image has far more than 256 valid anchors); an
image short of samples weighs slightly differently, as in mmdetection and detectron2. Frozen batch norm makes a
micro-batch's forward independent of the others; sampling is seeded per image, so it does not depend on how images
are grouped either.

Early stopping. With `train.patience = n` and a val set, training stops after n evaluations in a row that do not
improve `best_metric`; best.safetensors holds the best weights, model_final.safetensors the last ones.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cascade_rcnn.config import ModelConfig, config_from_dict, config_to_dict
from cascade_rcnn.errors import CascadeRCNNError, CheckpointError, ConfigError
from cascade_rcnn.evaluation.coco import EvalResult
from cascade_rcnn.modeling.detector import CascadeRCNN, build_model
from cascade_rcnn.training import checkpoint as ckpt
from cascade_rcnn.training.config import (
    ExperimentConfig,
    config_differences,
    experiment_from_dict,
    resolve_model_config,
    resolve_schedule,
)
from cascade_rcnn.training.data import (
    build_batch_sampler,
    build_loader,
    build_train_dataset,
    build_val_set,
    load_split,
    report_problems,
    require_masks,
)
from cascade_rcnn.training.distributed import (
    any_flags,
    barrier,
    init_distributed,
    mean_over_processes,
)
from cascade_rcnn.training.initialization import calibrate_frozen_batchnorm, describe_load, load_initial_weights
from cascade_rcnn.training.recipe import describe_recipe, format_recipe, recipe_json
from cascade_rcnn.training.schedule import build_optimizer, build_scheduler, split_parameters
from cascade_rcnn.training.validation import evaluate
from cascade_rcnn.io.weights import save_weights

# Settings that may change when resuming without changing the trajectory of the run.
RESUMABLE_CHANGES = (
    "weights", "data.num_workers", "train.device", "train.output_dir", "train.log_interval", "train.eval_interval",
    "train.eval_batch_size", "train.keep_checkpoints", "train.max_iters", "train.tensorboard", "train.patience",
)  # fmt: skip


class NonFiniteLossError(CascadeRCNNError):
    """A loss became NaN or infinite; training stopped without writing a checkpoint of the bad state."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM: a resumable checkpoint was written (`path`) and training stopped."""

    def __init__(self, path: Path | None, iteration: int) -> None:
        super().__init__(f"interrupted at iteration {iteration}")
        self.path = path
        self.iteration = iteration


@dataclass
class TrainResult:
    iterations: int
    output_dir: Path
    final_weights: Path | None
    metrics: dict[str, float] | None  # the final evaluation's 12 COCO numbers, when a val set is configured
    best: dict[str, Any] | None
    stopped_early: bool = False  # `train.patience` evaluations in a row without a new best


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Set up a run from an `ExperimentConfig` (or a checkpoint to resume) and train it with `train()`.

    Args:
        exp: the run's config; None with `resume` to take the checkpoint's.
        resume: a training checkpoint, or an output folder whose latest checkpoint continues.
        log: where rank 0's messages go (default: print to stdout).
        progress: show a tqdm progress bar (None: only when stderr is a terminal).
    """

    def __init__(
        self,
        exp: ExperimentConfig | None,
        *,
        resume: str | Path | None = None,
        log: Callable[[str], None] | None = None,
        progress: bool | None = None,
    ) -> None:
        state = None
        output_dir = None
        if resume is not None:
            resume_path = ckpt.resolve_resume(resume)
            state = ckpt.load_training_checkpoint(resume_path)
            exp = self._resumed_config(exp, state, resume_path)
            output_dir = resume_path.parent.parent
        if exp is None:
            raise ConfigError("no training config given (and nothing to resume)")
        self.exp = exp
        t = exp.train
        self.device = resolve_device(t.device)
        self.info = init_distributed(self.device)
        if self.device.type == "cuda" and self.info.enabled:
            self.device = torch.device("cuda", self.info.local_rank)
        self._log = log or (lambda message: print(message, flush=True))
        self.progress = progress
        self.output_dir = Path(output_dir or t.output_dir)
        if t.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp = 'fp16' needs CUDA; use 'bf16' on the CPU")
        seed_everything(t.seed)

        # Data. The model config comes from the training set's classes; it is resolved here, first, so that a preset
        # with mask heads on box-only data stops before anything else is loaded.
        self.train_data = load_split(exp.data, "train")
        self.model_config: ModelConfig = resolve_model_config(
            exp, self.train_data.num_classes, tuple(self.train_data.class_names)
        )
        if self.model_config.has_masks:
            require_masks(self.train_data, exp.data, exp.preset)
        self.val = build_val_set(exp.data) if exp.data.val_images else None
        for split, dataset in (("train", self.train_data), ("val", self.val.dataset if self.val else None)):
            message = report_problems(dataset, split) if dataset is not None else None
            if message:
                self.log(message)
        if self.val is not None and tuple(self.val.dataset.class_names) != tuple(self.train_data.class_names):
            raise ConfigError(
                f"the val set's classes {list(self.val.dataset.class_names)} differ from the training set's "
                f"{list(self.train_data.class_names)}"
            )
        self.train_set = build_train_dataset(self.train_data, exp.data, t.seed, with_masks=self.model_config.has_masks)
        self.sampler = build_batch_sampler(self.train_data, t.batch_size, t.seed, self.info.rank, self.info.world_size)
        self.loader_generator = torch.Generator().manual_seed(t.seed)

        # Model.
        self.model: CascadeRCNN = build_model(self.model_config)
        if state is None:
            self._initialise_weights()
        else:
            self.model.load_state_dict(state["model"])
        self.model.to(self.device).train()
        self.model.channels_last = t.memory_format == "channels_last" or (
            t.memory_format == "auto" and self.device.type == "cpu")  # fmt: skip
        self.model.backbone.fold_norms = t.fold_norms
        self.ddp_model: nn.Module = self.model
        if self.info.enabled:
            # Buffers (frozen batch norm statistics) never change in training: DDP syncs them once, at start, and
            # not before every forward (`broadcast_buffers` became `forward_sync_buffers` in torch 2.14).
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})  # fmt: skip
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_buffer_sync
            )

        # Optimisation. An iteration is one optimiser step: `accumulate` micro-batches of `batch_size` images per
        # process (the last step of an epoch may have fewer micro-batches).
        self.batches_per_epoch = len(self.sampler.epoch_batches())
        self.iters_per_epoch = -(-self.batches_per_epoch // t.accumulate)
        self.schedule = resolve_schedule(t, self.iters_per_epoch, self.info.world_size)
        self.epochs = -(-self.schedule.total_iters // self.iters_per_epoch)
        self.total_iters = self.schedule.total_iters
        if t.max_iters > 0:
            self.total_iters = min(self.total_iters, t.max_iters)
        self.lr = self.schedule.lr
        self.step_iters = list(self.schedule.step_iters)
        self.parameter_groups = split_parameters(self.model)
        self.optimizer = build_optimizer(self.model, self.lr, t.momentum, t.weight_decay, t.weight_decay_norm)
        self.scheduler = build_scheduler(self.optimizer, self.schedule.warmup_iters, t.warmup_factor, self.step_iters,
                                         t.gamma, t.warmup_end)  # fmt: skip
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.amp == "fp16")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.recipe = describe_recipe(exp, self.model_config, self.schedule, self.parameter_groups,
                                      self.info.world_size)  # fmt: skip

        # Position.
        self.iteration = 0
        self.epoch = 0
        self.epoch_iteration = 0
        self.best: dict[str, Any] | None = None
        self.evals_since_best = 0  # evaluations in a row without a new best (for `patience`)
        self.stopped_early = False
        self.last_eval: tuple[int, EvalResult] | None = None  # (iteration, result) of the latest evaluation, rank 0
        self.last_checkpoint: Path | None = None  # rank 0 only
        self.checkpoint_iteration = -1
        self.stop_requested = False
        if state is not None:
            self._restore(state)
            self.last_checkpoint = ckpt.resolve_resume(resume)  # type: ignore[arg-type]
            self.checkpoint_iteration = self.iteration
        self._tensorboard = None
        self._window: dict[str, float] = {}
        self._window_count = 0
        self._window_images = 0
        self._window_start = time.perf_counter()

    # -----------------------------------------------------------------------------------------------------------------
    # Set-up helpers

    @staticmethod
    def _resumed_config(exp: ExperimentConfig | None, state: dict[str, Any], path: Path) -> ExperimentConfig:
        stored = experiment_from_dict(json.loads(state["experiment"]))
        if exp is None:
            return stored
        differences = [
            line for line in config_differences(stored.to_dict(), exp.to_dict())
            if not line.split(":")[0].startswith(RESUMABLE_CHANGES)
        ]  # fmt: skip
        if differences:
            raise ConfigError(
                f"{path}: the config differs from the checkpoint's, so the run would not continue as it started "
                "(resume with --resume alone to use the checkpoint's config):\n  "
                + "\n  ".join(f"{line} (checkpoint != now)" for line in differences)
            )
        return exp

    def _initialise_weights(self) -> None:
        t = self.exp.train
        if self.exp.weights:
            loaded = load_initial_weights(self.model, self.exp.weights)
            summary, listing = describe_load(loaded, self.model, self.exp.weights)
            self.log(summary)
            if self.info.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "weights_load.txt").write_text(listing, encoding="utf-8")
        elif t.scratch_init == "calibrate_bn":
            # The same first images on every process, so that every process computes the same statistics.
            from cascade_rcnn.data.transforms import DetectionTorchDataset

            plain = DetectionTorchDataset(self.train_data, train=False)
            images = [plain[i][0] for i in range(min(t.calibration_images, len(plain)))]
            batch, _ = self.model.transform(images)
            layers = calibrate_frozen_batchnorm(self.model.backbone, batch.tensor)
            self.log(f"from scratch: {layers} frozen batch norms calibrated on {len(images)} training images")

    def _restore(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.info.world_size:
            raise CheckpointError(
                f"the checkpoint was written by {state['world_size']} processes, this run has {self.info.world_size}:"
                " the data order would differ; resume with the same number of processes"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.epoch = int(state["epoch"])
        self.epoch_iteration = int(state["epoch_iteration"])
        self.best = json.loads(state["best"]) if state.get("best") else None
        self.evals_since_best = int(state.get("evals_since_best", 0))
        ckpt.restore_rng_states(state["rng"], self.loader_generator)

    # -----------------------------------------------------------------------------------------------------------------
    # Logging

    def log(self, message: str) -> None:
        if self.info.is_main:
            if self._bar is not None:
                self._bar.write(message, file=sys.stdout)
            else:
                self._log(message)

    _bar: Any = None

    def _write_record(self, record: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            kind = record["type"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "epoch"):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, record["iteration"])

    def _prepare_output(self) -> None:
        if not self.info.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config = {"experiment": self.exp.to_dict(), "model": config_to_dict(self.model_config)}
        (self.output_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (self.output_dir / "recipe.json").write_text(recipe_json(self.recipe), encoding="utf-8")
        metrics = self.output_dir / "metrics.jsonl"
        if metrics.exists():
            # A resumed run redoes the iterations after its checkpoint: drop their records from the killed run.
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= self.iteration]  # fmt: skip
            metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        if self.exp.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.log("train.tensorboard: the tensorboard package is not installed; metrics.jsonl only")
            else:
                self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))

    def describe(self) -> str:
        """What the run is (model, data, device, output) and its effective recipe (`format_recipe`)."""
        t, m = self.exp.train, self.model
        total_params = sum(p.numel() for p in m.parameters())
        trainable = sum(p.numel() for p in self.params)
        lines = [
            f"model: {self.exp.preset} with {self.model_config.num_classes} classes, "
            f"{total_params / 1e6:.1f} M parameters ({trainable / 1e6:.1f} M trained)",
            f"data: {len(self.train_data)} training images"
            + (f", {len(self.val.dataset)} val images" if self.val else ", no val set")
            + f"; {self.batches_per_epoch} batches of {t.batch_size} per process and epoch",
            format_recipe(self.recipe),
            f"device {self.device}; output {self.output_dir}"
            + (f"; early stopping after {t.patience} evaluations without a new best {t.best_metric}"
               if t.patience else ""),  # fmt: skip
        ]
        return "\n".join(lines)

    # -----------------------------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> TrainResult:
        """Run to the end of the schedule (or `max_iters`).

        Raises:
            NonFiniteLossError: a loss became NaN/inf (the message names the iteration and the loss terms).
            TrainingInterrupted: SIGINT/SIGTERM arrived; a resumable checkpoint was written first.
        """
        self._prepare_output()
        self.log(self.describe())
        if self.iteration:
            self.log(f"resumed at iteration {self.iteration} (epoch {self.epoch + 1}, batch {self.epoch_iteration})")
        restore = self._install_signal_handlers()
        try:
            with self._progress_bar():
                self._run()
            return self._finish()
        finally:
            restore()
            if self._tensorboard is not None:
                self._tensorboard.close()

    def _run(self) -> None:
        t = self.exp.train
        k = t.accumulate
        while self.iteration < self.total_iters and not self.stopped_early:
            consumed = self.epoch_iteration * k  # this process's batches of the epoch already trained on
            self.sampler.set_epoch(self.epoch, consumed)
            self.train_set.set_epoch(self.epoch)
            group: list[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]] = []
            for images, targets in build_loader(self.train_set, self.sampler, self.exp.data.num_workers,
                                                self.loader_generator):  # fmt: skip
                group.append((images, targets))
                consumed += 1
                if len(group) < k and consumed < self.batches_per_epoch:
                    continue
                self.accumulated_step(group)
                group = []
                if t.checkpoint_interval > 0 and self.iteration % t.checkpoint_interval == 0:
                    self.save_checkpoint()
                if self.iteration >= self.total_iters:
                    break
            if self.epoch_iteration >= self.iters_per_epoch:
                self.epoch += 1
                self.epoch_iteration = 0
                if t.checkpoint_interval <= 0 and self.iteration < self.total_iters:
                    self.save_checkpoint()
                if t.eval_interval > 0 and self.epoch % t.eval_interval == 0 and self.iteration < self.total_iters:
                    self.run_evaluation()
                    self._check_patience()

    def step(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimisation step on this process's batch; returns the (local) loss values."""
        return self.accumulated_step([(images, targets)])

    def accumulated_step(
        self, batches: list[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]
    ) -> dict[str, float]:
        """One optimisation step on this process's micro-batches (`train.accumulate` of them, fewer at the end of an
        epoch): each one's losses, divided by the number of micro-batches, are backpropagated in turn (see the module
        docstring), then SGD steps once. Returns the (local) loss values, averaged over the micro-batches."""
        t = self.exp.train
        min_size = None
        if self.exp.data.multiscale_short_sides:
            # One short side per step, for all of its micro-batches (as for the one batch they stand for).
            min_size = random.Random(f"{t.seed}:scale:{self.iteration}").choice(self.exp.data.multiscale_short_sides)
        self.optimizer.zero_grad(set_to_none=True)
        values: dict[str, float] = {}
        num_images = 0
        for index, (images, targets) in enumerate(batches):
            images = [image.to(self.device, non_blocking=True) for image in images]
            # `sample_seed` stays on the CPU: the samplers read it as a Python int.
            targets = [{k: v if k == "sample_seed" else v.to(self.device, non_blocking=True) for k, v in target.items()}
                       for target in targets]  # fmt: skip
            # DDP averages gradients over processes once, after the step's last micro-batch.
            last = index == len(batches) - 1
            no_sync = self.ddp_model.no_sync() if self.info.enabled and not last else contextlib.nullcontext()
            with no_sync:
                with self._autocast():
                    losses = self.ddp_model(images, targets, min_size)
                losses = {k: v.float() for k, v in losses.items()}
                micro = {k: v.item() for k, v in losses.items()}
                bad = [k for k, v in micro.items() if not math.isfinite(v)]
                nonfinite, stop = any_flags([bool(bad), self.stop_requested], self.info, self.device)
                if nonfinite:
                    self._stop_nonfinite(bad, micro)
                if stop:
                    # The parameters are still those before this step: the checkpoint resumes at its first batch.
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(path, self.iteration)
                self.scaler.scale(sum(losses.values()) / len(batches)).backward()
            for k, v in micro.items():
                values[k] = values.get(k, 0.0) + v / len(batches)
            num_images += len(images)
        grad_norm = None
        if t.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, t.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.iteration += 1
        self.epoch_iteration += 1
        self._log_step(values, num_images, lr, grad_norm)
        return values

    def _stop_nonfinite(self, bad: list[str], values: dict[str, float]) -> None:
        where = f"iteration {self.iteration + 1} (epoch {self.epoch + 1}, batch {self.epoch_iteration + 1})"
        terms = ", ".join(f"{k} = {values[k]}" for k in bad) if bad else "on another process"
        last = (f"the last good checkpoint is {self.last_checkpoint} (resume with --resume)"
                if self.last_checkpoint else "no checkpoint was written yet")  # fmt: skip
        hint = "lower train.lr, raise train.warmup_iters, or set train.clip_grad_norm"
        raise NonFiniteLossError(f"non-finite loss at {where}: {terms}. Training stopped; {last}. Try: {hint}.")

    # -----------------------------------------------------------------------------------------------------------------
    # Logging during the loop

    def _log_step(self, values: dict[str, float], num_images: int, lr: float, grad_norm: float | None) -> None:
        for k, v in values.items():
            self._window[k] = self._window.get(k, 0.0) + v
        self._window["loss"] = self._window.get("loss", 0.0) + sum(values.values())
        if grad_norm is not None:
            self._window["grad_norm"] = self._window.get("grad_norm", 0.0) + grad_norm
        self._window_count += 1
        self._window_images += num_images
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._postfix(values, lr), refresh=False)
        t = self.exp.train
        if self.iteration % t.log_interval == 0 or self.iteration == self.total_iters:
            means = {k: v / self._window_count for k, v in self._window.items()}
            means = mean_over_processes(means, self.info, self.device)
            elapsed = time.perf_counter() - self._window_start
            throughput = self._window_images * self.info.world_size / max(elapsed, 1e-9)
            seconds_per_iter = elapsed / self._window_count
            record = {"type": "train", "iteration": self.iteration, "epoch": self.epoch + 1, "lr": lr, **means,
                      "images_per_s": throughput,
                      "eta_s": seconds_per_iter * (self.total_iters - self.iteration)}  # fmt: skip
            self._write_record(record)
            if self._bar is None:
                self.log(
                    f"iter {self.iteration}/{self.total_iters} epoch {self.epoch + 1} loss {means['loss']:.4f} "
                    f"lr {lr:.3g} {throughput:.2f} img/s eta {_duration(record['eta_s'])}"
                )
            self._window, self._window_count, self._window_images = {}, 0, 0
            self._window_start = time.perf_counter()

    @staticmethod
    def _postfix(values: dict[str, float], lr: float) -> str:
        short = {"loss_rpn_cls": "rpn_cls", "loss_rpn_box": "rpn_box"}
        parts = [f"loss {sum(values.values()):.3f}"]
        parts += [f"{short.get(k, k.removeprefix('loss_'))} {v:.3f}" for k, v in values.items()]
        return " ".join(parts) + f" lr {lr:.2e}"  # the iteration, rate and ETA are tqdm's own fields

    @contextlib.contextmanager
    def _progress_bar(self):  # type: ignore[no-untyped-def]
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        if not (show and self.info.is_main):
            yield
            return
        from tqdm import tqdm

        # Counted in iterations, shown in images (batch x processes per iteration): the rate is images/s; the ETA
        # is tqdm's, from the recent rate.
        t = self.exp.train
        self._bar = tqdm(total=self.total_iters, initial=self.iteration, unit="img", dynamic_ncols=True,
                         unit_scale=t.batch_size * self.info.world_size * t.accumulate, desc="train")  # fmt: skip
        try:
            yield
        finally:
            self._bar.close()
            self._bar = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        amp = self.exp.train.amp
        if amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpoints, evaluation, end

    def state_dict(self) -> dict[str, Any]:
        """The resumable state, as plain data (see `cascade_rcnn.training.checkpoint`)."""
        return {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "epoch_iteration": self.epoch_iteration,
            "world_size": self.info.world_size,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng_states(self.loader_generator),
            "experiment": json.dumps(self.exp.to_dict()),
            "model_config": json.dumps(config_to_dict(self.model_config)),
            "best": json.dumps(self.best) if self.best else "",
            "evals_since_best": self.evals_since_best,
        }

    def save_checkpoint(self) -> Path | None:
        """Write the training state (rank 0) and prune to the last K; every process waits for it."""
        path = None
        if self.info.is_main:
            path = ckpt.save_atomic(self.state_dict(), ckpt.checkpoint_path(self.output_dir, self.iteration))
            ckpt.prune_checkpoints(self.output_dir, self.exp.train.keep_checkpoints)
            self.last_checkpoint = path
        self.checkpoint_iteration = self.iteration  # on every process: they must agree on when to save
        barrier(self.info)
        return path

    def run_evaluation(self, out_dir: Path | None = None) -> EvalResult | None:
        """Evaluate on the val set (all processes predict, rank 0 scores), log it and keep the best weights."""
        if self.val is None:
            return None
        t = self.exp.train
        result, failed, num_images = evaluate(self.model, self.val, self.info, self.device, t.eval_batch_size, out_dir,
                                  self._autocast())  # fmt: skip
        if result is None:
            barrier(self.info)
            return None
        for message in failed:
            self.log(f"eval: skipped {message}")
        if t.best_metric not in result.metrics:
            raise ConfigError(f"train.best_metric = {t.best_metric!r} is not a COCO metric ({', '.join(result.metrics)})")
        value = result.metrics[t.best_metric]
        improved = self.best is None or value > self.best["value"]
        self.evals_since_best = 0 if improved else self.evals_since_best + 1
        self.last_eval = (self.iteration, result)
        self._write_record({"type": "eval", "iteration": self.iteration, "epoch": self.epoch, **result.metrics,
                            "best": improved})  # fmt: skip
        self.log(f"evaluation at iteration {self.iteration} (epoch {self.epoch}) on {num_images} val images:\n"
                 f"{result.format_table()}")
        if improved:
            self.best = {"metric": t.best_metric, "value": value, "iteration": self.iteration, "epoch": self.epoch}
            save_weights(self.model, self.model_config, self.output_dir / "best.safetensors", self.exp.preset)
            (self.output_dir / "best.json").write_text(json.dumps(self.best, indent=2) + "\n", encoding="utf-8")
            self.log(f"new best {t.best_metric} {value:.4f}: {self.output_dir / 'best.safetensors'}")
        elif self.best is not None:
            self.log(f"{t.best_metric} {value:.4f}, no better than the best {self.best['value']:.4f} (iteration "
                     f"{self.best['iteration']}): {self.evals_since_best} evaluation(s) without a new best")
        barrier(self.info)
        return result

    def _check_patience(self) -> None:
        """Decide (on rank 0, then on every process alike) whether `patience` ends the run."""
        t = self.exp.train
        stop = self.info.is_main and t.patience > 0 and self.evals_since_best >= t.patience
        (self.stopped_early,) = any_flags([stop], self.info, self.device)  # rank 0's decision, on every process
        if self.stopped_early and self.info.is_main:
            self.log(f"early stop at iteration {self.iteration}: {self.evals_since_best} evaluations without a new "
                     f"best {t.best_metric} (train.patience = {t.patience}); best {self.best['value']:.4f} at "
                     f"iteration {self.best['iteration']}: {self.output_dir / 'best.safetensors'}")  # fmt: skip

    def _finish(self) -> TrainResult:
        if self.checkpoint_iteration != self.iteration:
            self.save_checkpoint()
        final = None
        if self.info.is_main:
            final = save_weights(self.model, self.model_config, self.output_dir / "model_final.safetensors",
                                 self.exp.preset)  # fmt: skip
            self.log(f"final weights: {final}")
        if self.stopped_early and self.last_eval is not None and self.last_eval[0] == self.iteration:
            # These weights were just evaluated: write that evaluation's files rather than run it again.
            result: EvalResult | None = self.last_eval[1]
            result.write_files(self.output_dir)  # type: ignore[arg-type]
        elif self.stopped_early and not self.info.is_main:
            result = None
        else:
            result = self.run_evaluation(out_dir=self.output_dir)
        return TrainResult(self.iteration, self.output_dir, final, result.metrics if result else None, self.best,
                           self.stopped_early)  # fmt: skip

    def _install_signal_handlers(self) -> Callable[[], None]:
        """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_requested = True
            for s, handler in previous.items():
                signal.signal(s, handler)
            print(f"\n{signal.Signals(signum).name}: writing a checkpoint after this step, then stopping "
                  "(again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

        for s in previous:
            signal.signal(s, request_stop)

        def restore() -> None:
            for s, handler in previous.items():
                signal.signal(s, handler)

        return restore


def load_model_from_checkpoint(path: str | Path) -> tuple[CascadeRCNN, ModelConfig, str]:
    """The model of a training checkpoint (for exporting its weights): (model, its config, preset name)."""
    state = ckpt.load_training_checkpoint(path)
    model_config = config_from_dict(json.loads(state["model_config"]))
    preset = json.loads(state["experiment"]).get("preset", "")
    model = build_model(model_config)
    model.load_state_dict(state["model"])
    return model, model_config, preset


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
