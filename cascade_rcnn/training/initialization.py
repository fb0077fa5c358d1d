"""Where a training run's weights start: a weights file (fine-tuning), a backbone-only ImageNet file, or from scratch.

Fine-tuning. `load_initial_weights` reads any weights file the project reads (`cascade_rcnn.io.weights.load_checkpoint`:
the project's safetensors, mmdetection .pth, detectron2 .pkl, MindSpore .ckpt, a known weights name) and copies every
tensor whose name and shape fit. With another class count, only the classifier (`fc_cls`) of each cascade stage, and
the box regressor (`fc_reg`) when regression is class-specific, differ in shape; they keep their fresh initialisation
and are reported as re-initialised. A backbone-only file (a torchvision ImageNet ResNet/ResNeXt state_dict: `conv1.*`,
`bn1.*`, `layer1.0...`, `fc.*`) is recognised by its names and loaded under `backbone.`, with `fc.*` (the ImageNet
classifier) and batch-norm step counters ignored.

From scratch. The backbone's batch norm is frozen (its statistics are buffers that training never updates), and
torchvision's default state for it is the identity (mean 0, variance 1). Without pretrained statistics, activations
then grow through the 50+ layers (C5 values of ~100 on unit-variance input, first losses of ~50). The deliberate
choice here is a data-dependent initialisation, `calibrate_frozen_batchnorm`: one forward pass over a few training
images in which each frozen batch norm, in network order, takes the mean and variance of its own input as its
statistics, so every normalised activation starts at zero mean and unit variance, as with ImageNet statistics. The
statistics then stay frozen, exactly as pretrained ones would.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.weights import LoadReport, load_checkpoint, load_into_model

# Tensors that may differ in shape when only the class count differs.
CLASS_DEPENDENT_SUFFIXES = (".fc_cls.weight", ".fc_cls.bias", ".fc_reg.weight", ".fc_reg.bias")


@dataclass
class InitialWeights:
    """What `load_initial_weights` did: the per-tensor report, the file's format, and the shape of every tensor of
    the file that has a name in this model (to show what a re-initialised tensor was)."""

    report: LoadReport
    source: str
    file_shapes: dict[str, tuple[int, ...]]

    def file_num_classes(self) -> int | None:
        """The file's class count, from its first stage's classifier (which has a background column), if any."""
        shape = self.file_shapes.get("roi_heads.box_heads.0.fc_cls.weight")
        return shape[0] - 1 if shape else None


def load_initial_weights(model: nn.Module, weights: str | Path) -> InitialWeights:
    """Copy a weights file into `model` for fine-tuning; returns what happened to every tensor (`InitialWeights`).

    Raises:
        CheckpointError: the file cannot be read, or nothing of it fits the model.
    """
    from cascade_rcnn.api import resolve_weights

    path = resolve_weights(weights)
    backbone_only = read_backbone_only(path)
    if backbone_only is not None:
        state_dict, ignored = backbone_only
        report = load_into_model(model, state_dict, allow_reinit=True)
        report.unexpected += ignored
        source = "backbone-only (torchvision ResNet names)"
    else:
        checkpoint = load_checkpoint(path)
        state_dict = checkpoint.state_dict
        report = load_into_model(model, state_dict, allow_reinit=True, skipped=checkpoint.skipped)
        source = checkpoint.source_format
    if not report.loaded:
        raise CheckpointError(f"{path}: no tensor of this file fits the model (names or shapes all differ)")
    return InitialWeights(report, source, {name: tuple(t.shape) for name, t in state_dict.items()})


def read_backbone_only(path: Path) -> tuple[dict[str, Tensor], list[str]] | None:
    """A torchvision-named backbone state_dict renamed under `backbone.`, and the names ignored (`fc.*`,
    `*.num_batches_tracked`); None when the file is not one (it has `backbone.` names, or no `layer1.0` block)."""
    from cascade_rcnn.io.torch_checkpoint import read_torch_checkpoint, sniff_checkpoint_format
    from cascade_rcnn.io.weights import read_safetensors

    fmt = sniff_checkpoint_format(path)
    if fmt == "safetensors":
        tensors, _ = read_safetensors(path)
    elif fmt == "torch":
        tensors, _ = read_torch_checkpoint(path)
    else:
        return None
    names = set(tensors)
    if not {"conv1.weight", "layer1.0.conv1.weight"} <= names or any(n.startswith("backbone.") for n in names):
        return None
    state_dict, ignored = {}, []
    for name, tensor in tensors.items():
        if name.startswith("fc.") or name.endswith(".num_batches_tracked"):
            ignored.append(name)
        else:
            state_dict[f"backbone.{name}"] = tensor
    return state_dict, ignored


def describe_load(loaded: InitialWeights, model: nn.Module, path: str | Path) -> tuple[str, str]:
    """(console summary, full listing) of what happened to every tensor when loading `path` into `model`.

    Every tensor of the model is in exactly one of: kept (copied from the file), re-initialised (the file's tensor
    has another shape, e.g. a classifier for another class count: the model's fresh initialisation is kept), or not
    in the file (left at its initialisation); every tensor of the file that is not kept is listed as dropped. The
    summary counts the kept tensors by module and names all the others; the listing also names every kept tensor
    (the trainer writes it to `weights_load.txt`).
    """
    report = loaded.report
    own = model.state_dict()
    groups = Counter(name.split(".")[0] for name in report.loaded)
    file_classes = loaded.file_num_classes()
    own_head = own.get("roi_heads.box_heads.0.fc_cls.weight")
    model_classes = own_head.shape[0] - 1 if own_head is not None else None
    classes = ""
    if file_classes is not None and model_classes is not None:
        classes = (f"; {file_classes} classes in the file, {model_classes} in this model"
                   if file_classes != model_classes else f"; {model_classes} classes, as in this model")  # fmt: skip
    lines = [f"weights {path} ({loaded.source}{classes}):",
             f"  kept {len(report.loaded)} tensors (copied from the file): "
             + ", ".join(f"{g} {n}" for g, n in groups.items())]  # fmt: skip
    if report.reinitialised:
        lines.append(f"  re-initialised {len(report.reinitialised)} tensors (shape differs from the file; fresh "
                     "initialisation kept):")  # fmt: skip
        lines += [f"    {n}: file {loaded.file_shapes.get(n)} -> model {tuple(own[n].shape)}"
                  for n in report.reinitialised]  # fmt: skip
    dropped = report.unexpected + report.skipped
    lines.append(f"  dropped {len(dropped)} tensors of the file (not part of this model)" + (":" if dropped else ""))
    lines += [f"    {n}" for n in dropped]
    if report.missing:
        lines.append(f"  not in the file, left at their initialisation ({len(report.missing)}):")
        lines += [f"    {n}" for n in report.missing]
    other = [n for n in report.reinitialised if not n.endswith(CLASS_DEPENDENT_SUFFIXES)]
    if other:
        lines.append(
            f"  warning: {len(other)} re-initialised tensors are not class-dependent layers: the file's architecture "
            "differs from the model's (check the preset)"
        )
    summary = "\n".join(lines)
    listing = summary + "\n  kept:\n" + "\n".join(f"    {n}" for n in report.loaded) + "\n"
    return summary, listing


@torch.no_grad()
def calibrate_frozen_batchnorm(backbone: nn.Module, images: Tensor, min_var: float = 1e-5) -> int:
    """Set every `FrozenBatchNorm2d` of `backbone` to normalise its own input over `images`.

    Args:
        backbone: a module whose forward takes `images` and holds frozen batch norms (weight 1, bias 0 kept).
        images: (B, 3, H, W) normalised input batch.
        min_var: floor of the variance, so that a (near-)constant channel is not amplified.

    Each layer is calibrated in a forward pre-hook, so it already sees the calibrated output of the layers before it.
    Returns the number of layers set.
    """
    layers = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]

    def set_statistics(module: FrozenBatchNorm2d, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].double()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).clamp_min(min_var))

    hooks = [m.register_forward_pre_hook(set_statistics) for m in layers]
    try:
        backbone(images)
    finally:
        for hook in hooks:
            hook.remove()
    return len(layers)
