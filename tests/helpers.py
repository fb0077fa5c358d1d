"""Shared test helpers: tiny configs and the location of the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cascade_rcnn.config import ModelConfig, get_preset

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CASCADE_RCNN_SHARED", REPO.parent / "shared"))
COCO128 = Path(os.environ.get("CASCADE_RCNN_COCO128", SHARED / "data" / "coco128"))


def require_coco128() -> Path:
    if not (COCO128 / "val2017").is_dir():
        pytest.skip(f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128)")
    return COCO128


def tiny_config(num_classes: int = 3, **overrides) -> ModelConfig:
    """The R50 architecture on small inputs with few proposals: fast enough for unit tests on 2 CPU cores."""
    settings = {
        "transform.min_size": 128,
        "transform.max_size": 192,
        "rpn.pre_nms_top_n_train": 200,
        "rpn.post_nms_top_n_train": 100,
        "rpn.pre_nms_top_n_test": 200,
        "rpn.post_nms_top_n_test": 100,
        "cascade.batch_size_per_image": 64,
    }
    settings.update(overrides)
    return get_preset("cascade_rcnn_r50_fpn", num_classes=num_classes, **settings)
