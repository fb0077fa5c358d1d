"""The detector's parts, one file per step of the detection flow (`detector.py` reads it top to bottom), and
`build_model`, the one place that turns a `ModelConfig` into modules."""

from cascade_rcnn.modeling.detector import CascadeRCNN, build_model, build_transform

__all__ = ["CascadeRCNN", "build_model", "build_transform"]
