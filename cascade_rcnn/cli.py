"""The `cascade-rcnn` command line.

Each subcommand lives in `cascade_rcnn/commands/<name>.py` and exposes `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int` (the exit code). Errors caused by user input (`CascadeRCNNError`) are printed on one line, without a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cascade_rcnn.errors import CascadeRCNNError

# Subcommand name -> module under cascade_rcnn.commands.
COMMANDS = {
    "predict": "predict",
    "eval": "eval",
    "train": "train",
    "demo": "demo",
    "data": "data",
    "convert": "convert",
    "export": "export",
    "quantize": "quantize",
    "benchmark": "benchmark",
    "serve": "serve",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of `command` alone: then only its module is imported (`serve` of an
    exported graph thus never imports torch)."""
    parser = argparse.ArgumentParser(prog="cascade-rcnn", description="Cascade R-CNN object detection in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if command is not None and name != command:
            continue
        module = importlib.import_module(f"cascade_rcnn.commands.{module_name}")
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CascadeRCNNError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
