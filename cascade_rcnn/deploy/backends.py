"""Inference backends behind one `predict` contract: the PyTorch `Detector`, and `OnnxDetector`, which runs a graph
written by `cascade_rcnn.deploy.onnx_export` with ONNX Runtime.

    det = load_backend("model.safetensors", "onnxruntime")   # or a .onnx file; "torch" gives a Detector
    dets = det.predict(["a.jpg", "b.jpg"], batch_size=2)      # list of Detections, original-image pixels
    det.class_names

`OnnxDetector` resizes, normalises and pads with the project's own `Transform` (built from the config stored in the
.onnx file), and the graph maps boxes back to original pixels, so its detections equal the PyTorch ones up to float
rounding (tested on COCO images: boxes within 1e-2 px, same labels, scores within 1e-4). For a mask model the graph
returns each detection's mask probabilities (`mask_probs`, (D, 28, 28)) and `OnnxModel` pastes them outside the graph
with the model's own `paste_masks` and the threshold stored in the file, as `CascadeRCNN.predict_batch` does, so
`Detections.masks` ((D, H, W) bool, original pixels) equal the PyTorch ones up to the probabilities' float rounding.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cascade_rcnn.api import Detector
from cascade_rcnn.deploy.lean import (
    GRAPH_SUFFIXES,
    Meta,
    exported_graph,
    graph_config,
    graph_mask_threshold,
    read_onnx,
)
from cascade_rcnn.errors import CascadeRCNNError
from cascade_rcnn.modeling.detector import build_transform, split_by_image
from cascade_rcnn.modeling.masks import paste_per_image
from cascade_rcnn.structures import Detections

BACKENDS = ("torch", "onnxruntime", "openvino")


class OnnxModel:
    """An ONNX Runtime session with the model's input transform: `predict(images)` as `CascadeRCNN.predict`.

    `mask_threshold` is None for a box model; for a mask model's graph (a fifth output, `mask_probs` (D, 2S, 2S)) it
    is the threshold at which `paste_masks` pastes each detection's probabilities into its original image, here,
    outside the graph."""

    def __init__(self, session: Any, transform: torch.nn.Module, mask_threshold: float | None = None) -> None:
        self.session = session
        self.transform = transform
        self.mask_threshold = mask_threshold

    def predict(self, images: list[Tensor], return_stages: bool = False) -> list[Detections]:
        if return_stages:
            raise CascadeRCNNError("per-stage detections need the PyTorch backend (the graph returns the final ones)")
        batch, feeds = graph_feeds(self.transform, images, {i.name for i in self.session.get_inputs()})
        outputs = tuple(torch.from_numpy(x) for x in self.session.run(None, feeds))
        results = split_by_image(outputs[:4], len(images))
        if self.mask_threshold is not None:
            paste_per_image(results, outputs[4], batch.original_sizes, self.mask_threshold)
        return results


def graph_feeds(
    transform: torch.nn.Module, images: list[Tensor], input_names: set[str]
) -> tuple[Any, dict[str, np.ndarray]]:
    """`images` through the model's `transform` into one batch (`ImageBatch`), and the exported graph's inputs made
    from it: those of `input_names` (original_sizes: only graphs that rescale after NMS), as numpy arrays."""
    batch, _ = transform([img.cpu() for img in images])
    names = ("images", "image_sizes", "scale_factors", "original_sizes")
    feeds = {name: t.contiguous().numpy() for name, t in zip(names, batch.as_tensors())}
    return batch, {name: value for name, value in feeds.items() if name in input_names}


class OnnxDetector(Detector):
    """A `Detector` whose model is an exported ONNX graph run by ONNX Runtime on the CPU.

    Same `predict` (inputs, batching of images with equal padded sizes, `score_thresh`, one or a list) and
    `class_names`; no PyTorch weights are loaded. `threads` sets ONNX Runtime's intra-op threads (default: PyTorch's
    intra-op thread count, i.e. the physical cores). Detector.__init__ is not called: there is no PyTorch model.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        session, meta, output_names = read_onnx(path, threads or torch.get_num_threads())
        attach_graph(self, Path(path), session, meta, output_names)

    @property
    def inference_model(self) -> OnnxModel:  # type: ignore[override]
        return self.model

    def save(self, path: str | Path) -> Path:
        raise CascadeRCNNError("an ONNX detector has no PyTorch weights to save; keep the .onnx file")


def attach_graph(
    detector: Detector, path: Path, session: Any, meta: Meta, output_names: list[str]
) -> None:
    """Make `detector` (a `Detector` whose __init__ was not called) run an exported graph: its config and preset from
    the graph's metadata (`meta(key)`, None when absent; the config is known to be there), its `OnnxModel` over
    `session`, and for a mask graph (a `mask_probs` output) the threshold it pastes at."""
    detector.config = graph_config(meta)
    detector.preset = meta("cascade_rcnn_preset") or "cascade_rcnn_r50_fpn"
    detector.device = torch.device("cpu")
    mask_threshold = graph_mask_threshold(path, meta, output_names)
    detector.model = OnnxModel(session, build_transform(detector.config), mask_threshold)  # type: ignore[assignment]
    detector.load_report = None
    detector.optimize = detector.bf16 = False
    detector.path = path


def load_backend(
    weights: str | Path, backend: str = "torch", *, device: str | None = None, preset: str | None = None
) -> Detector:
    """A detector for `weights` on `backend` ("torch", "onnxruntime" or "openvino"), with `.predict(...)` and
    `.class_names`.

    For "onnxruntime", `weights` is an exported .onnx file; for "openvino", an exported or quantized .xml file
    (`cascade_rcnn.deploy.openvino`); either may also be any weights file the project reads, which is exported to a
    temporary file first (this takes a while; export once with `cascade-rcnn export` to avoid it).
    """
    if backend == "torch":
        return Detector.from_weights(weights, device=device or "cpu", preset=preset)
    if backend not in BACKENDS:
        raise CascadeRCNNError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    graph = exported_graph(weights, backend, device=device, preset=preset)
    if backend == "openvino":
        from cascade_rcnn.deploy.openvino import OpenVinoDetector, export_openvino

        load, export = OpenVinoDetector, export_openvino
    else:
        from cascade_rcnn.deploy.onnx_export import export_onnx

        load, export = OnnxDetector, export_onnx  # type: ignore[assignment]
    if graph is not None:
        return load(graph)
    detector = Detector.from_weights(weights, preset=preset, optimize=False)
    with tempfile.TemporaryDirectory(prefix=f"cascade_rcnn_{backend}_") as tmp:
        path = export(detector.model, Path(tmp) / f"model{GRAPH_SUFFIXES[backend]}", config=detector.config,
                      preset=detector.preset)  # fmt: skip
        del detector
        loaded = load(path)  # the runtime has read the file; the folder can go
    return loaded
