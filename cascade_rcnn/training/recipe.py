"""The effective training recipe of a run, as one record: what the optimiser, the schedule, the data pipeline and the
samplers will actually do, after the recipe, the config file, the overrides, the lr scaling and the model preset have
all been applied. The trainer prints it at the start of a run and writes it to `recipe.json` in the run folder.
"""

from __future__ import annotations

import json
from typing import Any

from cascade_rcnn.config import ModelConfig
from cascade_rcnn.training.config import (
    ExperimentConfig,
    ResolvedSchedule,
    config_differences,
    counts_iterations,
    experiment_from_dict,
    schedule_of,
    total_batch,
)
from cascade_rcnn.training.schedule import ParameterGroups


def describe_recipe(
    exp: ExperimentConfig,
    model_config: ModelConfig,
    schedule: ResolvedSchedule,
    groups: ParameterGroups,
    world_size: int,
) -> dict[str, Any]:
    """The effective recipe as plain data (JSON-serialisable)."""
    t, d = exp.train, exp.data
    tr, rpn, cascade = model_config.transform, model_config.rpn, model_config.cascade
    length, steps = schedule_of(t)
    warmup_full = schedule.warmup_iters - 1 if t.warmup_end == "last_iter" else schedule.warmup_iters
    decay_norm = t.weight_decay if t.weight_decay_norm is None else t.weight_decay_norm
    return {
        "recipe": exp.recipe,
        "changed_from_recipe": changed_from_recipe(exp),
        "optimizer": {
            "type": "SGD",
            "lr": schedule.lr,
            "lr_reference": t.lr,
            "lr_reference_batch": t.lr_reference_batch,
            "scale_lr": t.scale_lr,
            "total_batch": total_batch(t, world_size),
            "batch_per_process": t.batch_size,
            "processes": world_size,
            "accumulate": t.accumulate,
            "momentum": t.momentum,
            "nesterov": False,
            "weight_decay": t.weight_decay,
            "weight_decay_norm": decay_norm,
            "trained_tensors": len(groups.decayed) + len(groups.norm),
            "norm_tensors": len(groups.norm),
            "frozen_tensors": len(groups.frozen),
            "clip_grad_norm": t.clip_grad_norm or None,
        },
        "schedule": {
            "unit": "iteration" if counts_iterations(t) else "epoch",
            "length": length,
            "lr_steps": list(steps),
            "iters_per_epoch": schedule.iters_per_epoch,
            "total_iters": schedule.total_iters,
            "max_iters": t.max_iters or None,
            "lr_step_iters": list(schedule.step_iters),
            "gamma": t.gamma,
            "warmup": {"kind": "linear", "iters": schedule.warmup_iters, "start_factor": t.warmup_factor,
                       "full_lr_at_iter": max(warmup_full, 0)},  # fmt: skip
        },
        "data": {
            "resize": {"rule": tr.resize_rule, "short_side": tr.min_size, "long_side_max": tr.max_size,
                       "method": tr.resize_method},  # fmt: skip
            "multiscale_short_sides": list(d.multiscale_short_sides),
            "flip_prob": d.flip_prob,
            "pad_size_divisor": tr.size_divisible,
            "pad_to": list(tr.pad_to) if tr.pad_to else None,
            "images_without_boxes": "kept as negatives" if d.keep_empty else "left out",
        },
        "sampling": {
            "rpn": {
                "pre_nms_top_n_per_level": rpn.pre_nms_top_n_train,
                "post_nms_top_n_per_image": rpn.post_nms_top_n_train,
                "nms_iou": rpn.nms_thresh,
                "min_size": rpn.min_size,
                "anchors_per_image": rpn.batch_size_per_image,
                "positive_fraction": rpn.positive_fraction,
                "fg_iou": rpn.fg_iou_thresh,
                "bg_iou": rpn.bg_iou_thresh,
            },
            "roi_heads": {
                "rois_per_image": cascade.batch_size_per_image,
                "positive_fraction": cascade.positive_fraction,
                "add_gt_as_proposals": cascade.add_gt_as_proposals,
                "stage_ious": list(cascade.stage_ious),
                "stage_loss_weights": list(cascade.stage_loss_weights),
            },
        },
        "precision": t.amp,
        "seed": t.seed,
    }


def changed_from_recipe(exp: ExperimentConfig) -> list[str]:
    """The data and train settings of `exp` that differ from its named recipe, as "key recipe's -> run's" lines
    (paths and output settings left out)."""
    base = experiment_from_dict({"recipe": exp.recipe}).to_dict()
    ours = exp.to_dict()
    ignored = ("data.train_", "data.val_", "data.names", "data.num_workers", "train.output_dir", "train.device",
               "train.log_interval", "train.tensorboard")  # fmt: skip
    sections = {k: base[k] for k in ("data", "train")}, {k: ours[k] for k in ("data", "train")}
    lines = [line for line in config_differences(*sections) if not line.startswith(ignored)]
    return [line.replace(": ", " ", 1).replace(" != ", " -> ", 1) for line in lines]


def format_recipe(recipe: dict[str, Any]) -> str:
    """The recipe as the lines printed at the start of a run (each within about 120 columns)."""
    o, s, d, r = recipe["optimizer"], recipe["schedule"], recipe["data"], recipe["sampling"]
    w, resize, rpn, heads = s["warmup"], d["resize"], r["rpn"], r["roi_heads"]
    scaling = (f"= {o['lr_reference']:g} per {o['lr_reference_batch']} images scaled linearly to the total batch"
               if o["scale_lr"] else "as given (not scaled)")  # fmt: skip
    if o["weight_decay_norm"] != o["weight_decay"] and o["norm_tensors"]:
        decay = (f"{o['weight_decay']:g} on {o['trained_tensors'] - o['norm_tensors']} trained tensors, "
                 f"{o['weight_decay_norm']:g} on the {o['norm_tensors']} norm-layer ones")  # fmt: skip
    else:
        decay = f"{o['weight_decay']:g} on all {o['trained_tensors']} trained tensors, biases and norm affine included"
    if s["unit"] == "epoch":
        schedule = f"{s['length']} epochs, lr x{s['gamma']:g} after epochs {s['lr_steps']}"
    else:
        schedule = (f"{s['length']} iterations of {o['lr_reference_batch']} images, lr x{s['gamma']:g} after "
                    f"{s['lr_steps']}")  # fmt: skip
    sizes = (f"short side one of {d['multiscale_short_sides']} per step" if d["multiscale_short_sides"]
             else f"short side {resize['short_side']}")  # fmt: skip
    changed = recipe["changed_from_recipe"]
    lines = [
        f"recipe {recipe['recipe']}" + (f", changed: {'; '.join(changed)}" if changed else " (unchanged)"),
        f"  optimizer: SGD, momentum {o['momentum']:g}, lr {o['lr']:g} {scaling}",
        f"  total batch: {o['total_batch']} = {o['batch_per_process']} images x {o['processes']} processes x "
        f"{o['accumulate']} accumulated micro-batches",
        f"  weight decay: {decay} ({o['frozen_tensors']} frozen)"
        + (f"; gradient norm clipped to {o['clip_grad_norm']:g}" if o["clip_grad_norm"] else ""),
        f"  schedule: {schedule}",
        f"  in steps of {o['total_batch']} images: lr steps at iterations {s['lr_step_iters']} of {s['total_iters']} "
        f"({s['iters_per_epoch']} per epoch)" + (f", stopping at {s['max_iters']}" if s["max_iters"] else ""),
        f"  warm-up: linear from {w['start_factor']:g} x lr over {w['iters']} iterations (full lr at iteration "
        f"{w['full_lr_at_iter']})",
        f"  data: resize {resize['rule']}, {sizes}, long side <= {resize['long_side_max']} ({resize['method']})",
        f"        horizontal flip {d['flip_prob']:g}; padding to a multiple of {d['pad_size_divisor']}"
        + (f" (fixed canvas {d['pad_to']})" if d["pad_to"] else "")
        + f"; images without boxes {d['images_without_boxes']}",
        f"  RPN: {rpn['pre_nms_top_n_per_level']} per level before NMS {rpn['nms_iou']:g}, "
        f"{rpn['post_nms_top_n_per_image']} proposals per image; {rpn['anchors_per_image']} anchors sampled per "
        f"image ({rpn['positive_fraction']:g} positive)",
        f"  RoI heads: {heads['rois_per_image']} per image ({heads['positive_fraction']:g} positive"
        + (", ground truth added" if heads["add_gt_as_proposals"] else "")
        + f"), IoU {heads['stage_ious']}, loss weights {heads['stage_loss_weights']}",
        f"  precision: {'fp32' if recipe['precision'] == 'off' else recipe['precision'] + ' autocast'}",
    ]
    return "\n".join(lines)


def recipe_json(recipe: dict[str, Any]) -> str:
    return json.dumps(recipe, indent=2) + "\n"
