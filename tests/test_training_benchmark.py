"""`cascade-rcnn benchmark --train` runs end to end on a tiny setting and writes its figures. Timings are not checked
here (the benchmark prints ratios measured side by side; a timed test would depend on the machine and its load)."""

from __future__ import annotations

import json

from helpers import require_coco128
from test_training_fixtures import run_cli


def test_train_benchmark_runs_and_writes_its_keys(tmp_path):
    coco128 = require_coco128()
    out = tmp_path / "train_bench.json"
    done = run_cli("benchmark", "--train", "--train-data", str(coco128), "--train-sizes", "96x160",
                   "--train-steps", "1", "--train-profile", "--json", str(out), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("train_step_ratio_vs_torchvision", "train_bf16_speedup", "train_peak_rss_mb"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert set(result["train_peak_rss_mb_by_path"]) == {"cascade_fp32", "torchvision_faster_rcnn"}
    figures = result["train_by_size"]["96x160"]
    assert set(figures["seconds_per_step"]) == {"cascade_fp32", "cascade_bf16", "torchvision_faster_rcnn"}
    assert figures["image_sizes"] and all(min(size) == 96 for size in figures["image_sizes"])
    profile = result["train_profile"]
    assert {"forward", "backward", "optimizer"} <= set(profile["cascade_fp32"]["phase_seconds"])
    # Three box heads where torchvision has one: more FLOPs per step on the same backbone.
    assert profile["cascade_fp32"]["gflops_per_step"] > profile["torchvision_faster_rcnn"]["gflops_per_step"] > 0
    assert result["train_settings"]["cpu"]  # the CPU and its instruction sets, recorded with every figure
    assert "ours / torchvision step time" in done.stdout and "bf16 speed-up" in done.stdout
