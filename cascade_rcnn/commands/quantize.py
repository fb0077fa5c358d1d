"""`cascade-rcnn quantize`: int8 static post-training quantization of a detector, calibrated on a folder of the user's
images, written as OpenVINO IR (.xml and .bin) for `predict/eval --backend openvino` (`cascade_rcnn.deploy.quantize`:
the backbone, FPN, RPN head and box heads' linear layers in int8; RoIAlign, box arithmetic and NMS in float32)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cascade_rcnn.errors import ConfigError

CALIBRATION_IMAGES = 32  # NNCF's advice is 300; 32 already gives stable per-tensor ranges for a detector's features
HELP = "Quantize a detector to int8 (OpenVINO IR), calibrated on a folder of images."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="weights file, or a known pretrained name")
    parser.add_argument("--calib-images", required=True, type=Path, help="folder of calibration images")
    parser.add_argument("--output", required=True, type=Path, help="the OpenVINO .xml file to write (and its .bin)")
    parser.add_argument("--preset", help="model preset (default: from the weights file's metadata)")
    parser.add_argument("--num-images", type=int, default=CALIBRATION_IMAGES,
                        help=f"calibrate on the folder's first N images in name order ({CALIBRATION_IMAGES})")


def run(args: argparse.Namespace) -> int:
    from cascade_rcnn.deploy.extras import require

    require("onnx", extra="int8", what="cascade-rcnn quantize")  # before the weights load: fail at once
    require("openvino", extra="int8", what="cascade-rcnn quantize")
    require("nncf", extra="int8", what="cascade-rcnn quantize")
    from cascade_rcnn.api import Detector
    from cascade_rcnn.commands.predict import images_in
    from cascade_rcnn.deploy.quantize import quantize_openvino

    if args.output.suffix.lower() != ".xml":
        raise ConfigError(f"--output: expected a .xml file name (OpenVINO IR), got {args.output}")
    if not args.calib_images.is_dir():
        raise ConfigError(f"--calib-images: {args.calib_images} is not a folder")
    if args.num_images < 1:
        raise ConfigError(f"--num-images: need at least 1, got {args.num_images}")
    images = images_in(args.calib_images)[: args.num_images]
    if not images:
        raise ConfigError(f"--calib-images: no images in {args.calib_images}")
    detector = Detector.from_weights(args.weights, preset=args.preset, optimize=False)
    path = quantize_openvino(detector.model, images, args.output, config=detector.config, preset=detector.preset,
                             log=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
    print(f"wrote {path} ({size / 1e6:.1f} MB, int8, calibrated on {len(images)} images)")
    return 0
