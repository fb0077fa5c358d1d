"""OpenVINO backend: the project's ONNX graph (`cascade_rcnn.deploy.onnx_export`) converted to OpenVINO IR and run by
OpenVINO's CPU plugin, float32 or int8 (`cascade_rcnn.deploy.quantize`).

    export_openvino(detector.model, "model.xml", config=detector.config, preset=detector.preset)  # + model.bin
    det = OpenVinoDetector("model.xml")
    dets = det.predict(["a.jpg", "b.jpg"])                       # list of Detections, original-image pixels

The IR is the ONNX graph as `openvino.convert_model` reads it: the same inputs and outputs, the same metadata (kept in
the IR's rt_info under `cascade_rcnn`). `OpenVinoDetector` runs it through the ONNX backend's own `OnnxModel` (the
project's `Transform` outside the graph, `split_by_image`, and `paste_per_image` for mask models), so nothing of the
detection flow is written again here; `cascade_rcnn.deploy.lean` reads and compiles the IR (float32 asked for
explicitly: OpenVINO would otherwise run float32 IR in bf16 on CPUs with AMX), and runs it without torch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade_rcnn.api import Detector
from cascade_rcnn.deploy.backends import OnnxModel, attach_graph
from cascade_rcnn.deploy.extras import require
from cascade_rcnn.deploy.lean import RT_INFO_KEY, read_openvino
from cascade_rcnn.deploy.onnx_export import export_onnx
from cascade_rcnn.errors import CascadeRCNNError



def _openvino(what: str) -> Any:
    return require("openvino", extra="openvino", what=what)


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def save_ir(ov_model: Any, path: Path, metadata: dict[str, str]) -> Path:
    """Write `ov_model` as float32 IR (`path` .xml and its .bin) with `metadata` in its rt_info."""
    ov = _openvino("OpenVINO export")
    for key, value in metadata.items():
        ov_model.set_rt_info(value, [RT_INFO_KEY, key])
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(path), compress_to_fp16=False)  # fp16 weights would change the detections
    return path


def export_openvino(
    model: nn.Module, path: str | Path, *, config: object | None = None, preset: str | None = None
) -> Path:
    """Write `model` (a `CascadeRCNN`) as OpenVINO IR at `path` (.xml, with its .bin beside it), float32: the ONNX
    export (batch norm folded) converted by `openvino.convert_model`."""
    ov = _openvino("OpenVINO export")
    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise CascadeRCNNError(f"an OpenVINO model is a .xml file (with its .bin), got {path}")
    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_ov_") as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", config=config, preset=preset)
        ov_model = ov.convert_model(str(onnx_path))
        return save_ir(ov_model, path, onnx_metadata(onnx_path))


class OpenVinoDetector(Detector):
    """A `Detector` whose model is OpenVINO IR written by `export_openvino` or `quantize_openvino`, run on the CPU.

    Same `predict` and `class_names` as `Detector`; `threads` sets OpenVINO's inference threads (default: PyTorch's
    intra-op thread count). Detector.__init__ is not called: there is no PyTorch model."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        session, meta, output_names = read_openvino(path, threads or torch.get_num_threads())
        self.quantization = meta("quantization") or "fp32"
        attach_graph(self, Path(path), session, meta, output_names)

    @property
    def inference_model(self) -> OnnxModel:  # type: ignore[override]
        return self.model

    def save(self, path: str | Path) -> Path:
        raise CascadeRCNNError("an OpenVINO detector has no PyTorch weights to save; keep the .xml and .bin files")
