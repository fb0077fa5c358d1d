"""Peak resident memory, measured in fresh processes; no torch here, so that a torch-free path's figure is its own.

    peak, runtime = peak_rss_in_child("cascade_rcnn.benchmarks.memory", "lean_peak_rss('int8.xml', 'a.jpg', 2)")
"""

from __future__ import annotations

import json
from pathlib import Path


def proc_status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB (ru_maxrss where there is no /proc)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            return next(float(line.split()[1]) / 1024.0 for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_in_child(module: str, call: str) -> tuple[float, float]:
    """(peak RSS, runtime RSS) in MB that `module.call` (a Python expression returning them) reports when run in a
    fresh Python process, so that one measurement's peak is not another's."""
    import os
    import subprocess
    import sys

    code = f"import json, {module} as m; print(json.dumps(m.{call}))"
    env = dict(os.environ)
    # The child imports this package from where this process found it (the repository root).
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child process failed:\n{out.stderr[-2000:]}")
    peak, runtime = json.loads(out.stdout.strip().splitlines()[-1])
    return float(peak), float(runtime)


def lean_peak_rss(graph: str, image: str, threads: int) -> tuple[float, float]:
    """In a fresh process: `LeanDetector` (numpy and the runtime, no torch) on `graph` detects on `image`. Returns
    the process's peak resident memory in MB, and its resident memory once the runtime is imported (before the model
    is read)."""
    import importlib
    import sys

    from cascade_rcnn.deploy.lean import LeanDetector

    importlib.import_module("openvino" if graph.endswith(".xml") else "onnxruntime")
    runtime = proc_status_mb("VmRSS")
    LeanDetector(graph, threads=threads).predict(image)
    if "torch" in sys.modules:
        raise RuntimeError("the lean runtime imported torch")
    return proc_status_mb("VmHWM"), runtime
