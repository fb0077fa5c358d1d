"""COCO evaluation: numbers equal pycocotools' own, ground truth scores AP 1, results files stream, ids are checked."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cascade_rcnn.config import COCO_CLASSES
from cascade_rcnn.errors import DatasetError
from cascade_rcnn.evaluation.coco import (
    COCO_CATEGORY_IDS,
    METRIC_NAMES,
    CocoResultsWriter,
    detections_to_coco,
    evaluate_coco,
    load_coco_gt,
    map_labels_to_category_ids,
)

COCO128 = Path(
    os.environ.get("CASCADE_RCNN_COCO128", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco128")
)
VAL_JSON = COCO128 / "annotations" / "instances_val2017.json"
needs_coco128 = pytest.mark.skipif(
    not VAL_JSON.is_file(), reason=f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128 to its folder)"
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _gt_as_detections(dataset: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in dataset["annotations"]
        if not a.get("iscrowd", 0)
    ]


def _perturbed_detections(dataset: dict, seed: int = 0) -> list[dict]:
    """Ground truth with jittered boxes, random scores, some boxes dropped and some false positives added."""
    rng = np.random.default_rng(seed)
    dets = []
    for ann in dataset["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        x, y = x + rng.normal(0, 0.08 * w), y + rng.normal(0, 0.08 * h)
        w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [x, y, w, h],
                     "score": float(rng.uniform(0.05, 1.0))})  # fmt: skip
    images = dataset["images"]
    cat_ids = [c["id"] for c in dataset["categories"]]
    for _ in range(200):
        image = images[rng.integers(len(images))]
        w, h = rng.uniform(10, 200, size=2)
        dets.append({"image_id": image["id"], "category_id": int(rng.choice(cat_ids)),
                     "bbox": [float(rng.uniform(0, image["width"] - w)), float(rng.uniform(0, image["height"] - h)),
                              float(w), float(h)],
                     "score": float(rng.uniform(0.05, 0.6))})  # fmt: skip
    return dets


def _pycocotools_stats(gt_path: Path, results_path: Path, cat_ids: list[int] | None = None) -> np.ndarray:
    """pycocotools run by hand, as its README shows."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(results_path))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if cat_ids is not None:
            evaluator.params.catIds = cat_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.fixture(scope="module")
def val_dataset() -> dict:
    if not VAL_JSON.is_file():
        pytest.skip(f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128 to its folder)")
    return json.loads(VAL_JSON.read_text())


def _tiny_gt(tmp_path: Path) -> Path:
    """Two images, three categories (ids 1, 3, 18 like COCO person, car, dog)."""
    dataset = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 40], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [50, 20, 40, 30], "area": 1200, "iscrowd": 0},
        ],
    }  # fmt: skip
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(dataset))
    return path


# --- evaluate_coco on real COCO annotations ---------------------------------------------------------------------------


@needs_coco128
def test_ground_truth_as_detections_scores_ap_one(val_dataset: dict) -> None:
    result = evaluate_coco(VAL_JSON, _gt_as_detections(val_dataset))
    # pycocotools divides by (tp + fp + eps), so a perfect precision is 1 - 2e-16, not 1: compare to 1e-12.
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert result.metrics[name] == pytest.approx(1.0, abs=1e-12), name
    # Every category with ground truth is perfect; the 7 of the 80 without any are -1, as COCO reports them.
    annotated = {c["name"] for c in val_dataset["categories"]
                 if any(a["category_id"] == c["id"] for a in val_dataset["annotations"])}  # fmt: skip
    assert len(annotated) == 73
    assert {name for name, ap in result.per_class.items() if ap == pytest.approx(1.0, abs=1e-12)} == annotated
    assert all(ap == -1.0 for name, ap in result.per_class.items() if name not in annotated)
    assert "AP      0.50:0.95  all         100   1.000" in result.format_table()


@needs_coco128
def test_results_file_gives_exactly_pycocotools_numbers(val_dataset: dict, tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(_perturbed_detections(val_dataset)))

    result = evaluate_coco(VAL_JSON, results_path)

    expected = _pycocotools_stats(VAL_JSON, results_path)
    assert list(result.metrics) == list(METRIC_NAMES)
    assert [result.metrics[name] for name in METRIC_NAMES] == [float(v) for v in expected]
    assert 0.2 < result.metrics["AP"] < 0.9  # the perturbation really changed the score: the comparison means something
    # Per-class AP equals pycocotools run on that one category alone.
    for cat_id in (1, 3, 62, 64):
        name = next(c["name"] for c in val_dataset["categories"] if c["id"] == cat_id)
        assert result.per_class[name] == float(_pycocotools_stats(VAL_JSON, results_path, [cat_id])[0])


@needs_coco128
def test_out_dir_gets_metrics_json_and_pr_curve_pngs(val_dataset: dict, tmp_path: Path) -> None:
    result = evaluate_coco(VAL_JSON, _perturbed_detections(val_dataset, seed=1), out_dir=tmp_path)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics == result.metrics
    assert json.loads((tmp_path / "per_class_ap.json").read_text()) == result.per_class
    pngs = [tmp_path / "pr_curves" / f"pr_iou{iou:.2f}.png" for iou in np.linspace(0.5, 0.95, 10)] + [
        tmp_path / "pr_curves.png"
    ]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE, png
        with Image.open(png) as image:
            image.verify()
    assert sorted(p.name for p in (tmp_path / "pr_curves").iterdir()) == sorted(p.name for p in pngs[:-1])
    # The mean PR curve at IoU t averages to COCO's AP at t: AP50 and AP75 read off the curves match the metrics.
    assert result.pr_curve(0).mean() == pytest.approx(result.metrics["AP50"], abs=1e-12)
    assert result.pr_curve(5).mean() == pytest.approx(result.metrics["AP75"], abs=1e-12)


@needs_coco128
def test_empty_detections_give_zero_where_ground_truth_exists(val_dataset: dict, tmp_path: Path) -> None:
    empty = evaluate_coco(VAL_JSON, [], out_dir=tmp_path)
    perfect = evaluate_coco(VAL_JSON, _gt_as_detections(val_dataset))
    # -1 exactly where COCO has nothing to score (no ground truth in that area range), 0 everywhere else.
    assert empty.metrics == {k: (-1.0 if v == -1.0 else 0.0) for k, v in perfect.metrics.items()}
    assert empty.per_class == {k: (-1.0 if v == -1.0 else 0.0) for k, v in perfect.per_class.items()}
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "pr_curves.png").is_file()


@needs_coco128
def test_image_ids_restrict_evaluation(val_dataset: dict) -> None:
    first_ids = sorted(image["id"] for image in val_dataset["images"])[:10]
    dets = [d for d in _gt_as_detections(val_dataset) if d["image_id"] in first_ids]
    assert evaluate_coco(VAL_JSON, dets, image_ids=first_ids).metrics["AP"] == 1.0
    assert evaluate_coco(VAL_JSON, dets).metrics["AP"] < 0.5  # the other 118 images' objects count as missed


@needs_coco128
def test_caller_detections_not_mutated(val_dataset: dict) -> None:
    dets = _gt_as_detections(val_dataset)[:50]
    before = copy.deepcopy(dets)
    evaluate_coco(VAL_JSON, dets)
    assert dets == before  # pycocotools' loadRes adds id/area/segmentation keys to what it is given


@needs_coco128
def test_coco_category_ids_match_the_annotation_file(val_dataset: dict) -> None:
    by_id = {c["id"]: c["name"] for c in val_dataset["categories"]}
    assert list(COCO_CATEGORY_IDS) == sorted(by_id)
    assert [by_id[i] for i in COCO_CATEGORY_IDS] == list(COCO_CLASSES)


# --- input checks -----------------------------------------------------------------------------------------------------


def test_unknown_image_and_category_ids_are_named(tmp_path: Path) -> None:
    gt = _tiny_gt(tmp_path)
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 40], "score": 0.9},
        {"image_id": 999999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5},
        {"image_id": 2, "category_id": 12, "bbox": [0, 0, 5, 5], "score": 0.5},
    ]
    with pytest.raises(DatasetError) as info:
        evaluate_coco(gt, dets)
    message = str(info.value)
    assert "image_id 999999" in message and "category_id 12" in message
    assert len(info.value.problems) == 2


def test_malformed_detections_and_files_are_dataset_errors(tmp_path: Path) -> None:
    gt = _tiny_gt(tmp_path)
    with pytest.raises(DatasetError, match=r"detections\[0\]: missing score"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(DatasetError, match="bbox must be 4 finite numbers"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 1.0}])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json: cannot read detections JSON"):
        evaluate_coco(gt, bad)
    with pytest.raises(DatasetError, match="missing.json: annotation file not found"):
        evaluate_coco(tmp_path / "missing.json", [])
    not_list = tmp_path / "dict.json"
    not_list.write_text("{}")
    with pytest.raises(DatasetError, match="JSON list"):
        evaluate_coco(gt, not_list)


def test_tiny_set_scores_known_values(tmp_path: Path) -> None:
    """One of two objects found exactly, plus a false positive scored below it: AP = 0.5 at every IoU."""
    gt = _tiny_gt(tmp_path)
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 40], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [60, 40, 20, 20], "score": 0.3},
    ]
    result = evaluate_coco(gt, dets)
    assert result.per_class == {"person": pytest.approx(1.0, abs=1e-12), "car": 0.0, "dog": -1.0}
    assert result.metrics["AP"] == pytest.approx(0.5)
    assert result.metrics["AR100"] == pytest.approx(0.5)


# --- label mapping ----------------------------------------------------------------------------------------------------


def test_label_mapping_rules(tmp_path: Path) -> None:
    gt = load_coco_gt(_tiny_gt(tmp_path))
    # Same names, another order: by name (position would swap classes).
    assert map_labels_to_category_ids(("dog", "Person", "car"), gt) == ([18, 1, 3], "by class name")
    # Same count, other names: by position in the sorted ids.
    assert map_labels_to_category_ids(("a", "b", "c"), gt) == ([1, 3, 18], "by position in the sorted category ids")
    # More model classes that cover every category: by name, the extra class dropped.
    assert map_labels_to_category_ids(("car", "cat", "dog", "person"), gt) == ([3, None, 18, 1], "by class name")
    with pytest.raises(DatasetError) as info:
        map_labels_to_category_ids(("car", "bus"), gt)
    assert "'person' (id 1)" in str(info.value) and "'dog' (id 18)" in str(info.value)
    assert "'car'" not in str(info.value)


# --- results conversion and streaming writer --------------------------------------------------------------------------


def test_detections_to_coco_converts_boxes_and_labels() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.5, 1.5, 2.5, 4.5], [1.0, 1.0, 2.0, 2.0]])
    results = detections_to_coco(7, boxes, torch.tensor([0.9, 0.25, 0.1]), torch.tensor([1, 0, 2]), [5, 3, None],
                                 file_name="x.jpg")  # fmt: skip
    assert results == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9),
         "file_name": "x.jpg"},
        {"image_id": 7, "category_id": 5, "bbox": [0.5, 1.5, 2.0, 3.0], "score": 0.25, "file_name": "x.jpg"},
    ]  # fmt: skip
    with pytest.raises(DatasetError, match="label 3 has no category id"):
        detections_to_coco(1, boxes[:1], [0.5], [3], [1, 2, 3])


def test_streaming_writer_equals_in_memory_list(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    category_ids = list(COCO_CATEGORY_IDS)
    expected = []
    path = tmp_path / "sub" / "detections.json"
    with CocoResultsWriter(path, category_ids) as writer:
        for image_id, n in enumerate([3, 0, 5, 1], start=100):
            xy = rng.uniform(0, 300, size=(n, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(1, 100, size=(n, 2))], axis=1).astype(np.float32)
            scores = rng.uniform(size=n).astype(np.float32)
            labels = rng.integers(0, 80, size=n)
            as_tensors = (torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels))
            assert writer.add(image_id, *as_tensors) == n
            expected += detections_to_coco(image_id, boxes, scores, labels, category_ids)
    assert writer.count == 9
    loaded = json.loads(path.read_text())
    assert loaded == expected  # float32 -> Python float -> JSON -> float is exact: nothing lost on the way
    # And against the raw arrays, independently of detections_to_coco: xyxy -> xywh, labels -> COCO ids.
    last = loaded[-1]
    assert last["image_id"] == 103 and last["category_id"] == category_ids[int(labels[0])]
    assert last["bbox"] == [float(boxes[0, 0]), float(boxes[0, 1]), float(boxes[0, 2]) - float(boxes[0, 0]),
                            float(boxes[0, 3]) - float(boxes[0, 1])]  # fmt: skip
    assert last["score"] == float(scores[0])


def test_streaming_writer_empty_and_on_error_is_valid_json(tmp_path: Path) -> None:
    with CocoResultsWriter(tmp_path / "empty.json", [1]):
        pass
    assert json.loads((tmp_path / "empty.json").read_text()) == []
    with pytest.raises(RuntimeError), CocoResultsWriter(tmp_path / "partial.json", [1]) as writer:
        writer.add(1, [[0, 0, 2, 2]], [0.5], [0])
        raise RuntimeError("model crashed")
    assert json.loads((tmp_path / "partial.json").read_text()) == [
        {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 2.0], "score": 0.5}
    ]
    with pytest.raises(ValueError, match="closed"):
        writer.add(1, [[0, 0, 2, 2]], [0.5], [0])
