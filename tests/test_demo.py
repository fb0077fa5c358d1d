"""`cascade-rcnn demo`, shortened to two iterations: every promised output is there and usable. (Whether the full
demo learns is measured by running it: see the README; a test of that would take minutes.)"""

from __future__ import annotations

import json

from test_training_fixtures import run_cli

from cascade_rcnn.evaluation.coco import METRIC_NAMES


def test_short_demo_leaves_every_output(tmp_path):
    out = tmp_path / "demo"
    done = run_cli("demo", "--out", str(out), "--epochs", "1", "--num-train", "8", "--num-val", "4", "--max-iters",
                   "2", "--draw", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AP50" in done.stdout and "wall time" in done.stdout
    assert "AR100" in done.stdout  # the COCO table was printed

    from cascade_rcnn.api import Detector

    detector = Detector.from_weights(out / "model.safetensors")
    assert detector.class_names == ("circle", "square", "triangle", "cross")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == list(METRIC_NAMES)
    for split, count in (("train", 8), ("val", 4)):
        coco = json.loads((out / "data" / f"{split}.json").read_text())
        assert len(coco["images"]) == count and len(list((out / "data" / split).glob("*.png"))) == count
    assert len(list((out / "predictions").glob("*.png"))) == 2
    assert isinstance(json.loads((out / "detections.json").read_text()), list)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["iterations"] == 2 and summary["AP50"] == metrics["AP50"]


def test_short_mask_demo_scores_boxes_and_masks(tmp_path):
    """`demo --masks`: Cascade Mask R-CNN trained on the shapes' exact masks (their COCO RLEs), scored as boxes and as
    masks, the detections written with their masks."""
    out = tmp_path / "demo"
    done = run_cli("demo", "--masks", "--out", str(out), "--epochs", "1", "--num-train", "8", "--num-val", "4",
                   "--max-iters", "2", "--draw", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mask AP50" in done.stdout

    from cascade_rcnn.api import Detector

    detector = Detector.from_weights(out / "model.safetensors")
    assert detector.config.has_masks and detector.config.mask.conv_dim == 64
    box, segm = (json.loads((out / name).read_text()) for name in ("metrics.json", "metrics_segm.json"))
    assert list(segm) == list(METRIC_NAMES)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["AP"] == box["AP"] and summary["mask_AP"] == segm["AP"] and summary["mask_AP50"] == segm["AP50"]
    detections = json.loads((out / "detections.json").read_text())
    assert detections and all(set(d["segmentation"]) == {"size", "counts"} for d in detections)
