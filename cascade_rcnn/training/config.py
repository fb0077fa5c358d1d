"""Training configuration: frozen dataclasses for the data and the loop, read from TOML/YAML, with dotted overrides.

A run is an `ExperimentConfig`. Its file form (TOML shown; YAML has the same keys)::

    preset = "cascade_rcnn_r50_fpn"      # the model preset
    recipe = "mmdet_1x"                  # the training recipe the sections below start from (RECIPES)
    weights = "mmdet_cascade_r50.pth"    # optional: fine-tune from any weights file the project reads

    [model]                              # overrides of the preset's ModelConfig, any field, nested as in it
    transform = { min_size = 512, max_size = 853 }

    [data]                               # DataConfig
    format = "coco"
    train_images = "coco/train2017"
    train_annotations = "coco/annotations/instances_train2017.json"

    [train]                              # TrainConfig
    schedule = "1x"
    batch_size = 2

Unknown keys anywhere are a `ConfigError` naming the key. `--set train.lr=0.01` style overrides address the same
keys (`apply_overrides`). The class count and names always come from the training set (`resolve_model_config`).

Recipes. The defaults of `DataConfig` and `TrainConfig` are mmdetection's `cascade-rcnn_r50_fpn_1x_coco.py` recipe
(recipe "mmdet_1x"): SGD lr 0.02 for a total batch of 16, momentum 0.9, weight decay 1e-4 on every trained parameter
(biases and norm affine included: the config has no paramwise_cfg), LinearLR warm-up from 0.001 x lr over
iterations 0..499, lr x 0.1 after epochs 8 and 11 of 12, horizontal flip 0.5; the resize (1333, 800) keep-ratio,
the /32 padding and the proposal and sampling counts are the model preset's. A named recipe (`RECIPES`) is a mapping
of section values that the config file and the overrides are layered on: "detectron2_1x" / "detectron2_3x" are
detectron2's Base-RCNN-FPN schedules (iteration-based, no weight decay on norm parameters, warm-up 1000 iterations
reaching the lr at iteration 1000, multi-scale short sides 640..800).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cascade_rcnn.config import ModelConfig, config_from_dict, get_preset, with_overrides
from cascade_rcnn.errors import ConfigError

# The 12 COCO metrics (as cascade_rcnn.evaluation.coco.METRIC_NAMES; repeated so that reading a config imports no
# pycocotools).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Named epoch schedules: (epochs, epochs after which the lr is multiplied by gamma), as mmdetection's MultiStepLR.
SCHEDULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "1x": (12, (8, 11)),
    "2x": (24, (16, 22)),
    "20e": (20, (16, 19)),
}
# Named iteration schedules: (iterations, iterations after which lr *= gamma) at a total batch of
# `lr_reference_batch` images, as detectron2's SOLVER.MAX_ITER / SOLVER.STEPS (Base-RCNN-FPN 1x, and its 3x).
ITERATION_SCHEDULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "90k": (90000, (60000, 80000)),
    "270k": (270000, (210000, 250000)),
}

# detectron2's Base-RCNN-FPN recipe (configs/Base-RCNN-FPN.yaml over detectron2/config/defaults.py): SOLVER.BASE_LR
# 0.02 at IMS_PER_BATCH 16, MOMENTUM 0.9, WEIGHT_DECAY 1e-4 (biases too: WEIGHT_DECAY_BIAS defaults to it),
# WEIGHT_DECAY_NORM 0.0, WARMUP_FACTOR 1/1000 over WARMUP_ITERS 1000 (linear, the lr reached at iteration 1000),
# GAMMA 0.1, no gradient clipping, INPUT.MIN_SIZE_TRAIN (640..800 step 32, "choice"), RANDOM_FLIP horizontal (0.5).
_DETECTRON2_BASE: dict[str, Any] = {
    "data": {"multiscale_short_sides": [640, 672, 704, 736, 768, 800], "flip_prob": 0.5},
    "train": {"lr": 0.02, "lr_reference_batch": 16, "momentum": 0.9, "weight_decay": 1e-4, "weight_decay_norm": 0.0,
              "warmup_iters": 1000, "warmup_factor": 0.001, "warmup_end": "after", "gamma": 0.1},  # fmt: skip
}

# Named recipes: section values a config starts from (the file and the overrides are layered on top).
RECIPES: dict[str, dict[str, Any]] = {
    # The dataclass defaults are mmdetection's cascade-rcnn_r50_fpn_1x_coco.py.
    "mmdet_1x": {},
    "mmdet_20e": {"train": {"schedule": "20e"}},
    "detectron2_1x": {"data": _DETECTRON2_BASE["data"], "train": {**_DETECTRON2_BASE["train"], "schedule": "90k"}},
    "detectron2_3x": {"data": _DETECTRON2_BASE["data"], "train": {**_DETECTRON2_BASE["train"], "schedule": "270k"}},
}


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is read (`cascade_rcnn.data.load_dataset`) and augmented."""

    format: Literal["coco", "voc", "yolo", "txt"] = "coco"
    train_images: str = ""
    train_annotations: str = ""  # COCO JSON, VOC Annotations folder, YOLO label folder or txt file
    val_images: str = ""  # empty: no evaluation during training
    val_annotations: str = ""
    names: str = ""  # class-names file (yolo, txt; optional for voc)
    train_split: str = ""  # VOC ImageSets/Main/<split>.txt files
    val_split: str = ""
    keep_empty: bool = True  # images without boxes train as negatives
    on_error: Literal["raise", "skip"] = "raise"  # dataset problems: stop, or leave the bad entries out and report
    flip_prob: float = 0.5
    # Multi-scale training: each iteration resizes its batch to one of these short sides (the model's max_size kept).
    multiscale_short_sides: tuple[int, ...] = ()
    num_workers: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """The loop: optimiser, schedule, precision, checkpoints, evaluation and logging."""

    # A named epoch schedule (SCHEDULES) or iteration schedule (ITERATION_SCHEDULES), or "custom" (give `epochs` and
    # `lr_steps`, or `iterations` and `lr_step_iters`).
    schedule: Literal["1x", "2x", "20e", "90k", "270k", "custom"] = "1x"
    epochs: int = 0  # 0: the schedule's
    lr_steps: tuple[int, ...] = ()  # epochs after which lr *= gamma; empty: the schedule's
    # An iteration schedule, counted in steps of `lr_reference_batch` images: with `scale_lr`, these counts and the
    # warm-up scale inversely with the actual total batch (detectron2's auto_scale_workers).
    iterations: int = 0  # 0: the schedule's
    lr_step_iters: tuple[int, ...] = ()  # iterations after which lr *= gamma; empty: the schedule's
    gamma: float = 0.1
    # Learning rate for a total batch of `lr_reference_batch` images; with `scale_lr` it is scaled linearly to the
    # actual total batch (batch_size x processes), as mmdetection's auto_scale_lr (0.02 at 16 images).
    lr: float = 0.02
    lr_reference_batch: int = 16
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4  # on every trained parameter, biases and norm affine included (mmdetection)
    weight_decay_norm: float | None = None  # norm layers' affine parameters; None: weight_decay (detectron2: 0.0)
    warmup_iters: int = 500  # linear warm-up from warmup_factor * lr to lr
    warmup_factor: float = 0.001
    # When the warm-up reaches the full lr: "last_iter", at iteration warmup_iters - 1 (mmengine's LinearLR(end=500)
    # steps over iterations 0..499), or "after", at iteration warmup_iters (detectron2's WarmupParamScheduler).
    warmup_end: Literal["last_iter", "after"] = "last_iter"
    batch_size: int = 2  # images per process and micro-batch
    # Gradient accumulation: each optimiser step averages the losses of this many micro-batches (total batch =
    # batch_size x processes x accumulate; the lr scales with it).
    accumulate: int = 1
    max_iters: int = 0  # > 0: stop after this many iterations (the schedule still follows `epochs`)
    clip_grad_norm: float = 0.0  # > 0: clip the global gradient L2 norm to this
    amp: Literal["off", "bf16", "fp16"] = "off"  # bf16 on CPU or CUDA; fp16 (with loss scaling) on CUDA only
    # Layout of the training forward's maps: "auto" is channels-last (NHWC) on the CPU, where oneDNN runs the step in
    # about 0.77x the time of NCHW, and the default (NCHW) elsewhere. Only float rounding differs.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    # Each frozen batch norm folded into the convolution before it, in the training forward (one pass over each map
    # instead of two; about 0.93x the step time on the CPU). Only float rounding differs.
    fold_norms: bool = True
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    output_dir: str = "work_dirs/cascade_rcnn"
    checkpoint_interval: int = 0  # iterations between checkpoints; 0: one at the end of each epoch
    keep_checkpoints: int = 3  # the last K training checkpoints are kept
    eval_interval: int = 1  # epochs between evaluations on the val set (and after the last); 0: only after the last
    eval_batch_size: int = 2
    best_metric: str = "AP"  # the COCO metric that picks best.safetensors
    patience: int = 0  # > 0: stop after this many evaluations in a row without a new best `best_metric`
    log_interval: int = 20  # iterations between metrics.jsonl records
    # Initialisation when no --weights are given: "calibrate_bn" sets the frozen batch-norm statistics from the first
    # training images (see cascade_rcnn.training.initialization); "none" keeps torchvision's init.
    scratch_init: Literal["calibrate_bn", "none"] = "calibrate_bn"
    calibration_images: int = 8
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a training run needs. `model` holds overrides of the preset (a nested mapping)."""

    preset: str = "cascade_rcnn_r50_fpn"
    recipe: str = "mmdet_1x"
    weights: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that `experiment_from_dict` turns back into an equal config."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


SECTIONS = {"data": DataConfig, "train": TrainConfig}
TOP_LEVEL = ("preset", "recipe", "weights", "model", "data", "train")


def experiment_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and check an `ExperimentConfig` from a plain mapping (a config file's content after overrides).

    Raises:
        ConfigError: an unknown key (named with its section), a value of the wrong kind, or an invalid setting.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a training config is a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown config key {key!r} (top-level keys: {', '.join(TOP_LEVEL)})")
    recipe = raw.get("recipe", ExperimentConfig.recipe)
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    raw = merge_mappings(RECIPES[recipe], raw)
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name, {})
        try:
            sections[name] = config_from_dict(value, cls)
        except ConfigError as error:
            raise ConfigError(f"[{name}] {error}") from None
        except TypeError as error:  # a section given as a scalar, or a field given a mapping
            raise ConfigError(f"[{name}] {error}") from None
    model = raw.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"[model] must be a mapping of ModelConfig overrides, got {type(model).__name__}")
    preset = raw.get("preset", ExperimentConfig.preset)
    weights = raw.get("weights", "") or ""
    if not isinstance(preset, str) or not isinstance(weights, str):
        raise ConfigError("'preset' and 'weights' must be strings")
    exp = ExperimentConfig(preset=preset, recipe=recipe, weights=weights, model=_tuples(model), **sections)
    check_experiment(exp)
    return exp


def check_experiment(exp: ExperimentConfig) -> None:
    """Reject settings that cannot work, naming the key."""
    t, d = exp.train, exp.data
    # Unknown model keys and bad values, with a stand-in class count (the real one comes from the data).
    num_classes = exp.model.get("num_classes", 1)
    resolve_model_config(exp, num_classes=num_classes if isinstance(num_classes, int) else 1, class_names=None)
    names = (*SCHEDULES, *ITERATION_SCHEDULES, "custom")
    if t.schedule not in names:
        raise ConfigError(f"train.schedule must be one of {', '.join(names)}, got {t.schedule!r}")
    if t.schedule == "custom" and (t.epochs > 0) == (t.iterations > 0):
        raise ConfigError("train.schedule = 'custom' needs either train.epochs > 0 (with train.lr_steps) or "
                          "train.iterations > 0 (with train.lr_step_iters)")  # fmt: skip
    if t.epochs > 0 and t.iterations > 0:
        raise ConfigError("give train.epochs or train.iterations, not both")
    if t.schedule in SCHEDULES and (t.iterations or t.lr_step_iters):
        raise ConfigError(f"train.schedule = {t.schedule!r} counts epochs: use train.epochs and train.lr_steps "
                          "(or schedule = 'custom' with train.iterations)")  # fmt: skip
    if t.schedule in ITERATION_SCHEDULES and (t.epochs or t.lr_steps):
        raise ConfigError(f"train.schedule = {t.schedule!r} counts iterations: use train.iterations and "
                          "train.lr_step_iters")  # fmt: skip
    positive = {"train.batch_size": t.batch_size, "train.lr_reference_batch": t.lr_reference_batch,
                "train.keep_checkpoints": t.keep_checkpoints, "train.eval_batch_size": t.eval_batch_size,
                "train.log_interval": t.log_interval, "train.accumulate": t.accumulate}  # fmt: skip
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    for key, value in {"train.lr": t.lr, "train.warmup_factor": t.warmup_factor, "train.gamma": t.gamma}.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key} must be a positive number, got {value!r}")
    if t.amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be 'off', 'bf16' or 'fp16', got {t.amp!r}")
    if t.memory_format not in ("auto", "channels_last", "contiguous"):
        raise ConfigError(f"train.memory_format must be 'auto', 'channels_last' or 'contiguous', got {t.memory_format!r}")
    if t.scratch_init not in ("calibrate_bn", "none"):
        raise ConfigError(f"train.scratch_init must be 'calibrate_bn' or 'none', got {t.scratch_init!r}")
    if any(not isinstance(s, int) or s < 1 for s in t.lr_steps):
        raise ConfigError(f"train.lr_steps must be positive epoch numbers, got {t.lr_steps!r}")
    if any(not isinstance(s, int) or s < 1 for s in t.lr_step_iters):
        raise ConfigError(f"train.lr_step_iters must be positive iteration numbers, got {t.lr_step_iters!r}")
    for key, value in {"train.weight_decay": t.weight_decay, "train.weight_decay_norm": t.weight_decay_norm}.items():
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ConfigError(f"{key} must be a number >= 0, got {value!r}")
    if t.warmup_iters < 0:
        raise ConfigError(f"train.warmup_iters must be >= 0, got {t.warmup_iters}")
    if t.patience < 0:
        raise ConfigError(f"train.patience must be >= 0, got {t.patience}")
    if t.patience > 0 and not d.val_images:
        raise ConfigError("train.patience needs a val set (data.val_images and data.val_annotations)")
    if not 0.0 <= d.flip_prob <= 1.0:
        raise ConfigError(f"data.flip_prob must be in [0, 1], got {d.flip_prob}")
    if d.format not in ("coco", "voc", "yolo", "txt"):
        raise ConfigError(f"data.format must be coco, voc, yolo or txt, got {d.format!r}")
    if t.best_metric not in METRIC_NAMES:
        raise ConfigError(f"train.best_metric must be one of {', '.join(METRIC_NAMES)}, got {t.best_metric!r}")
    if bool(d.val_images) != bool(d.val_annotations):
        raise ConfigError("data.val_images and data.val_annotations go together: give both or neither")


def counts_iterations(train: TrainConfig) -> bool:
    """Whether the schedule is counted in iterations (detectron2) rather than epochs (mmdetection)."""
    return train.schedule in ITERATION_SCHEDULES or (train.schedule == "custom" and train.iterations > 0)


def schedule_of(train: TrainConfig) -> tuple[int, tuple[int, ...]]:
    """(length, lr steps) of a TrainConfig, in epochs or, when `counts_iterations`, in reference-batch iterations:
    its own values where set, else its named schedule's."""
    if counts_iterations(train):
        iterations, steps = ITERATION_SCHEDULES.get(train.schedule, (train.iterations, train.lr_step_iters))
        return train.iterations or iterations, train.lr_step_iters or steps
    epochs, steps = SCHEDULES.get(train.schedule, (train.epochs, train.lr_steps))
    return train.epochs or epochs, train.lr_steps or steps


def total_batch(train: TrainConfig, world_size: int) -> int:
    """Images per optimiser step: batch_size x processes x accumulate."""
    return train.batch_size * world_size * train.accumulate


def scaled_lr(train: TrainConfig, world_size: int) -> float:
    """The learning rate actually used: `lr` scaled by total batch / `lr_reference_batch` when `scale_lr`."""
    if not train.scale_lr:
        return train.lr
    return train.lr * total_batch(train, world_size) / train.lr_reference_batch


@dataclass(frozen=True)
class ResolvedSchedule:
    """The schedule of a run in optimiser steps: what the loop and the lr scheduler use."""

    total_iters: int  # the schedule's length (before any max_iters cut)
    step_iters: tuple[int, ...]  # iterations at which lr *= gamma
    warmup_iters: int
    lr: float  # the base lr after scaling
    iters_per_epoch: int


def resolve_schedule(train: TrainConfig, iters_per_epoch: int, world_size: int) -> ResolvedSchedule:
    """Epoch schedules become iterations through `iters_per_epoch` (mmdetection's by-epoch MultiStepLR; the warm-up
    stays as given, as mmdetection's auto_scale_lr scales the lr only). Iteration schedules are in steps of
    `lr_reference_batch` images: with `scale_lr` their length, lr steps and warm-up are multiplied by
    lr_reference_batch / total batch and rounded, as detectron2's `DefaultTrainer.auto_scale_workers`."""
    length, steps = schedule_of(train)
    warmup = train.warmup_iters
    if counts_iterations(train):
        if train.scale_lr:
            factor = train.lr_reference_batch / total_batch(train, world_size)
            length, warmup = int(round(length * factor)), int(round(warmup * factor))
            steps = tuple(int(round(s * factor)) for s in steps)
        total, step_iters = length, tuple(steps)
    else:
        total, step_iters = length * iters_per_epoch, tuple(e * iters_per_epoch for e in steps)
    return ResolvedSchedule(max(total, 1), step_iters, warmup, scaled_lr(train, world_size), iters_per_epoch)


def resolve_model_config(exp: ExperimentConfig, num_classes: int, class_names: tuple[str, ...] | None) -> ModelConfig:
    """The preset with the `[model]` overrides and the training set's classes.

    Raises:
        ConfigError: an unknown preset or model key, or a `[model]` class count that contradicts the data.
    """
    overrides = dict(exp.model)
    given = overrides.pop("num_classes", None)
    if given is not None and given != num_classes:
        raise ConfigError(f"model.num_classes = {given} but the training set has {num_classes} classes")
    overrides.pop("class_names", None)
    cfg = get_preset(exp.preset, num_classes=num_classes, class_names=class_names)
    return with_overrides(cfg, overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Files and overrides


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a TOML (.toml) or YAML (.yaml / .yml) file.

    Raises:
        ConfigError: the file is missing, cannot be parsed (with the parser's message), or is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML ({error})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML ({error})") from None
        data = {} if data is None else data
    else:
        raise ConfigError(f"{path}: a config file must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`"train.lr=0.01"` -> ("train.lr", 0.01). Values are JSON when they parse as JSON (numbers, true/false, null,
    lists), else YAML scalars, else the plain string.

    Raises:
        ConfigError: no `=`, or an empty key.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.lr=0.01)")
    return key, parse_value(value.strip())


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None and text else value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with dotted keys set (`{"train.lr": 0.01}`), creating sections as needed. Keys are checked
    when the result is built (`experiment_from_dict`), so a misspelt key is reported there by name."""
    result = json.loads(json.dumps(raw))  # deep copy of plain data
    for key, value in overrides.items():
        parts = key.split(".")
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def load_experiment(
    config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """An ExperimentConfig from an optional file plus dotted overrides (later ones win)."""
    raw = read_config_file(config_file) if config_file else {}
    return experiment_from_dict(apply_overrides(raw, overrides or {}))


def merge_mappings(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` with `top` layered on it: nested mappings merge key by key, any other value of `top` replaces."""
    result = json.loads(json.dumps(base))
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_mappings(result[key], value)
        else:
            result[key] = value
    return result


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain nested mappings, as "key: a != b" lines."""
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            lines += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            lines.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return lines


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
