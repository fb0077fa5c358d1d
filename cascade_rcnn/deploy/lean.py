"""Run an exported detector without PyTorch: numpy, Pillow and the graph's runtime (OpenVINO or ONNX Runtime) only.

    det = LeanDetector("int8.xml")          # from `cascade-rcnn quantize` / `export --format openvino`, or a .onnx file
    d = det.predict("a.jpg")                 # a Detections of numpy arrays, original-image pixels
    d.boxes, d.scores, d.labels, d.names

What a deployment needs and nothing more: the project's input convention in numpy (`cascade_rcnn.preprocess`, the
same rules and integer pixel arithmetic the PyTorch `Transform` runs, so the graph's inputs are bit-identical), the
graph, the detections split out of its outputs, and for a mask model's graph its masks pasted by
`cascade_rcnn.paste` (the numpy paste the PyTorch model runs too). torch is never imported: in a process of its own,
an int8 model answers in about half the memory of `OpenVinoDetector`, whose process holds torch's ~0.5 GB of libraries
(the `benchmark` reports both peaks). Images run one at a time.

This module also holds what the torch-based backends share with it: reading an IR or an ONNX file with its metadata
(`read_openvino`, `read_onnx`) and `OpenVinoSession`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cascade_rcnn.config import ModelConfig, config_from_dict
from cascade_rcnn.data.image_io import as_rgb_array
from cascade_rcnn.deploy.extras import require
from cascade_rcnn.errors import CascadeRCNNError
from cascade_rcnn.paste import paste_masks_array
from cascade_rcnn.preprocess import ArrayTransform, input_convention
from cascade_rcnn.structures import Detections

RT_INFO_KEY = "cascade_rcnn"  # the IR's rt_info section holding the ONNX file's metadata
MASK_OUTPUT = "mask_probs"  # the fifth output of a mask model's graph

Meta = Callable[[str], "str | None"]  # a graph's metadata: key -> value, None when absent


class OpenVinoSession:
    """A compiled OpenVINO model behind the two calls made of an ONNX Runtime session (`get_inputs`, `run`)."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def get_inputs(self) -> list[Any]:
        return [type("Input", (), {"name": port.get_any_name()})() for port in self.compiled.inputs]

    def run(self, output_names: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        # Copies: the request reuses its output buffers at the next call.
        return [np.array(results[port]) for port in self.compiled.outputs]


def read_openvino(path: str | Path, threads: int | None = None) -> tuple[OpenVinoSession, Meta, list[str]]:
    """An IR written by `export_openvino` or `quantize_openvino`, compiled for the CPU: its session, its metadata and
    its output names. `threads`: OpenVINO's inference threads (None: OpenVINO's default, the physical cores)."""
    ov = require("openvino", extra="openvino", what="the openvino backend")
    path = Path(path)
    if not path.is_file():
        raise CascadeRCNNError(f"{path}: no such OpenVINO model (.xml)")
    core = ov.Core()
    try:
        ov_model = core.read_model(str(path))
    except Exception as error:  # noqa: BLE001 (OpenVINO raises RuntimeError and its own types)
        raise CascadeRCNNError(f"{path}: not a readable OpenVINO model ({error})") from None
    if not ov_model.has_rt_info([RT_INFO_KEY, "cascade_rcnn_config"]):
        raise CascadeRCNNError(f"{path}: not exported by `cascade-rcnn export` (no cascade_rcnn_config)")
    values = {
        key: ov_model.get_rt_info([RT_INFO_KEY, key]).astype(str)
        for key in ("cascade_rcnn_config", "cascade_rcnn_preset", "mask_threshold", "quantization")
        if ov_model.has_rt_info([RT_INFO_KEY, key])
    }
    config = {
        "INFERENCE_PRECISION_HINT": "f32",  # OpenVINO would run float32 IR in bf16 on AMX; int8 layers stay int8
        "PERFORMANCE_HINT": "LATENCY",
        **({"INFERENCE_NUM_THREADS": threads} if threads else {}),
    }
    compiled = core.compile_model(ov_model, "CPU", config)
    output_names = [name for port in ov_model.outputs for name in port.get_names()]
    return OpenVinoSession(compiled), values.get, output_names


def read_onnx(path: str | Path, threads: int | None = None) -> tuple[Any, Meta, list[str]]:
    """An ONNX file written by `export_onnx`, in an ONNX Runtime CPU session: the session, its metadata and its output
    names. `threads`: intra-op threads (None: ONNX Runtime's default, the physical cores)."""
    onnxruntime = require("onnxruntime", extra="onnx", what="the onnxruntime backend")
    path = Path(path)
    if not path.is_file():
        raise CascadeRCNNError(f"{path}: no such ONNX file")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 (onnxruntime's errors derive from Exception only)
        raise CascadeRCNNError(f"{path}: not a readable ONNX model ({error})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if "cascade_rcnn_config" not in metadata:
        raise CascadeRCNNError(f"{path}: not exported by `cascade-rcnn export` (no cascade_rcnn_config metadata)")
    return session, metadata.get, [o.name for o in session.get_outputs()]


def read_graph(path: str | Path, threads: int | None = None) -> tuple[Any, Meta, list[str]]:
    """`read_openvino` for a .xml file, `read_onnx` for a .onnx file."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".xml", ".onnx"):
        raise CascadeRCNNError(f"{path}: an exported model is a .onnx or an OpenVINO .xml file")
    return (read_openvino if suffix == ".xml" else read_onnx)(path, threads)


def graph_config(meta: Meta) -> ModelConfig:
    """The model config stored in an exported graph's metadata (known to be there)."""
    return config_from_dict(json.loads(meta("cascade_rcnn_config")))


GRAPH_SUFFIXES = {"onnxruntime": ".onnx", "openvino": ".xml"}  # the exported file each runtime backend runs


def exported_graph(
    weights: str | Path, backend: str, *, device: str | None = None, preset: str | None = None
) -> Path | None:
    """`weights` as a path when it is the file `backend` ("onnxruntime" or "openvino") runs as it is (an exported
    .onnx / .xml), None when it must be exported first. Refused either way: a device other than the CPU, where these
    runtimes run; and a preset for an exported file, whose config was fixed at export."""
    if device not in (None, "cpu"):
        raise CascadeRCNNError(f"the {backend} backend runs on the CPU, not {device}")
    suffix = GRAPH_SUFFIXES[backend]
    if Path(weights).suffix.lower() != suffix:
        return None
    if preset is not None:
        raise CascadeRCNNError(f"--preset does not apply to a {suffix} file: its config was fixed at export")
    return Path(weights)


def graph_mask_threshold(path: Path, meta: Meta, output_names: list[str]) -> float | None:
    """The threshold a mask model's graph (a `mask_probs` output) pastes its masks at; None for a box model."""
    if MASK_OUTPUT not in output_names:
        return None
    if meta("mask_threshold") is None:
        raise CascadeRCNNError(f"{path}: a mask graph without its mask_threshold metadata")
    return float(meta("mask_threshold"))


class LeanDetector:
    """An exported model (.xml for OpenVINO, fp32 or int8; .onnx for ONNX Runtime) run with numpy alone.

    `predict` takes what `Detector.predict` takes, PyTorch tensors aside (a path, a Pillow image, an (H, W, 3) array,
    or a list of them) and returns `Detections` whose fields are numpy arrays, equal to `OpenVinoDetector`'s /
    `OnnxDetector`'s (the same graph on bit-identical inputs, the same paste): for a mask model, `masks` (N, H, W)
    bool over the original image.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session, meta, output_names = read_graph(self.path, threads)
        self.mask_threshold = graph_mask_threshold(self.path, meta, output_names)
        self.config = graph_config(meta)
        self.preset = meta("cascade_rcnn_preset") or "cascade_rcnn_r50_fpn"
        self.quantization = meta("quantization") or "fp32"
        self.transform = ArrayTransform(input_convention(self.config.transform))
        self.input_names = {i.name for i in self.session.get_inputs()}

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.config.names)

    device = "cpu"  # where the runtime runs it, as `Detector.device` says where its model runs

    def predict(
        self, images: Any | Sequence[Any], *, score_thresh: float | None = None, batch_size: int = 1
    ) -> Detections | list[Detections]:
        """Detections of one image, or a list for a list; `score_thresh` filters above the model's own. Images run
        one at a time, whatever `batch_size` (taken so that a `LeanDetector` stands where a `Detector` does, as behind
        `cascade-rcnn serve`): on a CPU, one at a time was also the fastest per image for the PyTorch model."""
        single = not isinstance(images, (list, tuple))
        results = []
        for image in [images] if single else images:
            feeds = self.transform([as_rgb_array(image)])
            outputs = self.session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
            boxes, scores, labels = outputs[:3]
            masks = None
            if self.mask_threshold is not None:
                size = tuple(int(x) for x in feeds["original_sizes"][0])
                masks = paste_masks_array(outputs[4], boxes, size, self.mask_threshold)
            det = Detections(boxes, scores, labels, self.class_names, masks=masks)
            results.append(det if score_thresh is None else det.filter(score_thresh))
        return results[0] if single else results
