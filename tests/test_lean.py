"""The torch-free runtime (`cascade_rcnn.deploy.lean`, issue 18 item 4's memory goal): its numpy input transform is
bit-identical to the PyTorch `Transform` on every preset's convention; it runs an exported graph in a process that
never imports torch, with the torch-based backends' detections (tests/test_openvino.py, tests/test_export.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascade_rcnn.api import to_tensor_image
from cascade_rcnn.config import PRESETS, get_preset
from cascade_rcnn.deploy.backends import graph_feeds
from cascade_rcnn.deploy.lean import LeanDetector
from cascade_rcnn.errors import CascadeRCNNError
from cascade_rcnn.modeling.detector import build_transform
from cascade_rcnn.preprocess import ArrayTransform, input_convention
from helpers import without_packages

GRAPH_INPUTS = {"images", "image_sizes", "scale_factors", "original_sizes"}


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    """A (h, w, 3) uint8 image with edges and flat areas (a pure-noise image hides resize errors in its noise)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[: h // 2, : w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    return image


# Landscape and portrait, enlarged and shrunk (Pillow's antialiased path), a one-pixel sliver, and one that the seed's
# portrait rule resizes twice.
SIZES = [(480, 640), (640, 427), (1000, 1500), (1, 300), (1200, 500)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_array_transform_equals_the_torch_transform(preset: str) -> None:
    """Every graph input, alone and as a batch of two, equal to the last bit: the same size rules and canvases, the
    same integer pixel arithmetic (OpenCV's or Pillow's), the same float32 normalisation."""
    cfg = get_preset(preset)
    arrays = ArrayTransform(input_convention(cfg.transform))
    tensors = build_transform(cfg)
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    for batch in [[image] for image in images] + [images[:2]]:
        _, expected = graph_feeds(tensors, [to_tensor_image(image) for image in batch], GRAPH_INPUTS)
        feeds = arrays(batch)
        assert feeds.keys() == expected.keys()
        for name, value in expected.items():
            assert feeds[name].dtype == value.dtype and np.array_equal(feeds[name], value), (preset, name)


def test_array_transform_leaves_its_inputs_alone() -> None:
    arrays = ArrayTransform(input_convention(get_preset("cascade_rcnn_r50_fpn").transform))
    image = random_image(60, 80, 0)
    before = image.copy()
    arrays([image])
    assert np.array_equal(image, before)


def test_lean_detector_names_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(CascadeRCNNError, match="a .onnx or an OpenVINO .xml file"):
        LeanDetector(tmp_path / "model.safetensors")
    with pytest.raises(CascadeRCNNError, match="no such ONNX file"):
        LeanDetector(tmp_path / "missing.onnx")


def run_without_torch(graph: Path, image: Path) -> list[list[float]]:
    """Detect on `image` with `LeanDetector` in a fresh Python process where torch, torchvision and pycocotools cannot
    be imported (as on a machine where they are not installed); fails if any import of them is tried. Returns each
    detection's box, score and label, and its mask's pixel count for a mask model."""
    code = without_packages(("torch", "torchvision", "pycocotools")) + (
        "import json\n"
        "from cascade_rcnn.deploy.lean import LeanDetector\n"
        f"d = LeanDetector({str(graph)!r}, threads=2).predict({str(image)!r})\n"
        "areas = [[] for _ in d.boxes] if d.masks is None else [[int(m.sum())] for m in d.masks]\n"
        "rows = zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), areas)\n"
        "print(json.dumps([[*b, s, l, *a] for b, s, l, a in rows]))\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_lean_equals(lean: LeanDetector, detector: object, paths: list[Path]) -> None:
    """`lean` (numpy) gives `detector`'s (torch) detections of the same graph, to the last bit: the same inputs, the
    same compiled graph, the same thread count; and so does a process that never imports torch."""
    outs, refs = lean.predict(paths), detector.predict(paths)
    for out, ref in zip(outs, refs, strict=True):
        assert isinstance(out.boxes, np.ndarray) and out.class_names == ref.class_names and len(ref) > 0
        for field in ("boxes", "scores", "labels"):
            assert np.array_equal(getattr(out, field), getattr(ref, field).numpy()), field
        assert (out.masks is None) == (ref.masks is None)
        assert out.masks is None or (out.masks.dtype == bool and np.array_equal(out.masks, ref.masks.numpy()))
    fresh = np.asarray(run_without_torch(lean.path, paths[0]))
    ref = refs[0]
    columns = [ref.boxes.numpy(), ref.scores.numpy()[:, None], ref.labels.numpy()[:, None]]
    if ref.masks is not None:
        columns.append(ref.masks.sum(dim=(1, 2)).numpy()[:, None])
    expected = np.concatenate(columns, 1)
    assert np.array_equal(fresh, expected.astype(np.float64))
