"""Peak memory of sliced inference beyond the decoded image, at several image sizes (issue 14's bound).

    python -m cascade_rcnn.benchmarks.tiling_memory --weights demo_output/model.safetensors --sizes 5000,10000,20000

Each size runs in a fresh process: an (S, S, 3) uint8 image is made by repeating a 4000x3000 image of the large
synthetic set (`data synth --large`; small shapes everywhere, so every slice has detections to merge), the model is
loaded and warmed up on one slice, and the resident set size (RSS, sampled every 5 ms by a thread) is read before and
during `Detector.predict(image, tile=...)`. The bound holds when `peak - before` does not grow with S. Prints one JSON
line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Tracks the peak RSS of this process from `start()` to `stop()`."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._running = interval, 0, False

    def start(self) -> None:
        self.peak, self._running = _rss_bytes(), True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


def measure(weights: str, size: int, tile: int, overlap: float, source: Path) -> dict[str, float]:
    import numpy as np
    import torch

    from cascade_rcnn.api import Detector
    from cascade_rcnn.data.image_io import load_image
    from cascade_rcnn.inference import TileConfig

    torch.set_grad_enabled(False)
    detector = Detector.from_weights(weights)
    unit = load_image(source)
    reps = (-(-size // unit.shape[0]), -(-size // unit.shape[1]), 1)
    image = np.ascontiguousarray(np.tile(unit, reps)[:size, :size])
    del unit
    config = TileConfig(size=tile, overlap=overlap)
    detector.predict(image[:tile, :tile].copy(), tile=config)  # warm-up: the model's own buffers, one slice
    before = _rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    result = detector.predict(image, tile=config)
    elapsed = time.perf_counter() - started
    peak = sampler.stop()
    mib = 1024 * 1024
    return {"size": size, "tile": tile, "overlap": overlap, "image_mib": round(image.nbytes / mib, 1),
            "rss_before_mib": round(before / mib, 1), "rss_peak_mib": round(peak / mib, 1),
            "beyond_image_mib": round((peak - before) / mib, 1), "detections": len(result),
            "seconds": round(elapsed, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--source", type=Path, required=True, help="a 4000x3000 image of `data synth --large`")
    parser.add_argument("--sizes", default="5000,10000,20000", help="image sides to measure (5000,10000,20000)")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.weights, args.child, args.tile, args.overlap, args.source)), flush=True)
        return 0
    for size in (int(s) for s in args.sizes.split(",")):
        command = [sys.executable, "-m", "cascade_rcnn.benchmarks.tiling_memory", "--weights", args.weights,
                   "--source", str(args.source), "--tile", str(args.tile), "--overlap", str(args.overlap),
                   "--child", str(size)]  # fmt: skip
        subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
