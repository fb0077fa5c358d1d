"""bfloat16, or an int8 OpenVINO model, against float32 on a trained model: `cascade-rcnn benchmark --bf16-accuracy
WEIGHTS --images DIR --annotations JSON` (or `--int8-accuracy WEIGHTS --int8-model XML ...`), the source of the
README's bf16 and int8 accuracy figures.

bf16 runs the same weights (one `Detector.model`; the bf16 inference copy holds bfloat16 copies of them); int8 runs
the `cascade-rcnn quantize` output of those weights with OpenVINO. Both go over every image of a COCO annotation file,
one image at a time, beside float32. Reported:

- COCO AP and AP50 of each path (pycocotools, at the model's own score threshold);
- of the float32 detections scoring >= `min_score`, how many reappear in the other path with the same label and
  IoU > `min_iou`;
- for those pairs, each box's largest coordinate difference in pixels (median, 99th percentile, largest) and the score
  difference (median, largest).

On the demo's model: `cascade-rcnn demo --out demo_output`, then
`cascade-rcnn benchmark --bf16-accuracy demo_output/model.safetensors --images demo_output/data/val
--annotations demo_output/data/val.json`; for int8, `cascade-rcnn quantize --weights demo_output/model.safetensors
--calib-images demo_output/data/train --output demo_int8.xml` first, then `--int8-accuracy
demo_output/model.safetensors --int8-model demo_int8.xml` with the same --images and --annotations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from cascade_rcnn.errors import ConfigError
from cascade_rcnn.structures import Detections


@dataclass
class Agreement:
    """How far one set of detections reproduces a reference set (see `match_detections`)."""

    reference: int  # reference detections scoring >= min_score
    matched: int  # of those, the ones found again (same label, IoU > min_iou)
    box_diffs: Tensor  # (matched,) largest |coordinate difference| of each matched pair, pixels
    score_diffs: Tensor  # (matched,) |score difference| of each matched pair


def match_detections(
    reference_per_image: Sequence[Detections],
    other_per_image: Sequence[Detections],
    min_score: float = 0.3,
    min_iou: float = 0.9,
) -> Agreement:
    """Find each reference detection scoring >= `min_score` among the other detections of its image: the other
    detection of the same label (at any score) with the highest IoU, a match when that IoU is > `min_iou`.

    Two reference boxes of one label cannot both match one other box: after NMS at IoU 0.5 they overlap too little to
    both have IoU > 0.9 with it (for `min_iou` >= 0.8).
    """
    reference, box_diffs, score_diffs = 0, [], []
    for ref, other in zip(reference_per_image, other_per_image, strict=True):
        keep = ref.scores >= min_score
        boxes, scores, labels = ref.boxes[keep], ref.scores[keep], ref.labels[keep]
        reference += len(boxes)
        if len(boxes) == 0 or len(other) == 0:
            continue
        iou = box_iou(boxes, other.boxes) * (labels[:, None] == other.labels[None, :])
        best, index = iou.max(dim=1)
        found = best > min_iou
        box_diffs.append((boxes[found] - other.boxes[index[found]]).abs().amax(dim=1))
        score_diffs.append((scores[found] - other.scores[index[found]]).abs())
    box_diff = torch.cat(box_diffs) if box_diffs else torch.zeros(0)
    score_diff = torch.cat(score_diffs) if score_diffs else torch.zeros(0)
    return Agreement(reference=reference, matched=len(box_diff), box_diffs=box_diff, score_diffs=score_diff)


def _quantile(values: Tensor, q: float) -> float | None:
    return float(torch.quantile(values.double(), q)) if len(values) else None


def compare_bf16(weights: str | Path, images: Path, annotations: Path, *, threads: int = 2, **options: Any) -> dict:
    """float32 and bf16 runs of `weights` compared on every image of `annotations` (the module docstring's figures)."""
    from cascade_rcnn.api import Detector

    torch.set_num_threads(threads)
    fp32 = Detector.from_weights(weights)
    bf16 = Detector(fp32.preset, config=fp32.config, bf16=True, model=fp32.model)  # the same weights
    return compare_paths(weights, fp32, bf16, "bf16", images, annotations, threads=threads, **options)


def compare_int8(weights: str | Path, int8_model: Path, images: Path, annotations: Path, *, threads: int = 2,
                 **options: Any) -> dict:  # fmt: skip
    """float32 `weights` and their int8 OpenVINO model `int8_model` (`cascade-rcnn quantize`) compared likewise."""
    from cascade_rcnn.api import Detector
    from cascade_rcnn.deploy.openvino import OpenVinoDetector

    torch.set_num_threads(threads)
    fp32, int8 = Detector.from_weights(weights), OpenVinoDetector(int8_model, threads=threads)
    if tuple(int8.class_names) != tuple(fp32.class_names):
        raise ConfigError(f"{int8_model}: its classes {list(int8.class_names)} are not those of {weights} "
                          f"{list(fp32.class_names)}; quantize these weights")  # fmt: skip
    return compare_paths(weights, fp32, int8, "int8", images, annotations, threads=threads, **options)


def compare_paths(
    weights: str | Path,
    fp32: Any,
    other: Any,
    name: str,
    images: Path,
    annotations: Path,
    *,
    threads: int,
    min_score: float = 0.3,
    min_iou: float = 0.9,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the detectors `fp32` and `other` (called `name`) on every image of `annotations` (files under `images`);
    the figures of the module docstring, as a JSON-ready dict."""
    from cascade_rcnn.benchmarks.inference import cpu_description
    from cascade_rcnn.data.image_io import load_image
    from cascade_rcnn.evaluation.coco import (
        detections_to_coco,
        evaluate_coco,
        load_coco_gt,
        map_labels_to_category_ids,
    )

    gt = load_coco_gt(annotations)
    category_ids, _ = map_labels_to_category_ids(fp32.class_names, gt)
    records = sorted(gt.dataset["images"], key=lambda image: image["id"])
    outputs: dict[str, list[Detections]] = {"fp32": [], name: []}
    results: dict[str, list[dict]] = {"fp32": [], name: []}
    wh_plus_one = fp32.config.postprocess.coco_wh_plus_one
    for i, record in enumerate(records):
        pixels = load_image(images / record["file_name"])
        for path, detector in (("fp32", fp32), (name, other)):
            det = detector.predict(pixels)
            outputs[path].append(det)
            results[path] += detections_to_coco(record["id"], det.boxes, det.scores, det.labels, category_ids,
                                                wh_plus_one=wh_plus_one)  # fmt: skip
        if (i + 1) % 10 == 0 or i + 1 == len(records):
            log(f"  {i + 1}/{len(records)} images")
    metrics = {path: evaluate_coco(gt, dets).metrics for path, dets in results.items()}
    agreement = match_detections(outputs["fp32"], outputs[name], min_score, min_iou)
    return {
        "weights": str(weights),
        "other": name,
        "images": len(records),
        "AP": {path: m["AP"] for path, m in metrics.items()},
        "AP50": {path: m["AP50"] for path, m in metrics.items()},
        "min_score": min_score,
        "min_iou": min_iou,
        "fp32_detections_above_min_score": agreement.reference,
        f"matched_in_{name}": agreement.matched,
        "box_diff_px": {
            "median": _quantile(agreement.box_diffs, 0.5),
            "p99": _quantile(agreement.box_diffs, 0.99),
            "max": _quantile(agreement.box_diffs, 1.0),
        },
        "score_diff": {
            "median": _quantile(agreement.score_diffs, 0.5),
            "max": _quantile(agreement.score_diffs, 1.0),
        },
        "settings": {"threads": threads, "cpu": cpu_description(), "torch": torch.__version__},
    }


def report_accuracy(result: dict) -> str:
    """The comparison's figures as text."""

    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    name = result["other"]
    ap, ap50, box, score = result["AP"], result["AP50"], result["box_diff_px"], result["score_diff"]
    return "\n".join([
        f"{name} vs float32: {result['weights']}, {result['images']} images; CPU: {result['settings']['cpu']}; "
        f"torch {result['settings']['torch']}",
        f"COCO AP    fp32 {ap['fp32']:.3f}  {name} {ap[name]:.3f}  ({100 * (ap[name] - ap['fp32']):+.2f} points)",
        f"COCO AP50  fp32 {ap50['fp32']:.3f}  {name} {ap50[name]:.3f}",
        f"fp32 detections scoring >= {result['min_score']}: {result['fp32_detections_above_min_score']}; found in "
        f"{name} (same label, IoU > {result['min_iou']}): {result[f'matched_in_{name}']}",
        f"  box difference (largest coordinate): median {fmt(box['median'], '.3f')} px, 99th percentile "
        f"{fmt(box['p99'], '.3f')} px, largest {fmt(box['max'], '.3f')} px",
        f"  score difference: median {fmt(score['median'], '.1e')}, largest {fmt(score['max'], '.1e')}",
    ])  # fmt: skip
