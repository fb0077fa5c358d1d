"""`cascade-rcnn benchmark`: CPU speed of the detector's inference paths against torchvision's Faster R-CNN.

Times, on the same images interleaved image by image and with the same thread count: our PyTorch fp32 path, its
bf16 autocast path, the ONNX Runtime path, OpenVINO fp32 and int8 (NNCF-calibrated on `--int8-calib-images` untimed
images of the folder; `int8_speedup`, `openvino_fp32_speedup`, `int8_peak_rss_mb`, `cpu_isa` in the JSON), and
torchvision's Faster R-CNN R50-FPN as its pretrained builder builds
it; every model gets calibrated random weights (so that all do the same post-processing work: score threshold 0, 100
detections, 1000 proposals). Prints seconds per image and their ratios, FLOPs and parameters, the achieved GFLOP/s
against this CPU's matmul rate measured in the same run, the batch-of-4 throughput gain and the peak resident memory
of one image in a fresh process; `--json FILE` writes the same figures. Beside the box model it times the preset's
Cascade Mask R-CNN sibling with the same box weights, and reports what masks add per image (mask heads on the 100
detections and the paste into the image: `mask_extra_ms_per_image`, the paste alone, GFLOPs) and to the peak memory
(`mask_peak_rss_extra_mb`); `--no-masks` skips it.

`--bf16-accuracy WEIGHTS --images DIR --annotations JSON` instead compares bf16 with float32 on a trained model
(`cascade_rcnn.benchmarks.bf16_accuracy`): COCO AP of each, and how closely bf16 reproduces float32's detections;
`--int8-accuracy WEIGHTS --int8-model XML` does the same for the int8 OpenVINO model `cascade-rcnn quantize` made of
those weights.

`--processes` instead times predict sharded over processes as torchrun runs it (`cascade_rcnn.benchmarks.processes`):
images per second of `--configurations` (PROCESSESxTHREADS; one process with two threads, two with one, one with one
by default) over `--num-images` images, the best of `--rounds`.

`--train` instead times a training step (`cascade_rcnn.benchmarks.training`): batch 2 of coco128 training images with
their boxes, at each `--train-sizes`, beside torchvision's Faster R-CNN step, with the bf16 autocast speed-up and the
peak memory of one step of each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cascade_rcnn.benchmarks.processes import add_arguments as add_process_arguments
from cascade_rcnn.errors import ConfigError

HELP = "Time the inference paths (fp32, bf16, ONNX Runtime, OpenVINO fp32 and int8) against torchvision's Faster R-CNN."

DEFAULT_IMAGES = Path(os.environ.get("CASCADE_RCNN_COCO128", "../shared/data/coco128")) / "val2017"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cascade_rcnn_r50_fpn", help="model preset (cascade_rcnn_r50_fpn)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help=f"folder of images ({DEFAULT_IMAGES})")
    parser.add_argument("--num-images", type=int, default=4, help="timed images, the folder's first in name order (4)")
    parser.add_argument("--size", default="800x1333", help="short side x long-side cap of the resize (800x1333)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every path (2)")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the batched-throughput measurement (4)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 path (slow on CPUs without bf16)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime path")
    parser.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO paths (fp32 and int8)")
    parser.add_argument("--no-int8", action="store_true", help="skip the OpenVINO int8 path")
    parser.add_argument("--int8-calib-images", type=int, default=8,
                        help="calibrate int8 on this many of the folder's untimed images (8)")
    parser.add_argument("--no-torchvision", action="store_true", help="skip torchvision's Faster R-CNN")
    parser.add_argument("--no-masks", action="store_true", help="skip the preset's Cascade Mask R-CNN sibling")
    parser.add_argument("--memory-runs", type=int, default=3,
                        help="fresh processes measuring the box and mask models' peak memory, each (3; the median)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--bf16-accuracy", metavar="WEIGHTS",
                        help="instead of timing: bf16 vs float32 accuracy of these weights on --images/--annotations")
    parser.add_argument("--int8-accuracy", metavar="WEIGHTS",
                        help="instead of timing: accuracy of --int8-model (quantized from these weights) vs float32")
    parser.add_argument("--int8-model", type=Path, metavar="XML",
                        help="the int8 OpenVINO model of --int8-accuracy's weights (cascade-rcnn quantize)")
    parser.add_argument("--annotations", type=Path, metavar="JSON",
                        help="COCO file of --images (--bf16-accuracy, --int8-accuracy)")
    train = parser.add_argument_group("training step (--train)")
    train.add_argument("--train", action="store_true", help="instead: time a training step beside torchvision's")
    train.add_argument("--train-data", type=Path, default=DEFAULT_IMAGES.parent,
                       help=f"coco128 folder: train2017/, val2017/, annotations/ ({DEFAULT_IMAGES.parent})")
    train.add_argument("--train-sizes", default="800x1333,512x853", help="comma-separated sizes (800x1333,512x853)")
    train.add_argument("--train-steps", type=int, default=3, help="timed steps per path and size (3)")
    train.add_argument("--train-profile", action="store_true", help="also profile one step of each (torch.profiler)")
    processes = parser.add_argument_group("sharded predict (--processes)")
    processes.add_argument("--processes", action="store_true",
                           help="instead: images/s of predict sharded over processes (as torchrun runs it) against "
                                "one threaded process (cascade_rcnn.benchmarks.processes)")  # fmt: skip
    add_process_arguments(processes)


def parse_size(text: str) -> tuple[int, int]:
    try:
        short, long = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size: expected SHORTxLONG such as 800x1333, got {text!r}") from None
    if not 0 < short <= long:
        raise ConfigError(f"--size: need 0 < short side <= long side, got {text!r}")
    return short, long


def run(args: argparse.Namespace) -> int:
    if args.processes:
        from cascade_rcnn.benchmarks.processes import run_from_args

        return run_from_args(args)
    if args.bf16_accuracy or args.int8_accuracy:
        return run_accuracy(args)
    if args.train:
        return run_train(args)
    from cascade_rcnn.benchmarks.inference import CALIBRATION_IMAGE, BenchmarkSettings, report, run_benchmark
    from cascade_rcnn.commands.predict import images_in

    min_size, max_size = parse_size(args.size)
    if args.memory_runs < 1:
        raise ConfigError(f"--memory-runs must be at least 1, got {args.memory_runs}")
    if not args.images.is_dir():
        raise ConfigError(f"--images: {args.images} is not a folder (coco128's val2017 is the default)")
    files = images_in(args.images)
    calibration = next((p for p in files if p.name == CALIBRATION_IMAGE), files[-1] if files else None)
    timed = [p for p in files if p != calibration][: args.num_images]
    if not timed:
        raise ConfigError(f"--images: {args.images} needs at least two images (one calibrates, the rest are timed)")
    settings = BenchmarkSettings(
        images=timed,
        calibration_image=calibration,
        preset=args.preset,
        min_size=min_size,
        max_size=max_size,
        threads=args.threads,
        batch=args.batch,
        bf16=not args.no_bf16,
        onnx=not args.no_onnx,
        openvino=not args.no_openvino,
        int8=not (args.no_openvino or args.no_int8),
        int8_calibration_images=[p for p in files if p not in timed][: args.int8_calib_images],
        torchvision=not args.no_torchvision,
        masks=not args.no_masks,
        memory_runs=args.memory_runs,
    )
    result = run_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report(result))
    write_json(args.json, result)
    return 0


def run_accuracy(args: argparse.Namespace) -> int:
    from cascade_rcnn.benchmarks.bf16_accuracy import compare_bf16, compare_int8, report_accuracy

    flag = "--bf16-accuracy" if args.bf16_accuracy else "--int8-accuracy"
    if args.annotations is None:
        raise ConfigError(f"{flag} needs --annotations (a COCO file of the --images folder)")
    options = {"threads": args.threads, "log": lambda line: print(line, file=sys.stderr, flush=True)}
    if args.bf16_accuracy:
        result = compare_bf16(args.bf16_accuracy, args.images, args.annotations, **options)
    elif args.int8_model is None:
        raise ConfigError("--int8-accuracy needs --int8-model (the .xml that cascade-rcnn quantize wrote from them)")
    else:
        result = compare_int8(args.int8_accuracy, args.int8_model, args.images, args.annotations, **options)
    print(report_accuracy(result))
    write_json(args.json, result)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from cascade_rcnn.benchmarks.training import TrainBenchmarkSettings, report, run_train_benchmark

    sizes = tuple(parse_size(size) for size in args.train_sizes.split(","))
    if not (args.train_data / "annotations" / "instances_train2017.json").is_file():
        raise ConfigError(f"--train-data: {args.train_data} has no annotations/instances_train2017.json (coco128)")
    settings = TrainBenchmarkSettings(data_root=args.train_data, preset=args.preset, sizes=sizes,
                                      steps=args.train_steps, threads=args.threads, bf16=not args.no_bf16,
                                      torchvision=not args.no_torchvision, profile=args.train_profile)  # fmt: skip
    result = run_train_benchmark(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report(result))
    write_json(args.json, result)
    return 0


def write_json(path: Path | None, result: dict) -> None:
    """The figures as JSON at `path` (`--json`), when given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
