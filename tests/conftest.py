"""Shared fixtures: where the shared reference data lives, and reference checkpoints rebuilt once per session.

The shared folder is `../shared` next to the repository (override with CASCADE_RCNN_SHARED); tests that need it skip
with the path they looked at. Rebuilt reference checkpoints are cached under $CASCADE_RCNN_CACHE/reference (default
~/.cache/cascade_rcnn/reference), keyed by the recipe's state_dict sha256, so a session rebuilds one only when the
recipe changes or the cache is empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_path() -> Path:
    return Path(os.environ.get("CASCADE_RCNN_SHARED", REPO.parent / "shared"))


def cache_path() -> Path:
    root = os.environ.get("CASCADE_RCNN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "cascade_rcnn"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder (skips the test when it is absent)."""
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set CASCADE_RCNN_SHARED)")
    return path


@pytest.fixture(scope="session")
def mmdet_reference_dir(shared_dir: Path) -> Path:
    """`shared/reference/mmdet`: the real mmdetection's outputs with a rebuildable checkpoint (see its README)."""
    path = shared_dir / "reference" / "mmdet"
    if not (path / "make_checkpoint.py").is_file() or not (path / "recipe.json").is_file():
        pytest.skip(f"mmdetection reference not found at {path}")
    return path


@pytest.fixture(scope="session")
def mmdet_reference_checkpoint(mmdet_reference_dir: Path) -> Path:
    """The mmdetection reference checkpoint (~280 MB), rebuilt by the reference's own `make_checkpoint.py` into the
    cache the first time, then reused. The script verifies the tensors' sha256 before it writes; the file is written
    under a temporary name and renamed, so an interrupted build never leaves a file that looks complete."""
    sha256 = json.loads((mmdet_reference_dir / "recipe.json").read_text())["state_dict_sha256"]
    target = cache_path() / "reference" / f"mmdet_cascade_rcnn_r50_fpn_{sha256[:16]}.pth"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        result = subprocess.run(
            [sys.executable, str(mmdet_reference_dir / "make_checkpoint.py"), str(tmp)],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(f"make_checkpoint.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def mindspore_reference_dir(shared_dir: Path) -> Path:
    """`shared/reference/mindspore`: the real MindSpore Cascade R-CNN's outputs with a rebuildable checkpoint."""
    path = shared_dir / "reference" / "mindspore"
    if not (path / "make_ckpt.py").is_file() or not (path / "recipe.json").is_file():
        pytest.skip(f"MindSpore reference not found at {path}")
    return path


@pytest.fixture(scope="session")
def mindspore_reference_ckpt(mindspore_reference_dir: Path) -> Path:
    """The MindSpore reference `.ckpt` (358 MB), rebuilt by the reference's own numpy-only `make_ckpt.py` into the
    cache the first time, then reused. The script checks the file's sha256 against the one MindSpore wrote (and exits
    non-zero otherwise); it writes under a temporary name that is renamed only after that check."""
    recipe = json.loads((mindspore_reference_dir / "recipe.json").read_text())
    target = cache_path() / "reference" / f"mindspore_cascade_rcnn_r101_{recipe['sha256'][:16]}.ckpt"
    if target.is_file() and target.stat().st_size == recipe["size_bytes"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        result = subprocess.run(
            [sys.executable, str(mindspore_reference_dir / "make_ckpt.py"), str(tmp)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(f"make_ckpt.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def detectron2_reference_dir(shared_dir: Path) -> Path:
    """`shared/reference/detectron2`: the real detectron2's outputs with a rebuildable checkpoint (see its README)."""
    path = shared_dir / "reference" / "detectron2"
    if not (path / "make_checkpoint.py").is_file() or not (path / "recipe.json").is_file():
        pytest.skip(f"detectron2 reference not found at {path}")
    return path


@pytest.fixture(scope="session")
def detectron2_reference_checkpoint(detectron2_reference_dir: Path) -> Path:
    """The detectron2 reference model-zoo `.pkl` (278 MB), rebuilt by the reference's own numpy-only
    `make_checkpoint.py` into the cache the first time, then reused. The script verifies the tensors' sha256 before it
    writes; the file is written under a temporary name and renamed, so an interrupted build never looks complete."""
    sha256 = json.loads((detectron2_reference_dir / "recipe.json").read_text())["state_dict_sha256"]
    target = cache_path() / "reference" / f"detectron2_cascade_rcnn_r50_fpn_{sha256[:16]}.pkl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        result = subprocess.run(
            [sys.executable, str(detectron2_reference_dir / "make_checkpoint.py"), str(tmp)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(f"make_checkpoint.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
