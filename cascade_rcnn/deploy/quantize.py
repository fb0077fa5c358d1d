"""int8 static post-training quantization: the OpenVINO IR of `cascade_rcnn.deploy.openvino`, calibrated by NNCF on
a user's images, run by `OpenVinoDetector` (`predict --backend openvino`).

    quantize_openvino(detector.model, ["a.jpg", ...], "int8.xml", config=detector.config, preset=detector.preset)

What is int8: the convolutions of the backbone, the FPN and the RPN head, and the box heads' linear layers (weights per
output channel, activations per tensor, calibrated on the images' own feature ranges). What stays float32: RoIAlign,
proposal and box decoding, clipping, score arithmetic, TopK and NMS (`FLOAT_OPS` below are NNCF's ignored scope), and
the mask heads' sigmoid and paste. The graph is the same ONNX export the fp32 backends run, so no step of the detection
flow is written again: quantization only inserts FakeQuantize nodes before the weighted layers, which OpenVINO's CPU
plugin then runs as int8 (VNNI dot products where the CPU has them).

Engine: OpenVINO with NNCF on the exported graph, chosen by measurement (README: "OpenVINO and int8 on CPUs"). On the
part every engine can run (backbone + FPN, 800x1088, 2 threads, AMD EPYC with VNNI) it was the fastest: 5.2x eager
fp32, against 3.9x for ONNX Runtime's static QDQ int8 and 4.3x for PyTorch's PT2E flow (torchao's X86InductorQuantizer
compiled by inductor). NNCF also keeps whole subgraphs in float by op type, which the NMS and RoIAlign parts of this
graph need; PT2E needs a `torch.export` graph of `CascadeRCNN.detect`, which its data-dependent NMS and top-k do not
give without rewriting the step, and a C++ compiler at run time.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from cascade_rcnn.api import to_tensor_image
from cascade_rcnn.deploy.extras import require
from cascade_rcnn.deploy.openvino import onnx_metadata, save_ir
from cascade_rcnn.errors import CascadeRCNNError

# Kept in float32 (OpenVINO op types): box and score arithmetic, RoIAlign's sampling and the post-processing. NNCF
# puts no FakeQuantize on these ops' inputs, so an int8 layer's output reaches them dequantized.
FLOAT_OPS = [
    "ROIAlign", "NonMaxSuppression", "TopK", "Exp", "Log", "Clamp", "Sigmoid", "SoftMax", "Softmax", "Divide",
    "Subtract", "Minimum", "Maximum", "ScatterUpdate", "ScatterElementsUpdate", "ScatterNDUpdate", "Gather",
    "GatherND", "GatherElements",
]  # fmt: skip
# The only nodes that may be int8 (names of the ONNX export, by module path: the backbone runs inside `fpn`); every
# other node (proposal decoding, the cascade's box arithmetic, RoIAlign's level assignment, NMS, the mask heads) stays
# float32 even where NNCF would fuse it into an int8 neighbour.
INT8_MODULES = ("fpn", "rpn/head", r"box_heads\.\d+")
FLOAT_NODES = rf"^(?!/({'|'.join(INT8_MODULES)})/).*"


def quantize_openvino(
    model: nn.Module,
    calibration_images: Sequence[str | Path],
    path: str | Path,
    *,
    config: object | None = None,
    preset: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Path:
    """Write `model` (a `CascadeRCNN`) as int8 OpenVINO IR at `path` (.xml and .bin), calibrated on
    `calibration_images` (image files, run one at a time through the model's own `Transform`)."""
    ov = require("openvino", extra="int8", what="int8 quantization")
    nncf = require("nncf", extra="int8", what="int8 quantization")
    from cascade_rcnn.deploy.backends import graph_feeds
    from cascade_rcnn.deploy.onnx_export import export_onnx

    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise CascadeRCNNError(f"an OpenVINO model is a .xml file (with its .bin), got {path}")
    if not calibration_images:
        raise CascadeRCNNError("int8 calibration needs at least one image")
    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_int8_") as tmp:
        log("exporting to ONNX ...")
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", config=config, preset=preset)
        metadata = onnx_metadata(onnx_path)
        ov_model = ov.convert_model(str(onnx_path))
    # The feeds as the backend makes them: the same Transform, one image per batch.
    input_names = {port.get_any_name() for port in ov_model.inputs}
    feeds = [graph_feeds(model.transform, [to_tensor_image(p)], input_names)[1] for p in calibration_images]
    log(f"calibrating on {len(feeds)} images ...")
    logging.getLogger("nncf").setLevel(logging.WARNING)  # not a line per node it leaves in float32
    quantized = nncf.quantize(
        ov_model,
        nncf.Dataset(feeds),
        subset_size=len(feeds),
        target_device=nncf.TargetDevice.CPU,
        ignored_scope=nncf.IgnoredScope(patterns=[FLOAT_NODES], types=FLOAT_OPS, validate=False),
    )
    return save_ir(quantized, path, {**metadata, "quantization": "int8"})
