"""`cascade-rcnn export`: write the detector as an ONNX graph (resize aside), runnable by `predict --backend
onnxruntime` and by any ONNX Runtime; inputs, outputs and dynamic axes are described in
`cascade_rcnn.deploy.onnx_export`. A mask model's graph also returns each detection's mask probabilities
(`mask_probs`), which the onnxruntime backend pastes into the image as the PyTorch model does."""

from __future__ import annotations

import argparse
from pathlib import Path

from cascade_rcnn.errors import ConfigError

HELP = "Export a detector to ONNX (dynamic batch and image size, all cascade stages, NMS included)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="weights file, or a known pretrained name")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    parser.add_argument("--output", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--preset", help="model preset (default: from the weights file's metadata)")
    parser.add_argument(
        "--no-optimize", action="store_true", help="export the weights as they are, without folding batch norm"
    )
    parser.add_argument("--check", action="store_true", help="run the written graph once with ONNX Runtime")


def run(args: argparse.Namespace) -> int:
    from cascade_rcnn.api import Detector
    from cascade_rcnn.deploy.onnx_export import export_onnx

    if args.output.suffix.lower() != ".onnx":
        raise ConfigError(f"--output: expected a .onnx file name, got {args.output}")
    detector = Detector.from_weights(args.weights, preset=args.preset, optimize=False)
    path = export_onnx(
        detector.model, args.output, config=detector.config, preset=detector.preset, optimize=not args.no_optimize
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.check:
        import torch

        from cascade_rcnn.deploy.backends import OnnxDetector

        size = detector.config.transform.min_size
        det = OnnxDetector(path).predict(torch.rand(3, size, size) * 255)
        masks = "" if det.masks is None else " with their masks"
        print(f"checked with ONNX Runtime: {len(det)} detections{masks} on a random image")
    return 0
