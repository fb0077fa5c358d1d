"""OpenVINO backend (issue 18 item 2): `export --format openvino` and `predict --backend openvino` give the eager
PyTorch detections up to float rounding, with the ONNX export's tolerances (tests/test_export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade_rcnn.api import Detector
from cascade_rcnn.cli import main
from cascade_rcnn.errors import CascadeRCNNError

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'cascade-rcnn[openvino]'")
pytest.importorskip("onnx", reason="OpenVINO export goes through the ONNX export: pip install 'cascade-rcnn[onnx]'")

from test_lean import assert_lean_equals
from test_export import (
    IMAGES,
    VAL,
    assert_backend_eval_matches_torch,
    assert_same_detections,
    calibrated_detector,
    needs_coco128,
)


@pytest.fixture(scope="module")
def exported(module_tmp: Path) -> tuple[Detector, Path, Path]:
    """A calibrated class-agnostic detector, saved, and exported as OpenVINO IR through the CLI (checked once)."""
    det = calibrated_detector()
    weights = det.save(module_tmp / "model.safetensors")
    xml = module_tmp / "model.xml"
    assert main(["export", "--format", "openvino", "--weights", str(weights), "--output", str(xml), "--check"]) == 0
    return det, weights, xml


@needs_coco128
def test_openvino_matches_pytorch(exported: tuple[Detector, Path, Path]) -> None:
    from cascade_rcnn.deploy.openvino import OpenVinoDetector

    det, _, xml = exported
    assert xml.with_suffix(".bin").is_file()
    ov = OpenVinoDetector(xml, threads=2)
    assert ov.class_names == det.class_names and ov.quantization == "fp32"
    paths = [VAL / name for name in IMAGES]
    assert_same_detections(det.predict(paths), ov.predict(paths))
    # Two images of equal padded size run as one batch of 2 in the graph.
    pair = [VAL / "000000000139.jpg", VAL / "000000000785.jpg"]
    assert_same_detections(det.predict(pair, batch_size=2), ov.predict(pair, batch_size=2))


@needs_coco128
def test_lean_runtime_matches_the_openvino_detector(exported: tuple[Detector, Path, Path]) -> None:
    from cascade_rcnn.deploy.lean import LeanDetector
    from cascade_rcnn.deploy.openvino import OpenVinoDetector

    _, _, xml = exported
    lean = LeanDetector(xml, threads=2)
    assert lean.quantization == "fp32" and lean.class_names == OpenVinoDetector(xml).class_names
    assert_lean_equals(lean, OpenVinoDetector(xml, threads=2), [VAL / name for name in IMAGES])


@needs_coco128
def test_the_benchmarks_lean_memory_child_holds_no_torch(exported: tuple[Detector, Path, Path]) -> None:
    """`benchmark`'s int8 memory figure comes from this child: numpy + OpenVINO imported take a fraction of what
    torch alone does (~500 MB), and the model's peak comes on top."""
    from cascade_rcnn.benchmarks.memory import peak_rss_in_child

    _, _, xml = exported
    peak, runtime = peak_rss_in_child("cascade_rcnn.benchmarks.memory", f"lean_peak_rss({str(xml)!r}, "
                                      f"{str(VAL / IMAGES[0])!r}, 2)")  # fmt: skip
    assert 0 < runtime < 250 < peak, (runtime, peak)


@needs_coco128
def test_predict_command_with_openvino_backend(exported: tuple[Detector, Path, Path], tmp_path: Path) -> None:
    from cascade_rcnn.deploy.backends import load_backend
    from cascade_rcnn.deploy.openvino import OpenVinoDetector

    det, _, xml = exported
    assert isinstance(load_backend(xml, "openvino"), OpenVinoDetector)
    with pytest.raises(CascadeRCNNError, match="--preset does not apply"):
        load_backend(xml, "openvino", preset="cascade_rcnn_r50_fpn")
    bad = tmp_path / "bad.xml"
    bad.write_text("not IR")
    with pytest.raises(CascadeRCNNError, match="not a readable OpenVINO model"):
        OpenVinoDetector(bad)
    image = VAL / IMAGES[0]
    args = ["predict", str(image), "--weights", str(xml), "--backend", "openvino", "--score-thresh", "0.2"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    expected = det.predict(image, score_thresh=0.2)
    assert len(written) == len(expected) > 0
    assert sorted(d["score"] for d in written) == pytest.approx(sorted(expected.scores.tolist()), abs=1e-3)


@needs_coco128
def test_eval_command_with_openvino_backend(exported: tuple[Detector, Path, Path], tmp_path: Path) -> None:
    _, weights, xml = exported
    assert_backend_eval_matches_torch(weights, xml, "openvino", tmp_path)
