"""Cascade R-CNN object detection in plain PyTorch."""

from cascade_rcnn.api import Detector
from cascade_rcnn.config import PRESETS, ModelConfig, cascade_rcnn_r50_fpn, cascade_rcnn_r101_fpn, get_preset
from cascade_rcnn.modeling.detector import CascadeRCNN, build_model
from cascade_rcnn.structures import Detections

__all__ = [
    "PRESETS",
    "CascadeRCNN",
    "Detections",
    "Detector",
    "ModelConfig",
    "build_model",
    "cascade_rcnn_r50_fpn",
    "cascade_rcnn_r101_fpn",
    "get_preset",
]
__version__ = "0.1.0"
