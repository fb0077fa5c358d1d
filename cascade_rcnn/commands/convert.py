"""`cascade-rcnn convert`: any weights file the project reads -> the project's safetensors format.

    cascade-rcnn convert cascade_rcnn_r50_fpn_1x_coco_20200316-3dc56deb.pth --output r50.safetensors

The source is read by content (mmdetection `.pth`, detectron2 `.pkl`, MindSpore `.ckpt`, safetensors) and loaded into
the model it describes, so a converted file is known to load: a missing tensor stops the conversion with its name. The
output holds the config, the preset and the class names (taken from the checkpoint's `meta` when it has them), so
`--weights OUT.safetensors` alone rebuilds the detector. The load report (loaded, missing, unexpected, skipped) is
printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cascade_rcnn.errors import CheckpointError

HELP = "Convert weights (mmdetection .pth, detectron2 .pkl, MindSpore .ckpt) to the project's safetensors format."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="SRC", help="weights file to convert")
    parser.add_argument("--output", "-o", required=True, type=Path, metavar="DST", help="output .safetensors file")
    parser.add_argument("--preset", help="model preset (default: inferred from the weights)")


def run(args: argparse.Namespace) -> int:
    # Imported here so that `cascade-rcnn --help` does not build the model code.
    from cascade_rcnn.api import Detector
    from cascade_rcnn.io.weights import load_checkpoint, load_into_model

    source: Path = args.source
    output: Path = args.output
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise CheckpointError(f"{output}: the output would overwrite the source")
    checkpoint = load_checkpoint(source, args.preset)
    detector = Detector(checkpoint.preset or "cascade_rcnn_r50_fpn", config=checkpoint.config)
    report = load_into_model(detector.model, checkpoint.state_dict, skipped=checkpoint.skipped)
    print(f"{source}: {checkpoint.source_format} checkpoint, preset {detector.preset}")
    print(report.summary())
    names = detector.config.class_names
    if names:
        print(f"classes: {len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    else:
        print(f"classes: {detector.config.num_classes}, no names in the checkpoint")
    detector.save(output)
    print(f"wrote {output}")
    return 0
