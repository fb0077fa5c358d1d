"""Weights files: the project's own safetensors format, and loading any supported checkpoint into a model.

A project weights file is a safetensors file whose metadata holds `format: "cascade_rcnn"`, the model config as JSON,
the preset name and the class names, so that the file alone is enough to rebuild the detector. Peer checkpoints
(mmdetection `.pth`, detectron2 `.pkl`, MindSpore `.ckpt`) are recognised by their content
(`sniff_checkpoint_format`) and converted to the project's names by their reader (`convert_peer_checkpoint`). Nothing
is ever unpickled beyond tensors: safetensors, protobuf, or `torch.load(weights_only=True)` and restricted unpicklers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import Tensor, nn

from cascade_rcnn.config import ModelConfig, config_from_dict, config_to_dict, get_preset
from cascade_rcnn.errors import CheckpointError, ConfigError
from cascade_rcnn.io.torch_checkpoint import sniff_checkpoint_format

if TYPE_CHECKING:
    from cascade_rcnn.modeling.detector import CascadeRCNN

FORMAT = "cascade_rcnn"


@dataclass
class Checkpoint:
    """A checkpoint converted to the project's tensor names, with the config it needs."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    preset: str | None = None
    source_format: str = FORMAT
    skipped: list[str] = field(default_factory=list)  # source tensors deliberately left out (e.g. mask branch)


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, names in (
            ("re-initialised (shape differs from the checkpoint)", self.reinitialised),
            ("missing from the checkpoint", self.missing),
            ("unexpected (ignored)", self.unexpected),
            ("skipped (not part of this model)", self.skipped),
        ):
            if names:
                lines.append(f"{title}: {len(names)}")
                lines.extend(f"  {n}" for n in names)
        return "\n".join(lines)


def save_weights(model: nn.Module, config: ModelConfig, path: str | Path, preset: str | None = None) -> Path:
    """Write the model's tensors and its config to a safetensors file (atomically: temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config_to_dict(config)),
        "class_names": json.dumps(list(config.names)),
        "preset": preset or "",
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        # safetensors creates the file owner-only; give it the permissions any new file gets under the user's umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (full disk) leaves no partial file; the previous one stays
    return path


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        # Read into memory of our own, not `load_file`'s copy-on-write map of the file: a model keeps these tensors
        # (`build_loaded_model`), and a mapped file overwritten in place would change or fault under it.
        return load(path.read_bytes()), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def load_checkpoint(path: str | Path, preset: str | None = None) -> Checkpoint:
    """Read any supported weights file and convert it to the project's names.

    The format is recognised from the content, not the extension. `preset` overrides the config a file implies (for a
    project file, its stored config; for peer files, the peer's preset).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    fmt = sniff_checkpoint_format(path)
    if fmt == "safetensors":
        state_dict, metadata = read_safetensors(path)
        if metadata.get("format") == FORMAT:
            config = _stored_config(path, metadata)
            stored_preset = metadata.get("preset") or None
            if preset is not None:
                config = get_preset(preset, num_classes=config.num_classes, class_names=config.class_names)
            return Checkpoint(config, state_dict, preset or stored_preset, FORMAT)
        # A bare safetensors state_dict in the project's names: the preset decides the architecture.
        return Checkpoint(get_preset(preset or "cascade_rcnn_r50_fpn"), state_dict, preset, "safetensors")
    try:
        return convert_peer_checkpoint(path, fmt, preset)
    except CheckpointError as error:
        # Some converter messages name only the tensor or layer; the user needs to know which file it is.
        if str(path) in str(error):
            raise
        raise CheckpointError(f"{path}: {error}") from None


def convert_peer_checkpoint(path: Path, fmt: str, preset: str | None) -> Checkpoint:
    """Read a peer's checkpoint of the sniffed format `fmt` and convert it to the project's names and config.

    'torch': a `torch.save` file (mmdetection's layout, a detectron2 trainer file, or a bare state_dict); 'pickle': a
    detectron2 model-zoo `.pkl`; 'mindspore': a MindSpore `.ckpt`.
    """
    # Imported here, not at the top: each reader imports `Checkpoint` from this module, and a safetensors load needs
    # none of them.
    if fmt == "torch":
        from cascade_rcnn.io.mmdet import convert_torch_checkpoint

        return convert_torch_checkpoint(path, preset)
    if fmt == "pickle":
        from cascade_rcnn.io.detectron2 import convert_detectron2_pkl

        return convert_detectron2_pkl(path, preset)
    if fmt == "mindspore":
        from cascade_rcnn.io.mindspore import convert_mindspore_checkpoint

        return convert_mindspore_checkpoint(path, preset)
    raise CheckpointError(f"{path}: unrecognised weights format ({fmt}); expected safetensors, .pth, .pkl or .ckpt")


def _stored_config(path: Path, metadata: dict[str, str]) -> ModelConfig:
    """The model config a project weights file carries in its metadata; a missing or damaged one names the file."""
    try:
        return config_from_dict(json.loads(metadata["config"]))
    except KeyError:
        raise CheckpointError(f"{path}: the metadata says format {FORMAT!r} but has no 'config' entry") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the metadata's 'config' is not valid JSON ({error})") from None
    except (ConfigError, TypeError, ValueError) as error:  # TypeError: a value of the wrong type met a check
        raise CheckpointError(f"{path}: the metadata's 'config' does not fit this version ({error})") from None


def build_loaded_model(
    config: ModelConfig, state_dict: dict[str, Tensor], skipped: list[str] | None = None
) -> tuple[CascadeRCNN, LoadReport]:
    """The model `config` describes, holding the tensors of the complete checkpoint `state_dict` themselves.

    The model is built on the meta device (no memory, no random initialisation), then takes the checkpoint's tensors
    (`assign`): one copy of the weights in memory instead of two while loading, and a faster load. (Constants of the
    config, such as anchors and pixel statistics, are made on the CPU all the same.) A checkpoint that misses tensors
    or has other shapes is a `CheckpointError`, as with `load_into_model`.
    """
    from cascade_rcnn.modeling.detector import build_model

    with torch.device("meta"):
        model = build_model(config)
    report = load_into_model(model, state_dict, skipped=skipped, assign=True)
    unset = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unset:  # every tensor of the model must come from the checkpoint or the config
        raise CheckpointError(f"no values for {len(unset)} tensors: {', '.join(unset[:10])}")
    return model, report


def load_into_model(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    allow_reinit: bool = False,
    skipped: list[str] | None = None,
    assign: bool = False,
) -> LoadReport:
    """Copy `state_dict` into `model` (with `assign`, hand its tensors over instead) and report what happened to every
    tensor.

    Missing tensors are an error (naming them), unless `allow_reinit`; with `allow_reinit`, tensors whose shape differs
    (a classifier with another class count) keep the model's fresh initialisation and are listed as re-initialised.
    """
    own = model.state_dict()
    report = LoadReport(skipped=list(skipped or []))
    to_load = {}
    for name, tensor in state_dict.items():
        if name not in own:
            report.unexpected.append(name)
        elif tuple(own[name].shape) != tuple(tensor.shape):
            if not allow_reinit:
                raise CheckpointError(
                    f"tensor {name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(own[name].shape)}"
                )
            report.reinitialised.append(name)
        else:
            to_load[name] = tensor.to(own[name].dtype)
            report.loaded.append(name)
    report.missing = [n for n in own if n not in state_dict]
    if report.missing and not allow_reinit:
        raise CheckpointError(f"checkpoint is missing {len(report.missing)} tensors: {', '.join(report.missing[:10])}")
    model.load_state_dict(to_load, strict=False, assign=assign)
    return report
