"""The training-step benchmark behind `cascade-rcnn benchmark --train`: our Cascade R-CNN beside torchvision's Faster
R-CNN R50-FPN, on the CPU, in one run.

A step is what `cascade_rcnn.training.Trainer.step` does: forward in training mode on a batch of real coco128 images
with their real boxes, the sum of the losses, backward, one SGD step (momentum 0.9, weight decay 1e-4, on the
parameters each model trains: ResNet stages 2-4, FPN, RPN and heads for both). Both models get calibrated random
weights (`cascade_rcnn.benchmarks.calibrated_weights`), resize the same images to the same short side / long-side
cap, and sample the same counts (2000 proposals per image in training, 256 anchors and 512 RoIs per image);
torchvision has one box head where the cascade has three. The paths alternate step by step (ours, ours bf16,
torchvision, ...) after one untimed warm-up step each, so that a change of the machine's load falls on all of them.

Reported: seconds per step (mean and median) of each path at each size, the ratio of ours to torchvision's and the
bf16 autocast speed-up (each the median over rounds of the ratio within a round), and the peak resident memory of one
step of each model at the first size, each in a fresh process (its own VmHWM). With `profile`, one profiled fp32 step
of ours and of torchvision's at the first size, split into forward, backward and optimiser, and by operator kind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]


@dataclass
class TrainBenchmarkSettings:
    data_root: Path  # coco128: train2017/, val2017/, annotations/instances_train2017.json
    preset: str = "cascade_rcnn_r50_fpn"
    sizes: tuple[tuple[int, int], ...] = ((800, 1333), (512, 853))  # (short side, long-side cap)
    batch: int = 2
    steps: int = 3  # timed steps per path and size
    threads: int = 2
    bf16: bool = True
    torchvision: bool = True
    memory: bool = True
    profile: bool = False
    seed: int = 0
    lr: float = 0.0025  # mmdetection's 0.02 for 16 images, scaled to 2
    calibration_image: str = "val2017/000000001000.jpg"
    extra_overrides: dict[str, Any] = field(default_factory=dict)  # model config overrides (tests: a cheaper model)


# ---------------------------------------------------------------------------------------------------------------------
# Data and models


def load_batch(data_root: Path, count: int) -> Batch:
    """The first `count` coco128 train images (in file-name order) that have boxes and are landscape (one orientation,
    as the trainer's aspect-ratio grouping batches them), as (3, H, W) RGB 0-255 float tensors and targets with
    `boxes` (xyxy pixels), `labels` (0..79) and `iscrowd`."""
    from cascade_rcnn.data import load_coco, load_image

    dataset = load_coco(data_root / "annotations" / "instances_train2017.json", data_root / "train2017")
    chosen = [r for r in sorted(dataset.records, key=lambda r: r.file_name)
              if len(r.boxes) and (r.width or 0) >= (r.height or 0)][:count]  # fmt: skip
    if len(chosen) < count:
        raise ValueError(f"{data_root}: fewer than {count} landscape training images with boxes")
    images, targets = [], []
    for record in chosen:
        pixels = load_image(dataset.image_root / record.file_name)
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).float())
        targets.append({"boxes": torch.from_numpy(record.boxes.copy()),
                        "labels": torch.from_numpy(record.labels.copy()),
                        "iscrowd": torch.from_numpy(record.iscrowd.copy())})  # fmt: skip
    return images, targets


def build_cascade(preset: str, size: tuple[int, int], overrides: dict[str, Any]) -> nn.Module:
    from cascade_rcnn.config import get_preset
    from cascade_rcnn.modeling.detector import build_model

    config = get_preset(preset, **{"transform.min_size": size[0], "transform.max_size": size[1], **overrides})
    model = build_model(config)
    # As the trainer runs it on the CPU (train.memory_format = "auto", train.fold_norms = true).
    model.channels_last, model.backbone.fold_norms = True, True
    return model


def build_torchvision(size: tuple[int, int]) -> nn.Module:
    """torchvision's Faster R-CNN R50-FPN as its pretrained builder builds it (FrozenBatchNorm2d, ResNet stages 2-4
    trained), with its own training defaults: 2000 proposals per image before and after NMS, 256 anchors and 512 RoIs
    per image."""
    from cascade_rcnn.benchmarks.inference import build_torchvision_reference

    return build_torchvision_reference(size[0], size[1], 1000, 100)


def torchvision_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Our targets for torchvision: labels 1..80 (its background is class 0), crowd boxes left out."""
    return [{"boxes": t["boxes"][~t["iscrowd"]], "labels": t["labels"][~t["iscrowd"]] + 1} for t in targets]


def resized_sizes(model: nn.Module, batch: Batch) -> list[tuple[int, int]]:
    """(h, w) of each image of `batch` after our model's resize (torchvision's resize gives the same sizes)."""
    with torch.no_grad():
        resized, _ = model.transform(list(batch[0]))
    return [tuple(int(v) for v in size) for size in resized.image_sizes]


def sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    from cascade_rcnn.training.schedule import build_optimizer

    return build_optimizer(model, lr, momentum=0.9, weight_decay=1e-4)


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, torchvision: bool,
              bf16: bool = False) -> Callable[[], dict[str, float]]:  # fmt: skip
    """One training step of `model` on `batch`, as a function (returns the loss values)."""
    images, targets = batch
    if torchvision:
        images, targets = [image / 255.0 for image in images], torchvision_targets(targets)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        with torch.profiler.record_function("forward"):
            with autocast:
                losses = model(images, targets)
            losses = {k: v.float() for k, v in losses.items()}
            total = sum(losses.values())
        with torch.profiler.record_function("backward"):
            total.backward()  # type: ignore[union-attr]
        with torch.profiler.record_function("optimizer"):
            optimizer.step()
        return {k: v.item() for k, v in losses.items()}

    return step


def calibrated_models(s: TrainBenchmarkSettings) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """State dicts of our model and torchvision's with calibrated random weights (size-independent)."""
    from cascade_rcnn.data import load_image

    from cascade_rcnn.benchmarks.calibrated_weights import calibrate_cascade, calibrate_torchvision

    image = torch.from_numpy(load_image(s.data_root / s.calibration_image)).permute(2, 0, 1).float()
    ours = build_cascade(s.preset, s.sizes[0], s.extra_overrides)
    calibrate_cascade(ours, image, s.seed)
    theirs = None
    if s.torchvision:
        tv = build_torchvision(s.sizes[0])
        calibrate_torchvision(tv, image, s.seed)
        theirs = tv.state_dict()
    return ours.state_dict(), theirs


# ---------------------------------------------------------------------------------------------------------------------
# Profile


# Operator kinds for the profile's breakdown (by self CPU time), first match wins.
OP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolution", ("conv", "mkldnn_convolution")),
    ("linear (matmul)", ("addmm", "aten::mm", "bmm", "matmul", "linear")),
    ("RoIAlign", ("roi_align", "embedding_bag")),  # ours on the CPU: embedding_bag sums (`roi_align_channels_last`)
    ("NMS", ("nms",)),
    ("batch norm (frozen) and activations", ("relu", "threshold", "batch_norm", "frozen")),
    ("upsample / pooling", ("upsample", "max_pool", "pool")),
    ("loss", ("cross_entropy", "nll", "log_softmax", "smooth_l1", "binary_cross_entropy", "sigmoid")),
    ("box matching / IoU / sampling", ("randperm", "topk", "sort", "nonzero", "index", "gather", "scatter", "where",
                                        "masked", "max", "min", "clamp", "box_iou")),
    ("element-wise / copies", ("add", "mul", "sub", "div", "copy", "fill", "zero", "cat", "clone", "empty", "to",
                               "exp", "log", "sum", "mean", "sqrt", "pow")),
)  # fmt: skip


def profile_step(step: Callable[[], object]) -> dict[str, Any]:
    """One step under torch.profiler: seconds in forward / backward / optimiser, and self CPU seconds by `OP_KINDS`
    and for the ten most expensive operators; and the FLOPs of another step."""
    from torch.profiler import ProfilerActivity, profile

    from cascade_rcnn.benchmarks.inference import count_flops

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in ("forward", "backward", "optimizer")}
    kinds: dict[str, float] = {}
    top = []
    for e in events:
        if e.key in ("forward", "backward", "optimizer") or e.self_cpu_time_total <= 0:
            continue
        name = e.key.lower()
        kind = next((k for k, patterns in OP_KINDS if any(p in name for p in patterns)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        top.append((e.self_cpu_time_total / 1e6, e.key))
    total = sum(kinds.values())
    return {
        # Convolutions and matrix products of forward and backward (FlopCounterMode; 2 FLOPs per multiply-add).
        "gflops_per_step": count_flops(step) / 1e9,
        "phase_seconds": phases,
        "self_seconds_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "self_seconds_total": total,
        "top_ops": [{"op": name, "self_seconds": seconds} for seconds, name in sorted(top, reverse=True)[:10]],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory in a fresh process


def peak_rss_child(kind: str, weights: str, settings: str) -> tuple[float, float]:
    """In a fresh process: build `kind` ("cascade" or "torchvision") from `weights`, run one training step on the
    benchmark batch. Returns its peak resident memory (VmHWM) and its resident memory once imports are done, in MB."""
    from cascade_rcnn.benchmarks.memory import proc_status_mb

    s = json.loads(settings)
    runtime = proc_status_mb("VmRSS")
    torch.set_num_threads(s["threads"])
    size = tuple(s["size"])
    model = build_torchvision(size) if kind == "torchvision" else build_cascade(s["preset"], size, s["overrides"])
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.train()
    batch = load_batch(Path(s["data_root"]), s["batch"])
    make_step(model, sgd(model, s["lr"]), batch, torchvision=kind == "torchvision")()
    return proc_status_mb("VmHWM"), runtime


def measure_peak_rss(kind: str, weights: Path, settings: dict[str, Any]) -> tuple[float, float]:
    from cascade_rcnn.benchmarks.memory import peak_rss_in_child

    call = f"peak_rss_child({kind!r}, {str(weights)!r}, {json.dumps(settings)!r})"
    return peak_rss_in_child("cascade_rcnn.benchmarks.training", call)


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark


def run_train_benchmark(s: TrainBenchmarkSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time the training steps of every path at every size, interleaved, and collect the figures of `report`."""
    from cascade_rcnn.benchmarks.inference import cpu_description

    torch.set_num_threads(s.threads)
    load_start = os.getloadavg()[0]
    batch = load_batch(s.data_root, s.batch)
    log(f"calibrating random weights on {s.calibration_image} ...")
    ours_state, tv_state = calibrated_models(s)
    per_size: dict[str, Any] = {}
    profile = None
    for size in s.sizes:
        label = f"{size[0]}x{size[1]}"
        steps: dict[str, Callable[[], dict[str, float]]] = {}
        models = {}
        for name, bf16 in (("cascade_fp32", False), ("cascade_bf16", True)):
            if bf16 and not s.bf16:
                continue
            model = build_cascade(s.preset, size, s.extra_overrides)
            model.load_state_dict(ours_state)
            models[name] = model.train()
            steps[name] = make_step(model, sgd(model, s.lr), batch, torchvision=False, bf16=bf16)
        if tv_state is not None:
            tv = build_torchvision(size)
            tv.load_state_dict(tv_state)
            models["torchvision_faster_rcnn"] = tv.train()
            steps["torchvision_faster_rcnn"] = make_step(tv, sgd(tv, s.lr), batch, torchvision=True)
        log(f"{label}: warming up ...")
        losses = {name: step() for name, step in steps.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for i in range(s.steps):
            for name, step in steps.items():
                start = time.perf_counter()
                losses[name] = step()
                times[name].append(time.perf_counter() - start)
            log(f"  {label} step {i + 1}/{s.steps}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
        bad = [name for name, values in losses.items() if not all(map(math.isfinite, values.values()))]
        if bad:
            raise RuntimeError(f"non-finite training loss in {bad}: {losses}")
        if s.profile and profile is None:
            log(f"{label}: profiling one step of each fp32 path ...")
            profile = {name: profile_step(steps[name]) for name in ("cascade_fp32", "torchvision_faster_rcnn")
                       if name in steps}  # fmt: skip
        mean = {name: statistics.fmean(t) for name, t in times.items()}

        def paired(a: str, b: str) -> float | None:
            # Each round runs the paths back to back: the median of per-round ratios resists load drifting between
            # rounds on a shared machine better than a ratio of means.
            if a not in times or b not in times:
                return None
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        per_size[label] = {
            "seconds_per_step": mean,
            "median_seconds_per_step": {name: statistics.median(t) for name, t in times.items()},
            "per_step_seconds": times,
            "ratio_vs_torchvision": paired("cascade_fp32", "torchvision_faster_rcnn"),
            "bf16_speedup": paired("cascade_fp32", "cascade_bf16"),
            "image_sizes": [list(hw) for hw in resized_sizes(models["cascade_fp32"], batch)],
            "final_losses": losses,
        }
        del models, steps

    rss: dict[str, float] = {}
    runtime_rss: dict[str, float] = {}
    if s.memory:
        log("measuring peak memory of one step in fresh processes ...")
        child = {"threads": s.threads, "size": list(s.sizes[0]), "preset": s.preset, "overrides": s.extra_overrides,
                 "data_root": str(s.data_root), "batch": s.batch, "lr": s.lr}  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="cascade_rcnn_train_bench_") as tmp:
            for kind, name, state in (("cascade", "cascade_fp32", ours_state),
                                      ("torchvision", "torchvision_faster_rcnn", tv_state)):  # fmt: skip
                if state is None:
                    continue
                path = Path(tmp) / f"{kind}.pt"
                torch.save(state, path)
                rss[name], runtime_rss[name] = measure_peak_rss(kind, path, child)

    first = per_size[f"{s.sizes[0][0]}x{s.sizes[0][1]}"]
    return {
        "train_step_ratio_vs_torchvision": first["ratio_vs_torchvision"],
        "train_bf16_speedup": first["bf16_speedup"],
        "train_peak_rss_mb": rss.get("cascade_fp32"),
        "train_peak_rss_mb_by_path": rss,
        "train_runtime_rss_mb_by_path": runtime_rss,
        "train_step_ratio_vs_torchvision_by_size": {k: v["ratio_vs_torchvision"] for k, v in per_size.items()},
        "train_bf16_speedup_by_size": {k: v["bf16_speedup"] for k, v in per_size.items()},
        "train_by_size": per_size,
        "train_profile": profile,
        "train_settings": {
            "preset": s.preset,
            "sizes": [f"{a}x{b}" for a, b in s.sizes],
            "batch": s.batch,
            "steps": s.steps,
            "threads": s.threads,
            "lr": s.lr,
            "images": "coco128 train2017, first landscape images with boxes",
            "cpu": cpu_description(),
            "torch": torch.__version__,
            # Runnable threads on the machine (1-minute load average) before and after: other work on a shared
            # machine slows every path, not always alike.
            "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "cpu_count": os.cpu_count(),
        },
    }


def report(result: dict[str, Any]) -> str:
    """The training benchmark's figures as text."""
    s = result["train_settings"]

    def fmt(value: float | None, spec: str = ".2f") -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"Training-step CPU benchmark: {s['preset']}, batch {s['batch']} ({s['images']}), {s['threads']} threads, "
        f"{s['steps']} timed steps per path, paths alternating step by step",
        f"CPU: {s['cpu']}; torch {s['torch']}; load average {s['load_average'][0]} -> {s['load_average'][1]} on "
        f"{s['cpu_count']} CPUs",
        "",
        f"{'size':10s} {'path':34s} {'s/step':>8s} {'median':>8s}",
    ]
    labels = {"cascade_fp32": "ours fp32", "cascade_bf16": "ours bf16 autocast",
              "torchvision_faster_rcnn": "torchvision Faster R-CNN fp32"}  # fmt: skip
    for size, figures in result["train_by_size"].items():
        for name, seconds in figures["seconds_per_step"].items():
            lines.append(f"{size:10s} {labels[name]:34s} {seconds:8.3f} "
                         f"{figures['median_seconds_per_step'][name]:8.3f}")  # fmt: skip
    lines.append("")
    for size, figures in result["train_by_size"].items():
        lines.append(f"{size}: ours / torchvision step time {fmt(figures['ratio_vs_torchvision'])} (target <= 1.15); "
                     f"bf16 speed-up {fmt(figures['bf16_speedup'])}x (target >= 1.5 with native bf16)")  # fmt: skip
    if result["train_peak_rss_mb_by_path"]:
        lines.append("peak resident memory, one step at the first size: "
                     + ", ".join(f"{labels[k]} {v:.0f} MB" for k, v in result["train_peak_rss_mb_by_path"].items())
                     + " (of which Python + torch + torchvision: "
                     + ", ".join(f"{v:.0f} MB" for v in result["train_runtime_rss_mb_by_path"].values()) + ")")
    for name, profile in (result.get("train_profile") or {}).items():
        phases = profile["phase_seconds"]
        lines.append(f"profile of one step, {labels[name]} (first size): "
                     + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items())
                     + f"; {profile['gflops_per_step']:.0f} GFLOP (conv + matmul, forward and backward)")
        total = profile["self_seconds_total"]
        lines += [f"  {kind:40s} {seconds:7.2f}s {100 * seconds / total:5.1f}%"
                  for kind, seconds in profile["self_seconds_by_kind"].items()]  # fmt: skip
        lines.append("  top operators: " + "; ".join(f"{t['op']} {t['self_seconds']:.2f}s" for t in profile["top_ops"]))
    return "\n".join(lines)
