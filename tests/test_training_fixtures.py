"""Shared pieces of the training tests (no tests here): a tiny synthetic dataset and a tiny, fast configuration.

The configuration keeps the R-50-FPN preset's structure and makes it cheap through its own fields: 64 px inputs,
narrow bottlenecks, a 64-channel FPN, few proposals and RoIs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL: dict[str, Any] = {
    "transform": {"min_size": 64, "max_size": 64},
    "backbone": {"width_per_group": 16},
    "fpn": {"out_channels": 64},
    "anchors": {"scales": [4.0]},
    "rpn": {"pre_nms_top_n_train": 200, "post_nms_top_n_train": 100, "pre_nms_top_n_test": 100,
            "post_nms_top_n_test": 50, "batch_size_per_image": 64},  # fmt: skip
    "roi_align": {"sampling_ratio": 2},
    "cascade": {"fc_dim": 128, "batch_size_per_image": 32},
}


def make_tiny_data(root: Path, num_train: int = 8, num_val: int = 4) -> dict[str, Path]:
    from cascade_rcnn.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(root, num_train=num_train, num_val=num_val, image_size=(112, 112), seed=3)


def tiny_raw_config(data: dict[str, Path], output_dir: Path, val: bool = False, **train: Any) -> dict[str, Any]:
    """A config mapping for a run of 2 epochs x 4 iterations of 2 images, checkpoints every 2 iterations."""
    raw: dict[str, Any] = {
        "preset": "cascade_rcnn_r50_fpn",
        "model": TINY_MODEL,
        "data": {"train_images": str(data["train_images"]), "train_annotations": str(data["train_annotations"]),
                 "num_workers": 0},  # fmt: skip
        "train": {"schedule": "custom", "epochs": 2, "lr_steps": [2], "batch_size": 2, "lr": 0.005, "clip_grad_norm": 5.0,
                  "scale_lr": False, "warmup_iters": 2, "checkpoint_interval": 2, "log_interval": 1,
                  "calibration_images": 4, "device": "cpu", "output_dir": str(output_dir), **train},  # fmt: skip
    }
    if val:
        raw["data"]["val_images"] = str(data["val_images"])
        raw["data"]["val_annotations"] = str(data["val_annotations"])
    return raw


def write_toml(raw: dict[str, Any], path: Path) -> Path:
    """Write a (flat enough) config mapping as TOML: sections of scalars, lists and inline tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    lines = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for section, body in raw.items():
        if isinstance(body, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cascade_rcnn", *args]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # OpenMP threads that spin while waiting slow a CPU run several-fold when other processes share the cores (as
    # pytest-xdist or a busy CI machine do); sleeping waits cost little on an idle machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
