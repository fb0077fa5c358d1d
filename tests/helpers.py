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


def without_packages(packages: tuple[str, ...]) -> str:
    """Python source that, run first in a fresh process, makes every import of `packages` (and their submodules) fail
    as on a machine where they are not installed."""
    return (
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(packages)!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not installed here)')\n"
        "sys.meta_path.insert(0, Absent())\n"
    )
