"""`cascade-rcnn train`: train or fine-tune a detector, on one process or under torchrun.

    cascade-rcnn train --config run.toml --set train.lr=0.01 --set model.rpn.nms_thresh=0.6
    cascade-rcnn train --train-images coco/train2017 --train-annotations coco/ann/train.json \\
        --val-images coco/val2017 --val-annotations coco/ann/val.json --weights r50.pth --epochs 12 --output-dir run
    cascade-rcnn train --resume run                       # continue the latest checkpoint of run/
    cascade-rcnn train --resume run --export-weights model.safetensors
    cascade-rcnn train --config run.toml --recipe detectron2_1x --accumulate 4
    torchrun --nproc_per_node 4 -m cascade_rcnn train --config run.toml

Settings are layered: the recipe (mmdetection's 1x unless --recipe or `recipe = ...` names another), the config file
(TOML or YAML, see `cascade_rcnn.training.config`), then the flags, then `--set` overrides. The effective recipe is
printed at the start and written to the run folder's recipe.json. Exit status: 0 done, 130 interrupted (a resumable
checkpoint was written), 2 bad input or a non-finite loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cascade_rcnn.errors import ConfigError

HELP = "Train or fine-tune a detector (config file, flags or --set overrides; --resume continues a run)."

# Flag -> config key.
FLAG_KEYS = {
    "train_images": "data.train_images",
    "train_annotations": "data.train_annotations",
    "val_images": "data.val_images",
    "val_annotations": "data.val_annotations",
    "format": "data.format",
    "names": "data.names",
    "workers": "data.num_workers",
    "preset": "preset",
    "recipe": "recipe",
    "accumulate": "train.accumulate",
    "weights": "weights",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "amp": "train.amp",
    "max_iters": "train.max_iters",
    "device": "train.device",
    "output_dir": "train.output_dir",
    "seed": "train.seed",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML or YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. train.lr=0.01 or model.rpn.nms_thresh=0.6 (repeatable)")
    data = parser.add_argument_group("data")
    data.add_argument("--format", choices=("coco", "voc", "yolo", "txt"), help="annotation format (coco)")
    data.add_argument("--train-images", help="training image folder")
    data.add_argument("--train-annotations", help="training annotations (COCO JSON, VOC/YOLO folder, txt file)")
    data.add_argument("--val-images", help="val image folder (evaluated during and after training)")
    data.add_argument("--val-annotations", help="val annotations")
    data.add_argument("--names", help="class-names file (yolo, txt)")
    data.add_argument("--workers", type=int, help="data loader worker processes (2)")
    run = parser.add_argument_group("run")
    run.add_argument("--preset", help="model preset (cascade_rcnn_r50_fpn)")
    run.add_argument("--recipe", help="training recipe the config starts from: mmdet_1x (default), mmdet_20e, "
                                      "detectron2_1x, detectron2_3x")
    run.add_argument("--weights", help="start from these weights: any file the project reads, or a backbone-only "
                                       "torchvision ResNet state_dict")
    run.add_argument("--epochs", type=int, help="epochs (default: the schedule's, 12 for 1x)")
    run.add_argument("--batch-size", type=int, help="images per process and micro-batch (2)")
    run.add_argument("--accumulate", type=int, help="micro-batches per optimiser step (1); the lr scales with "
                                                    "the total batch")
    run.add_argument("--lr", type=float, help="learning rate for 16 images, scaled to the total batch (0.02)")
    run.add_argument("--amp", choices=("off", "bf16", "fp16"), help="mixed precision (off)")
    run.add_argument("--max-iters", type=int, help="stop after this many iterations")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (auto)")
    run.add_argument("--seed", type=int, help="random seed (0)")
    run.add_argument("--output-dir", help="run folder: checkpoints, metrics, weights (work_dirs/cascade_rcnn)")
    run.add_argument("--resume", help="continue from a training checkpoint, or a run folder's latest one")
    run.add_argument("--export-weights", type=Path, metavar="FILE",
                     help="with --resume: write the checkpoint's model as a .safetensors weights file and exit")
    run.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                     help="progress bar (auto: when stderr is a terminal)")


def experiment_from_args(args: argparse.Namespace) -> Any:
    """The ExperimentConfig the arguments describe, or None when only --resume was given (take the checkpoint's)."""
    from cascade_rcnn.training.config import apply_overrides, experiment_from_dict, parse_override, read_config_file

    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items() if getattr(args, name) is not None}
    if args.resume and not (args.config or args.set or flags):
        return None
    raw = read_config_file(args.config) if args.config else {}
    raw = apply_overrides(raw, flags)
    raw = apply_overrides(raw, dict(parse_override(item) for item in args.set))
    return experiment_from_dict(raw)


def run(args: argparse.Namespace) -> int:
    from cascade_rcnn.training.distributed import shutdown_distributed
    from cascade_rcnn.training.trainer import Trainer, TrainingInterrupted

    if args.export_weights is not None:
        return export_weights(args)
    exp = experiment_from_args(args)
    if exp is not None and not args.resume and not exp.data.train_images:
        raise ConfigError("no training data: give --train-images and --train-annotations, or data.* in --config")
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    trainer = Trainer(exp, resume=args.resume, progress=progress)
    try:
        result = trainer.train()
    except TrainingInterrupted as stop:
        if trainer.info.is_main:
            print(f"interrupted at iteration {stop.iteration}: checkpoint {stop.path}\n"
                  f"continue with: cascade-rcnn train --resume {trainer.output_dir}", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        shutdown_distributed(trainer.info)
    if trainer.info.is_main:
        stopped = f" (stopped early: train.patience = {trainer.exp.train.patience})" if result.stopped_early else ""
        print(f"done: {result.iterations} iterations{stopped}; weights {result.final_weights}")
        if result.best:
            print(f"best {result.best['metric']} {result.best['value']:.4f} at iteration {result.best['iteration']}: "
                  f"{result.output_dir / 'best.safetensors'}")  # fmt: skip
    return 0


def export_weights(args: argparse.Namespace) -> int:
    from cascade_rcnn.training.checkpoint import resolve_resume
    from cascade_rcnn.training.trainer import load_model_from_checkpoint
    from cascade_rcnn.io.weights import save_weights

    if not args.resume:
        raise ConfigError("--export-weights needs --resume CHECKPOINT (or a run folder)")
    path = resolve_resume(args.resume)
    model, model_config, preset = load_model_from_checkpoint(path)
    out = save_weights(model, model_config, args.export_weights, preset or None)
    print(f"{path} -> {out}")
    return 0
