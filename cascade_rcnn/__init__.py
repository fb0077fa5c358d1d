"""Cascade R-CNN object detection in plain PyTorch.

The names below are imported on first use, so that `import cascade_rcnn.<module>` of a torch-free module (the input
convention `cascade_rcnn.preprocess`, the runtime `cascade_rcnn.deploy.lean`, the data readers) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Detector": "cascade_rcnn.api",
    "PRESETS": "cascade_rcnn.config",
    "ModelConfig": "cascade_rcnn.config",
    "cascade_rcnn_r50_fpn": "cascade_rcnn.config",
    "cascade_rcnn_r101_fpn": "cascade_rcnn.config",
    "get_preset": "cascade_rcnn.config",
    "CascadeRCNN": "cascade_rcnn.modeling.detector",
    "build_model": "cascade_rcnn.modeling.detector",
    "Detections": "cascade_rcnn.structures",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cascade_rcnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups find it without this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
