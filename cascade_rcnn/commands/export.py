"""`cascade-rcnn export`: write the detector as an ONNX graph (resize aside), runnable by `predict --backend
onnxruntime` and by any ONNX Runtime, or (`--format openvino`) as that graph converted to OpenVINO IR (.xml and .bin,
float32), runnable by `predict --backend openvino` (`cascade_rcnn.deploy.openvino`); inputs, outputs and dynamic
axes are described in `cascade_rcnn.deploy.onnx_export`. A mask model's graph also returns each detection's mask
probabilities (`mask_probs`), which both backends paste into the image as the PyTorch model does."""

from __future__ import annotations

import argparse
from pathlib import Path

from cascade_rcnn.errors import ConfigError

HELP = "Export a detector to ONNX or OpenVINO IR (dynamic batch and image size, all cascade stages, NMS included)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="weights file, or a known pretrained name")
    parser.add_argument("--format", default="onnx", choices=["onnx", "openvino"], help="onnx, or openvino (IR)")
    parser.add_argument("--output", required=True, type=Path, help="the .onnx file (openvino: .xml) to write")
    parser.add_argument("--preset", help="model preset (default: from the weights file's metadata)")
    parser.add_argument(
        "--no-optimize", action="store_true", help="export the weights as they are, without folding batch norm"
    )
    parser.add_argument("--check", action="store_true", help="run the written graph once (ONNX Runtime or OpenVINO)")


def run(args: argparse.Namespace) -> int:
    from cascade_rcnn.api import Detector
    from cascade_rcnn.deploy.extras import require

    suffix = ".xml" if args.format == "openvino" else ".onnx"
    if args.output.suffix.lower() != suffix:
        raise ConfigError(f"--output: expected a {suffix} file name for --format {args.format}, got {args.output}")
    if args.format == "openvino" and args.no_optimize:
        raise ConfigError("--no-optimize applies to --format onnx (OpenVINO folds batch norm itself)")
    require("onnx", extra="onnx", what="export")  # before the weights load: fail at once
    if args.format == "openvino":
        require("openvino", extra="openvino", what="export --format openvino")
    elif args.check:
        require("onnxruntime", extra="onnx", what="export --check")
    detector = Detector.from_weights(args.weights, preset=args.preset, optimize=False)
    if args.format == "openvino":
        from cascade_rcnn.deploy.openvino import OpenVinoDetector, export_openvino

        path = export_openvino(detector.model, args.output, config=detector.config, preset=detector.preset)
        size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
        load, runtime = OpenVinoDetector, "OpenVINO"
    else:
        from cascade_rcnn.deploy.backends import OnnxDetector
        from cascade_rcnn.deploy.onnx_export import export_onnx

        path = export_onnx(
            detector.model, args.output, config=detector.config, preset=detector.preset, optimize=not args.no_optimize
        )
        size = path.stat().st_size
        load, runtime = OnnxDetector, "ONNX Runtime"  # type: ignore[assignment]
    print(f"wrote {path} ({size / 1e6:.1f} MB)")
    if args.check:
        import torch

        size = detector.config.transform.min_size
        det = load(path).predict(torch.rand(3, size, size) * 255)
        masks = "" if det.masks is None else " with their masks"
        print(f"checked with {runtime}: {len(det)} detections{masks} on a random image")
    return 0
