"""Shared fixtures: where the shared reference data lives, and reference checkpoints rebuilt once per session.

The shared folder is `../shared` next to the repository (override with CASCADE_RCNN_SHARED); tests that need it skip
with the path they looked at. Rebuilt reference checkpoints are cached under $CASCADE_RCNN_CACHE/reference (default
~/.cache/cascade_rcnn/reference), keyed by the recipe's state_dict sha256, so a session rebuilds one only when the
recipe changes or the cache is empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

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


def reference_dir(shared_dir: Path, peer: str, script: str, what: str) -> Path:
    """`shared/reference/<peer>` when it holds its checkpoint script and recipe (skips the test otherwise)."""
    path = shared_dir / "reference" / peer
    if not (path / script).is_file() or not (path / "recipe.json").is_file():
        pytest.skip(f"{what} reference not found at {path}")
    return path


def rebuilt_checkpoint(script: Path, name: str, size: int | None = None) -> Path:
    """The reference checkpoint `name`, built by the reference's own `script` into the cache the first time, then
    reused (a cached file of another `size` is rebuilt). Each script checks its sha256 before it writes; the file is
    written under a temporary name and renamed, so an interrupted build never leaves a file that looks complete."""
    target = cache_path() / "reference" / name
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        result = subprocess.run([sys.executable, str(script), str(tmp)], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.fail(f"{script.name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _recipe(folder: Path) -> dict:
    return json.loads((folder / "recipe.json").read_text())


@pytest.fixture(scope="session")
def mmdet_reference_dir(shared_dir: Path) -> Path:
    """`shared/reference/mmdet`: the real mmdetection's outputs with a rebuildable checkpoint (see its README)."""
    return reference_dir(shared_dir, "mmdet", "make_checkpoint.py", "mmdetection")


@pytest.fixture(scope="session")
def mmdet_reference_checkpoint(mmdet_reference_dir: Path) -> Path:
    """The mmdetection reference checkpoint (~280 MB)."""
    sha256 = _recipe(mmdet_reference_dir)["state_dict_sha256"]
    name = f"mmdet_cascade_rcnn_r50_fpn_{sha256[:16]}.pth"
    return rebuilt_checkpoint(mmdet_reference_dir / "make_checkpoint.py", name)


@pytest.fixture(scope="session")
def mindspore_reference_dir(shared_dir: Path) -> Path:
    """`shared/reference/mindspore`: the real MindSpore Cascade R-CNN's outputs with a rebuildable checkpoint."""
    return reference_dir(shared_dir, "mindspore", "make_ckpt.py", "MindSpore")


@pytest.fixture(scope="session")
def mindspore_reference_ckpt(mindspore_reference_dir: Path) -> Path:
    """The MindSpore reference `.ckpt` (358 MB), from a numpy-only script that checks the file's sha256 against the
    one MindSpore wrote."""
    recipe = _recipe(mindspore_reference_dir)
    name = f"mindspore_cascade_rcnn_r101_{recipe['sha256'][:16]}.ckpt"
    return rebuilt_checkpoint(mindspore_reference_dir / "make_ckpt.py", name, recipe["size_bytes"])


@pytest.fixture(scope="session")
def detectron2_reference_dir(shared_dir: Path) -> Path:
    """`shared/reference/detectron2`: the real detectron2's outputs with a rebuildable checkpoint (see its README)."""
    return reference_dir(shared_dir, "detectron2", "make_checkpoint.py", "detectron2")


@pytest.fixture(scope="session")
def detectron2_reference_checkpoint(detectron2_reference_dir: Path) -> Path:
    """The detectron2 reference model-zoo `.pkl` (278 MB), from a numpy-only script."""
    sha256 = _recipe(detectron2_reference_dir)["state_dict_sha256"]
    name = f"detectron2_cascade_rcnn_r50_fpn_{sha256[:16]}.pkl"
    return rebuilt_checkpoint(detectron2_reference_dir / "make_checkpoint.py", name)


@pytest.fixture(scope="session")
def mmdet_mask_reference_dir(shared_dir: Path) -> Path:
    """`shared/reference/mmdet_mask`: the real mmdetection Cascade Mask R-CNN's outputs (see its README)."""
    return reference_dir(shared_dir, "mmdet_mask", "make_checkpoint.py", "mmdetection Cascade Mask R-CNN")


@pytest.fixture(scope="session")
def mmdet_mask_reference_checkpoint(mmdet_mask_reference_dir: Path) -> Path:
    """The mmdetection Cascade Mask R-CNN reference checkpoint (~310 MB)."""
    sha256 = _recipe(mmdet_mask_reference_dir)["state_dict_sha256"]
    name = f"mmdet_cascade_mask_rcnn_r50_fpn_{sha256[:16]}.pth"
    return rebuilt_checkpoint(mmdet_mask_reference_dir / "make_checkpoint.py", name)


@pytest.fixture(scope="session")
def detectron2_mask_reference_dir(shared_dir: Path) -> Path:
    """`shared/reference/detectron2_mask`: the real detectron2 Cascade Mask R-CNN's outputs (see its README)."""
    return reference_dir(shared_dir, "detectron2_mask", "make_checkpoint.py", "detectron2 Cascade Mask R-CNN")


@pytest.fixture(scope="session")
def detectron2_mask_reference_checkpoint(detectron2_mask_reference_dir: Path) -> Path:
    """The detectron2 Cascade Mask R-CNN reference model-zoo `.pkl` (288 MB)."""
    sha256 = _recipe(detectron2_mask_reference_dir)["state_dict_sha256"]
    name = f"detectron2_cascade_mask_rcnn_r50_fpn_{sha256[:16]}.pkl"
    return rebuilt_checkpoint(detectron2_mask_reference_dir / "make_checkpoint.py", name)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (byte-identical runs need the thread count of the run they are compared to)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for one module's shared files (weights, exported graphs), deleted when the module is done: the suite
    writes gigabytes of them, and pytest would otherwise keep every one until the session ends."""
    path = tmp_path_factory.mktemp("module")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_weights(module_tmp: Path) -> Path:
    """An untrained 3-class detector with small inputs and 50 proposals, saved: about 0.2 s per image on one thread
    (some test files define their own)."""
    from cascade_rcnn.api import Detector

    torch.manual_seed(0)
    detector = Detector(preset="cascade_rcnn_r50_fpn", num_classes=3, class_names=("person", "car", "dog"),
                        **{"transform.min_size": 128, "transform.max_size": 192, "rpn.pre_nms_top_n_test": 100,
                           "rpn.post_nms_top_n_test": 50})  # fmt: skip
    return detector.save(module_tmp / "tiny.safetensors")
