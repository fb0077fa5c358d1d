"""Images per second of sharded predict on the CPU: N processes of T threads each, against one process using every
core with threads.

Each configuration runs the sharded path itself (`inference.sharding.ImageRun`: the shared batch counter, the
per-image records with fsync, rank 0's assembly of detections.json) over the same images, in fresh processes started
the way torchrun starts them (Gloo group, one intra-op thread each by default), with the same calibrated random
weights (`calibrated_weights.calibrate_cascade`: a trained model's amount of post-processing work). The clock starts
when every process has its model loaded and warmed up on one image, and stops when detections.json is written;
the figure is images / that time. Configurations alternate over `rounds`, so slow drifts of a shared machine's load
hit each alike; the best round of each is reported (the least disturbed), with every round kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class ProcessSettings:
    images: list[Path]  # the timed images (the first also calibrates the weights)
    preset: str = "cascade_rcnn_r50_fpn"
    min_size: int = 800
    max_size: int = 1333
    # (processes, intra-op threads of each): one threaded process, then torchrun's default of one thread per process.
    configurations: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (1, 1))
    rounds: int = 2
    seed: int = 0
    overrides: dict[str, object] = field(default_factory=dict)


def run_process_benchmark(settings: ProcessSettings, log: Callable[[str], None] = print) -> dict:
    """Time every configuration `settings.rounds` times; returns {"images", "configurations": [{"processes",
    "threads", "images_per_second": best, "rounds": [...]}, ...], ...} for `report`."""
    from cascade_rcnn.api import Detector, to_tensor_image
    from cascade_rcnn.benchmarks.calibrated_weights import calibrate_cascade

    s = settings
    overrides = {"transform.min_size": s.min_size, "transform.max_size": s.max_size, "postprocess.score_thresh": 0.0,
                 **s.overrides}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_processes_") as tmp:
        work = Path(tmp)
        log(f"calibrating random weights on {s.images[0].name} ...")
        detector = Detector(s.preset, **overrides)
        calibrate_cascade(detector.model, to_tensor_image(s.images[0]), s.seed)
        weights = detector.save(work / "calibrated.safetensors")
        del detector
        rates: dict[tuple[int, int], list[float]] = {c: [] for c in s.configurations}
        for round_index in range(s.rounds):
            # Alternate the order: no configuration always runs first, after the calibration, or after the same one.
            order = list(s.configurations) if round_index % 2 == 0 else list(reversed(s.configurations))
            for processes, threads in order:
                seconds = time_configuration(processes, threads, weights, s.images, work / f"out_{processes}x{threads}")
                rates[(processes, threads)].append(len(s.images) / seconds)
                log(f"  {processes} process(es) x {threads} thread(s): {len(s.images) / seconds:.3f} images/s")
    base = max(rates[s.configurations[0]])
    return {
        "images": len(s.images), "preset": s.preset, "size": f"{s.min_size}x{s.max_size}", "cpu_count": os.cpu_count(),
        "configurations": [{"processes": p, "threads": t, "images_per_second": round(max(r), 4),
                            "vs_first": round(max(r) / base, 3), "rounds": [round(v, 4) for v in r]}
                           for (p, t), r in rates.items()],
    }  # fmt: skip


def time_configuration(processes: int, threads: int, weights: Path, images: Sequence[Path], out: Path) -> float:
    """Seconds for `processes` fresh processes of `threads` threads to predict `images` through `ImageRun`, from
    all models ready to detections.json written."""
    import torch.multiprocessing as mp

    result = out / "seconds.json"
    out.mkdir(parents=True, exist_ok=True)
    args = (processes, threads, _free_port(), str(weights), [str(p) for p in images], str(out), str(result))
    mp.start_processes(_worker, args=args, nprocs=processes, join=True, start_method="spawn")
    return float(json.loads(result.read_text())["seconds"])


def _worker(rank: int, world_size: int, threads: int, port: int, weights: str, images: list[str], out: str,
            result: str) -> None:  # fmt: skip
    """One process of a configuration, as torchrun would start it (its environment, a Gloo group)."""
    torch.set_num_threads(threads)
    if world_size > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    from cascade_rcnn.api import Detector
    from cascade_rcnn.data.image_io import load_image
    from cascade_rcnn.evaluation.coco import detections_to_coco
    from cascade_rcnn.inference.sharding import ImageRun, join
    from cascade_rcnn.training.distributed import barrier

    shards = join("cpu")
    detector = Detector.from_weights(weights, device="cpu")
    category_ids = list(range(1, len(detector.class_names) + 1))
    with torch.inference_mode():
        detector.predict(load_image(images[0]))  # warm-up: first-call allocations and kernel choices
    barrier(shards.info)
    start = time.perf_counter()
    with ImageRun(Path(out) / "detections.json", images, shards=shards, command="benchmark", settings={},
                  progress=False) as run:
        for chunk in run.chunks(1):
            for index in chunk:
                with torch.inference_mode():
                    det = detector.predict(load_image(images[index]))
                run.add(index, detections_to_coco(index, det.boxes, det.scores, det.labels, category_ids))
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(result).write_text(json.dumps({"seconds": seconds}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(result: dict) -> str:
    """The table: images per second of each configuration and its ratio to the first (one threaded process)."""
    first = result["configurations"][0]
    base = f"vs {first['processes']}x{first['threads']}"
    lines = [f"sharded predict on the CPU: {result['images']} images, {result['preset']} at {result['size']}, "
             f"{result['cpu_count']} logical CPUs; best of {len(first['rounds'])} rounds",
             f"{'processes x threads':<22}{'images/s':>10}{base:>10}"]  # fmt: skip
    for c in result["configurations"]:
        lines.append(f"{str(c['processes']) + ' x ' + str(c['threads']):<22}{c['images_per_second']:>10.3f}"
                     f"{c['vs_first']:>10.2f}")  # fmt: skip
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The process benchmark's own flags (`--rounds`, `--configurations`), on a parser or an argument group; it also
    reads `--images`, `--num-images`, `--size` and `--json`, which `cascade-rcnn benchmark` already has."""
    parser.add_argument("--rounds", type=int, default=2, help="with --processes: runs of each configuration (2)")
    parser.add_argument("--configurations", default="1x2,2x1,1x1", metavar="PxT,...",
                        help="with --processes: PROCESSESxTHREADS each, the first the base (1x2,2x1,1x1)")


def run_from_args(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    from cascade_rcnn.commands.predict import images_in
    from cascade_rcnn.errors import ConfigError

    if not args.images.is_dir():
        raise ConfigError(f"--images: {args.images} is not a folder")
    images = images_in(args.images)[: args.num_images]
    if not images:
        raise ConfigError(f"--images: no images in {args.images}")
    try:
        short, long = (int(v) for v in args.size.lower().split("x"))
        configurations = tuple(tuple(int(v) for v in item.lower().split("x")) for item in args.configurations.split(","))
    except ValueError:
        raise ConfigError("--size and --configurations: NxM numbers, e.g. 800x1333 and 1x2,2x1") from None
    if any(len(c) != 2 or min(c) < 1 for c in configurations) or args.rounds < 1:
        raise ConfigError(f"--configurations {args.configurations}: PROCESSESxTHREADS, each at least 1; --rounds >= 1")
    settings = ProcessSettings(images=images, min_size=short, max_size=long, rounds=args.rounds,
                               configurations=configurations)  # type: ignore[arg-type]  # fmt: skip
    result = run_process_benchmark(settings, log=log)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cascade_rcnn.benchmarks.processes [--images DIR] [--num-images N] [--size SxL] [--rounds R]
    [--configurations PxT,...] [--json FILE]`: the figures of `cascade-rcnn benchmark --processes`."""
    default_images = Path(os.environ.get("CASCADE_RCNN_COCO128", "../shared/data/coco128")) / "val2017"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=default_images, help=f"folder of images ({default_images})")
    parser.add_argument("--num-images", type=int, default=8, help="timed images, the folder's first by name (8)")
    parser.add_argument("--size", default="800x1333", help="short side x long-side cap of the resize (800x1333)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
