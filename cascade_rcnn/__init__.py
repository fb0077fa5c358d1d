"""Cascade R-CNN object detection in plain PyTorch.

The names below are imported on first use, so that `import cascade_rcnn.<module>` of a torch-free module (the input
convention `cascade_rcnn.preprocess`, the runtime `cascade_rcnn.deploy.lean`, the data readers) does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__` (PEP 562) for `exports` (name -> module): each name is imported from
    its module on first use and kept in `namespace` (the package's globals), so later lookups skip the hook."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(exports[name]), name)
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__


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

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
