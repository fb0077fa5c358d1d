"""One module per CLI command (see `cascade_rcnn.cli`), and the arguments they share (no torch imported here: `serve`
runs an exported graph in a process without it)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_bf16_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bf16", action="store_true",
        help="run convolutions and linear layers in bfloat16 (torch backend; fast on CPUs with AVX512-BF16 or AMX)",
    )  # fmt: skip


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
        help="torch; onnxruntime: run an exported .onnx file (or export --weights on the fly) with ONNX Runtime; "
        "openvino: run an exported or quantized OpenVINO .xml file (or export --weights on the fly)",
    )  # fmt: skip


def backend_device(args: argparse.Namespace) -> str | None:
    """`--device`, or the CPU for the ONNX Runtime and OpenVINO backends (which run there)."""
    return args.device or ("cpu" if getattr(args, "backend", "torch") != "torch" else None)
