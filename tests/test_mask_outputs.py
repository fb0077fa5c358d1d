"""A mask model's outputs: `segmentation` RLEs in the COCO results files, mask overlays in the drawn pictures,
`predict --save-masks` instance-id PNGs, and `eval`'s segm metrics (pycocotools' own numbers), with box-only models and
box-only annotation files behaving as before.

Most tests run a tiny untrained Cascade Mask R-CNN (R50 at ~100 pixels, 32-channel mask heads, 20 detections) or a
fake detector with hand-made masks; one runs the mmdetection reference checkpoint on one coco128 image.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cascade_rcnn.api import Detector
from cascade_rcnn.cli import main
from cascade_rcnn.commands import predict as predict_command
from cascade_rcnn.errors import DatasetError
from cascade_rcnn.evaluation.coco import (
    METRIC_NAMES,
    check_segm_ground_truth,
    detections_to_coco,
    evaluate_coco,
    load_coco_gt,
)
from cascade_rcnn.evaluation.visualize import class_color, draw_detections
from cascade_rcnn.structures import Detections
from helpers import require_coco128, tiny_config

CLASSES = ("person", "car", "dog")


# --- models and data --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mask_weights(module_tmp: Path) -> Path:
    """An untrained 3-class Cascade Mask R-CNN (mmdetection's per-stage mask heads) saved as a weights file."""
    torch.manual_seed(0)
    config = tiny_config(3, class_names=CLASSES, **{
        "mask.heads": "per_stage", "mask.conv_dim": 32, "postprocess.rescale": "divide_after_nms",
        "postprocess.detections_per_image": 20, "rpn.post_nms_top_n_test": 50,
        "transform.min_size": 96, "transform.max_size": 128})  # fmt: skip
    detector = Detector("cascade_mask_rcnn_r50_fpn", config=config)
    return detector.save(module_tmp / "tiny_mask.safetensors")


def _write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _results(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "detections.json").read_text())


def _decode(rle: dict[str, Any]) -> np.ndarray:
    """pycocotools' own decoding of one results RLE (counts as written in the JSON file)."""
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def _expected_ids(masks: np.ndarray) -> np.ndarray:
    """The documented instance-id image: i + 1 where mask i is set and no earlier (higher-scoring) mask is."""
    ids = np.zeros(masks.shape[1:], np.int64)
    for i, mask in enumerate(masks):
        ids[mask & (ids == 0)] = i + 1
    return ids


def _mask_config(has_masks: bool) -> SimpleNamespace:
    return SimpleNamespace(has_masks=has_masks, postprocess=SimpleNamespace(coco_wh_plus_one=False))


class FixedMaskDetector:
    """Three detections per image at fixed fractions of its size, person 0.9, car 0.6, dog 0.2, each with a mask that
    fills its box but the top-left pixel; the person's and the car's masks overlap. Ignores `score_thresh`, so the
    command's own filtering is what the tests see."""

    class_names = CLASSES
    fractions = ([0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.9], [0.0, 0.0, 0.3, 0.3])

    def __init__(self, has_masks: bool = True) -> None:
        self.config = _mask_config(has_masks)
        self.outputs: list[Detections] = []

    def predict(self, images: list[np.ndarray], *, batch_size: int = 1, score_thresh: float | None = None,
                return_stages: bool = False) -> list[Detections]:  # fmt: skip
        out = []
        for image in images:
            h, w = image.shape[:2]
            boxes = torch.tensor(self.fractions) * torch.tensor([w, h, w, h], dtype=torch.float32)
            masks = None
            if self.config.has_masks:
                masks = torch.zeros((3, h, w), dtype=torch.bool)
                for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
                    masks[i, y1:y2, x1:x2] = True
                    masks[i, y1, x1] = False
            out.append(Detections(boxes, torch.tensor([0.9, 0.6, 0.2]), torch.tensor([0, 1, 2]), CLASSES,
                                  masks=masks))  # fmt: skip
        self.outputs += out
        return out


@pytest.fixture
def fake_masks(monkeypatch: pytest.MonkeyPatch) -> FixedMaskDetector:
    detector = FixedMaskDetector()
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: detector)
    return detector


# --- predict with a real (tiny) mask model --------------------------------------------------------------------------


def test_predict_writes_rles_drawings_and_id_pngs_equal_to_the_detector_masks(
    tiny_mask_weights: Path, tmp_path: Path
) -> None:
    inputs = [_write_image(tmp_path / "in" / "a.png", (80, 60), seed=0),
              _write_image(tmp_path / "in" / "b.jpg", (64, 72), seed=1)]  # fmt: skip
    out = tmp_path / "out"
    threshold = 0.5

    code = main(["predict", "--weights", str(tiny_mask_weights), *map(str, inputs), "--out", str(out),
                 "--device", "cpu", "--score-thresh", str(threshold), "--save-masks"])  # fmt: skip

    assert code == 0
    detector = Detector.from_weights(tiny_mask_weights)
    results = _results(out)
    dropped = 0
    for path in inputs:
        everything = detector.predict(path)
        dropped += int((everything.scores < threshold).sum())
        det = everything.filter(threshold)
        mine = [r for r in results if r["file_name"] == path.name]
        assert len(mine) == len(det) > 0
        assert [r["score"] for r in mine] == det.scores.tolist()
        h, w = det.masks.shape[1:]
        for r, mask in zip(mine, det.masks, strict=True):
            assert r["segmentation"]["size"] == [h, w] and isinstance(r["segmentation"]["counts"], str)
            np.testing.assert_array_equal(_decode(r["segmentation"]), mask.numpy())
        # The drawing is draw_detections with the masks; the id PNG numbers the kept detections in file order.
        drawn = np.asarray(Image.open(out / "images" / path.name).convert("RGB"))
        image = np.asarray(Image.open(path).convert("RGB"))
        expected = draw_detections(image, det.boxes, det.scores, det.labels, CLASSES, masks=det.masks)
        if path.suffix == ".png":  # lossless: pixel for pixel
            np.testing.assert_array_equal(drawn, np.asarray(expected))
        ids = Image.open(out / "masks" / f"{path.stem}.png")
        assert ids.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(ids), _expected_ids(det.masks.numpy()))
    assert dropped > 0  # the threshold dropped detections, and their masks with them


# --- drawing ----------------------------------------------------------------------------------------------------------


def test_overlay_fills_and_outlines_the_mask_and_leaves_the_rest_alone() -> None:
    gray = 100
    image = np.full((120, 160, 3), gray, np.uint8)
    boxes = torch.tensor([[20.0, 30.0, 80.0, 90.0], [60.0, 50.0, 110.0, 100.0], [120.0, 10.0, 150.0, 40.0]])
    yy, xx = np.mgrid[:120, :160]
    masks = np.stack([
        (yy - 60) ** 2 / 28**2 + (xx - 50) ** 2 / 28**2 <= 1.0,  # a disc inside box 0
        (yy >= 55) & (yy < 95) & (xx >= 65) & (xx < 105),  # a square inside box 1, under part of the disc
        (yy >= 10) & (yy < 40) & (xx >= 120) & (xx < 150),  # box 2 scores below the threshold
    ])  # fmt: skip
    scores, labels = torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0, 1, 2])

    drawn = np.asarray(draw_detections(image, boxes, scores, labels, CLASSES, score_thresh=0.5, masks=masks))

    def blend(label: int) -> list[int]:
        return [round(gray * 0.5 + c * 0.5) for c in class_color(label)]

    assert drawn[60, 50].tolist() == blend(0)  # inside the disc only
    assert drawn[90, 100].tolist() == blend(1)  # inside the square only
    assert drawn[70, 72].tolist() != blend(1)  # the disc (higher score) is on top where they overlap
    assert drawn[60, 22].tolist() == list(class_color(0))  # the disc's leftmost pixel: its outline
    assert drawn[35, 25].tolist() == [gray] * 3  # inside box 0 (corner), outside its disc: untouched
    assert (drawn[105:, :] == gray).all() and (drawn[:, :15] == gray).all()  # far from every box
    assert (drawn[15:35, 125:145] == gray).all()  # below the score threshold: no box, no mask
    no_masks = np.asarray(draw_detections(image, boxes, scores, labels, CLASSES, score_thresh=0.5))
    assert no_masks[60, 50].tolist() == [gray] * 3
    with pytest.raises(ValueError, match="masks of shape"):
        draw_detections(image, boxes, scores, labels, CLASSES, masks=masks[:, :60])


# --- predict with a fake mask model ---------------------------------------------------------------------------------


def test_save_masks_ids_follow_the_kept_detections(fake_masks: FixedMaskDetector, tmp_path: Path) -> None:
    inputs = [_write_image(tmp_path / "in" / "x.jpg", (80, 60), seed=0),
              _write_image(tmp_path / "in" / "x.png", (50, 40), seed=1)]  # fmt: skip
    out = tmp_path / "out"

    code = main(["predict", "--weights", "w", *map(str, inputs), "--out", str(out), "--save-masks",
                 "--classes", "person,car,dog"])  # fmt: skip

    assert code == 0
    # Same stem twice: the second mask file gets a suffix, as output names do.
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["x.png", "x_1.png"]
    results = _results(out)
    for path, mask_name, det in zip(inputs, ["x.png", "x_1.png"], fake_masks.outputs, strict=True):
        kept = det.masks[:2].numpy()  # the dog (0.2) is below the default threshold 0.3: its mask goes with it
        mine = [r for r in results if r["file_name"] == path.name]
        assert [r["category_name"] for r in mine] == ["person", "car"]
        for r, mask in zip(mine, kept, strict=True):
            np.testing.assert_array_equal(_decode(r["segmentation"]), mask)
        ids = np.asarray(Image.open(out / "masks" / mask_name))
        assert ids.shape == kept.shape[1:]
        np.testing.assert_array_equal(ids, _expected_ids(kept))
        assert set(np.unique(ids).tolist()) == {0, 1, 2}
        overlap = kept[0] & kept[1]
        assert overlap.any() and (ids[overlap] == 1).all()  # the person (higher score) keeps the shared pixels

    assert main(["predict", "--weights", "w", str(inputs[0]), "--out", str(tmp_path / "cars"), "--save-masks",
                 "--classes", "car"]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cars" / "masks" / "x.png")),
                                  fake_masks.outputs[-1].masks[1].numpy().astype(np.int64))  # fmt: skip


def test_save_masks_on_a_box_only_model_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    detector = FixedMaskDetector(has_masks=False)
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: detector)
    image = _write_image(tmp_path / "a.png", (40, 30), seed=0)

    code = main(["predict", "--weights", "box.safetensors", str(image), "--out", str(tmp_path / "out"), "--save-masks"])

    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no mask head" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "masks").exists() and detector.outputs == []


def test_box_only_model_outputs_are_unchanged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    detector = FixedMaskDetector(has_masks=False)
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: detector)
    image = _write_image(tmp_path / "a.png", (40, 30), seed=0)
    out = tmp_path / "out"

    assert main(["predict", "--weights", "w", str(image), "--out", str(out)]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "images"]
    for r in _results(out):
        assert list(r) == ["image_id", "file_name", "category_id", "category_name", "bbox", "score"]
    det = detector.outputs[0]
    drawn = np.asarray(Image.open(out / "images" / "a.png"))
    expected = draw_detections(np.asarray(Image.open(image)), det.boxes[:2], det.scores[:2], det.labels[:2], CLASSES)
    np.testing.assert_array_equal(drawn, np.asarray(expected))
    converted = detections_to_coco(7, det.boxes, det.scores, det.labels, [1, 2, 3])
    assert [list(r) for r in converted] == [["image_id", "category_id", "bbox", "score"]] * 3


def test_detections_to_coco_drops_the_masks_of_dropped_categories() -> None:
    masks = torch.zeros((3, 6, 5), dtype=torch.bool)
    for i in range(3):
        masks[i, i : i + 2, 1:4] = True
    boxes = torch.tensor([[1.0, 0.0, 4.0, 2.0], [1.0, 1.0, 4.0, 3.0], [1.0, 2.0, 4.0, 4.0]])
    results = detections_to_coco(5, boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 2]), [1, None, 3],
                                 masks=masks)  # fmt: skip
    assert [r["category_id"] for r in results] == [1, 3]
    assert [list(r) for r in results] == [["image_id", "category_id", "bbox", "score", "segmentation"]] * 2
    for r, i in zip(results, (0, 2), strict=True):
        np.testing.assert_array_equal(_decode(r["segmentation"]), masks[i].numpy())
    with pytest.raises(ValueError, match="2 masks for 3 detections"):
        detections_to_coco(5, boxes, torch.ones(3), torch.tensor([0, 1, 2]), [1, 2, 3], masks=masks[:2])


# --- eval ---------------------------------------------------------------------------------------------------------


def _polygon_set(folder: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Two small images written with Pillow and an annotation file with polygon masks (one crowd RLE), the three
    classes of the tiny model."""
    images_dir = folder / "images"
    sizes = {1: (80, 60), 2: (64, 72)}
    for image_id, size in sizes.items():
        _write_image(images_dir / f"{image_id:012d}.png", size, seed=image_id)
    polygons = {
        1: [(0, [[10, 10, 40, 10, 40, 35, 10, 35]]), (1, [[45, 20, 75, 25, 60, 55]]),
            (2, [[5, 40, 20, 40, 20, 58, 5, 58], [22, 45, 30, 45, 30, 55]])],
        2: [(0, [[8, 8, 50, 8, 50, 30, 8, 30]]), (0, [[20, 40, 35, 36, 60, 50, 40, 70, 15, 66]]),
            (1, [[2, 2, 6, 2, 6, 6]])],  # a small object
    }  # fmt: skip
    annotations = []
    for image_id, objects in polygons.items():
        w, h = sizes[image_id]
        for label, segmentation in objects:
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
            x, y, bw, bh = mask_utils.toBbox(rle).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                                "bbox": [x, y, bw, bh], "iscrowd": 0})  # fmt: skip
    crowd = np.zeros((60, 80), np.uint8, order="F")
    crowd[45:58, 50:78] = 1
    crowd_rle = mask_utils.encode(crowd)
    annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": 1, "iscrowd": 1,
                        "segmentation": {"size": [60, 80], "counts": _uncompressed_counts(crowd)},
                        "area": float(mask_utils.area(crowd_rle)),
                        "bbox": mask_utils.toBbox(crowd_rle).tolist()})  # fmt: skip
    dataset = {
        "images": [{"id": i, "file_name": f"{i:012d}.png", "width": w, "height": h} for i, (w, h) in sizes.items()],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
        "annotations": annotations,
    }
    path = folder / "polygons.json"
    path.write_text(json.dumps(dataset))
    return path, images_dir, dataset


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's crowd RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def _mask_results(dataset: dict[str, Any]) -> list[dict[str, Any]]:
    """Results with masks of every quality: exact, eroded, shifted, a false positive, a wrong class, a miss."""
    gt = load_coco_gt_from(dataset)
    results = []
    rng = np.random.default_rng(0)
    for n, ann in enumerate(a for a in dataset["annotations"] if not a["iscrowd"]):
        mask = gt.annToMask(ann).astype(bool)
        if n % 3 == 1:
            mask = np.roll(mask, 3, axis=1)
        elif n % 3 == 2:
            mask[: mask.shape[0] // 2 + int(rng.integers(0, 5))] = False
        if n == 4:
            continue  # missed
        category_id = ann["category_id"] if n != 2 else ann["category_id"] % 3 + 1
        results.append(_result(ann["image_id"], category_id, mask, float(rng.uniform(0.3, 1.0))))
    false_positive = np.zeros((72, 64), bool)
    false_positive[50:70, 45:60] = True
    results.append(_result(2, 1, false_positive, 0.95))
    return results


def _result(image_id: int, category_id: int, mask: np.ndarray, score: float) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    box = [x - 1.5, y - 0.5, w + 3.0, h + 1.0]  # a box that is not the mask's own: areas differ
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}  # fmt: skip


def load_coco_gt_from(dataset: dict[str, Any]) -> COCO:
    gt = COCO()
    gt.dataset = json.loads(json.dumps(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _pycocotools(dataset: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> COCOeval:
    """COCOeval run directly; segm results without their bbox, as mmdetection and detectron2 pass them."""
    gt = load_coco_gt_from(dataset)
    dropped = {"bbox"} if iou_type == "segm" else set()
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([{k: v for k, v in r.items() if k not in dropped} for r in json.loads(json.dumps(results))])
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _per_class(evaluator: COCOeval) -> list[float]:
    precision = evaluator.eval["precision"]
    values = [precision[:, :, k, 0, -1] for k in range(precision.shape[2])]
    return [float(np.mean(v[v > -1])) if (v > -1).any() else -1.0 for v in values]


def test_eval_results_file_gives_pycocotools_segm_and_bbox_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations, _, dataset = _polygon_set(tmp_path)
    results = _mask_results(dataset)
    detections = tmp_path / "results.json"
    detections.write_text(json.dumps(results))
    out = tmp_path / "out"

    assert main(["eval", "--detections", str(detections), "--annotations", str(annotations), "--out", str(out)]) == 0

    for iou_type, suffix in (("bbox", ""), ("segm", "_segm")):
        evaluator = _pycocotools(dataset, results, iou_type)
        metrics = json.loads((out / f"metrics{suffix}.json").read_text())
        assert list(metrics) == list(METRIC_NAMES)
        assert list(metrics.values()) == [float(v) for v in evaluator.stats]  # exactly, not approximately
        assert list(json.loads((out / f"per_class_ap{suffix}.json").read_text()).values()) == _per_class(evaluator)
        assert (out / f"pr_curves{suffix}" / "pr_iou0.50.png").is_file() and (out / f"pr_curves{suffix}.png").is_file()
    segm = json.loads((out / "metrics_segm.json").read_text())
    assert 0.0 < segm["AP"] < 1.0 and segm["AP"] != json.loads((out / "metrics.json").read_text())["AP"]
    printed = capsys.readouterr()
    assert printed.out.startswith("bbox\n") and "\n\nsegm\n" in printed.out
    assert "skipped" not in printed.err


def test_segm_area_ranges_use_the_mask_area_as_the_peers_do(tmp_path: Path) -> None:
    """Given the results' boxes, loadRes would take the box area as each detection's area: the box-area numbers
    differ from the ones reported (here the area-range metrics), so the bbox really is left out."""
    _, _, dataset = _polygon_set(tmp_path)
    results = _mask_results(dataset)
    for r in results:
        x, y, w, h = r["bbox"]
        r["bbox"] = [x - 20, y - 20, w + 40, h + 40]  # boxes far larger than their masks: other area ranges
    reported = evaluate_coco(load_coco_gt_from(dataset), results, iou_type="segm").metrics
    gt = load_coco_gt_from(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        with_boxes = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), iouType="segm")
        with_boxes.evaluate()
        with_boxes.accumulate()
        with_boxes.summarize()
    assert list(reported.values()) == [float(v) for v in _pycocotools(dataset, results, "segm").stats]
    assert list(reported.values()) != [float(v) for v in with_boxes.stats]


def test_eval_model_mode_writes_segmentations_and_scores_masks(
    tiny_mask_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations, images_dir, dataset = _polygon_set(tmp_path)
    out = tmp_path / "out"

    code = main(["eval", "--weights", str(tiny_mask_weights), "--images", str(images_dir), "--annotations",
                 str(annotations), "--out", str(out), "--device", "cpu"])  # fmt: skip

    assert code == 0
    results = _results(out)
    assert results and all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
    detector = Detector.from_weights(tiny_mask_weights)
    det = detector.predict(images_dir / "000000000001.png")
    mine = [r for r in results if r["image_id"] == 1]
    assert len(mine) == len(det)
    for r, mask in zip(mine, det.masks, strict=True):
        np.testing.assert_array_equal(_decode(r["segmentation"]), mask.numpy())
    for iou_type, suffix in (("bbox", ""), ("segm", "_segm")):
        expected = [float(v) for v in _pycocotools(dataset, results, iou_type).stats]
        assert list(json.loads((out / f"metrics{suffix}.json").read_text()).values()) == expected
    assert "\n\nsegm\n" in capsys.readouterr().out


def test_eval_with_box_only_annotations_skips_segm_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, images_dir, dataset = _polygon_set(tmp_path)
    boxes_only = json.loads(json.dumps(dataset))
    for ann in boxes_only["annotations"]:
        ann["segmentation"] = []  # as box-only exporters (and coco128's val file) write it
    annotations = tmp_path / "boxes.json"
    annotations.write_text(json.dumps(boxes_only))
    results = _mask_results(dataset)
    detections = tmp_path / "results.json"
    detections.write_text(json.dumps(results))
    out = tmp_path / "out"

    assert main(["eval", "--detections", str(detections), "--annotations", str(annotations), "--out", str(out)]) == 0

    printed = capsys.readouterr()
    skip_lines = [line for line in printed.err.splitlines() if "segm" in line]
    assert len(skip_lines) == 1 and "no instance masks" in skip_lines[0] and str(annotations) in skip_lines[0]
    assert not printed.out.startswith("bbox\n")  # one table, as for a box-only model
    expected = [float(v) for v in _pycocotools(boxes_only, results, "bbox").stats]
    assert list(json.loads((out / "metrics.json").read_text()).values()) == expected
    assert not (out / "metrics_segm.json").exists()

    # Model mode says it before the model runs, and still scores the boxes.
    fake = FixedMaskDetector()
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: fake)
    code = main(["eval", "--weights", "w", "--images", str(images_dir), "--annotations", str(annotations),
                 "--out", str(tmp_path / "model")])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    assert sum("segm evaluation skipped" in line for line in printed.err.splitlines()) == 1
    assert (tmp_path / "model" / "metrics.json").is_file() and not (tmp_path / "model" / "metrics_segm.json").exists()
    assert all("segmentation" in r for r in _results(tmp_path / "model"))


def test_box_only_results_are_scored_as_before(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    annotations, _, dataset = _polygon_set(tmp_path)
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in _mask_results(dataset)]
    detections = tmp_path / "boxes.json"
    detections.write_text(json.dumps(results))
    out = tmp_path / "out"

    assert main(["eval", "--detections", str(detections), "--annotations", str(annotations), "--out", str(out)]) == 0

    printed = capsys.readouterr()
    assert printed.out.startswith("metric ") and "segm" not in printed.out + printed.err
    assert not any("segm" in p.name for p in out.iterdir())


def test_segm_ground_truth_checks(tmp_path: Path) -> None:
    _, _, dataset = _polygon_set(tmp_path)
    assert check_segm_ground_truth(load_coco_gt(_dump(tmp_path, dataset))) is None

    partial = json.loads(json.dumps(dataset))
    partial["annotations"][1]["segmentation"] = []
    assert "1 of the 7 annotations" in check_segm_ground_truth(load_coco_gt(_dump(tmp_path, partial)))

    unsized = json.loads(json.dumps(dataset))
    del unsized["images"][0]["height"]
    assert "'height' and 'width'" in check_segm_ground_truth(load_coco_gt(_dump(tmp_path, unsized)))

    broken = json.loads(json.dumps(dataset))
    broken["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]  # two points: pycocotools' C code would take it
    with pytest.raises(DatasetError, match="1 unusable segmentations") as caught:
        check_segm_ground_truth(load_coco_gt(_dump(tmp_path, broken)))
    assert "annotations[0] (id 1)" in caught.value.problems[0]


def test_malformed_segm_results_are_named(tmp_path: Path) -> None:
    annotations, _, dataset = _polygon_set(tmp_path)
    results = _mask_results(dataset)[:3]
    results[0]["segmentation"] = {"size": [10, 10], "counts": results[0]["segmentation"]["counts"]}
    results[1]["segmentation"] = [[1, 2, 3, 4, 5, 6]]
    del results[2]["segmentation"]
    with pytest.raises(DatasetError) as caught:
        evaluate_coco(annotations, results, iou_type="segm")
    problems = "\n".join(caught.value.problems)
    assert "detections[0]: segmentation size [10, 10] differs" in problems
    assert "detections[1]: segmentation must be a compressed RLE" in problems
    assert "detections[2]: missing segmentation" in problems


def _dump(folder: Path, dataset: dict[str, Any]) -> Path:
    path = folder / "gt.json"
    path.write_text(json.dumps(dataset))
    return path


# --- the real mmdetection Cascade Mask R-CNN -------------------------------------------------------------------------


def test_predict_with_the_mmdet_reference_checkpoint_writes_the_detector_masks(
    mmdet_mask_reference_checkpoint: Path, tmp_path: Path
) -> None:
    image = require_coco128() / "val2017" / "000000000139.jpg"
    out = tmp_path / "out"

    assert main(["predict", "--weights", str(mmdet_mask_reference_checkpoint), str(image), "--out", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip

    det = Detector.from_weights(mmdet_mask_reference_checkpoint).predict(image, score_thresh=0.3)
    results = _results(out)
    assert len(results) == len(det) > 0
    for r, mask in zip(results, det.masks, strict=True):
        np.testing.assert_array_equal(_decode(r["segmentation"]), mask.numpy())
    assert sum(int(m.sum()) for m in det.masks) > 0


# --- memory: a photo's masks are never copied whole ---------------------------------------------------------------------


def pasted_masks(count: int, size: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` masks pasted (the model's paste) over random boxes of up to a fifth of the image, and the boxes."""
    from cascade_rcnn.paste import paste_masks_array

    rng = np.random.default_rng(seed)
    h, w = size
    xy = rng.random((count, 2)) * [w * 0.8, h * 0.8]
    boxes = np.concatenate([xy, xy + rng.random((count, 2)) * [w * 0.2, h * 0.2] + 5], axis=1).astype(np.float32)
    return paste_masks_array(rng.random((count, 28, 28), dtype=np.float32), boxes, size), boxes


def test_select_masks_equals_indexing_and_copies_nothing_when_all_are_kept() -> None:
    """`select_masks` is `masks[keep]` for tensors and arrays, any masks (True pixels on the first and last rows
    too), none kept or all kept (then the same object, no copy)."""
    from cascade_rcnn.structures import select_masks

    rng = np.random.default_rng(0)
    masks = rng.random((6, 9, 11)) > 0.7
    masks[1] = False
    masks[2, [0, -1]] = True
    for keep in ([1, 0, 1, 1, 0, 1], [0] * 6, [1, 1, 1, 0, 0, 0]):
        keep = np.array(keep, bool)
        np.testing.assert_array_equal(select_masks(masks, keep), masks[keep])
        tensor = torch.from_numpy(masks)
        assert torch.equal(select_masks(tensor, torch.from_numpy(keep)), tensor[torch.from_numpy(keep)])
    assert select_masks(masks, np.ones(6, bool)) is masks


def test_a_photos_masks_are_written_and_drawn_without_a_copy_of_them_all() -> None:
    """60 masks of a 1500 x 2000 image (180 MB as bool): their RLEs and their drawing hold at most a few masks' worth
    at a time (numpy's allocations, traced; measured 1 and 6), never a second copy of them all (60 or more), as
    indexing them all at once did."""
    import tracemalloc

    from cascade_rcnn.evaluation.coco import detections_to_coco

    size = (1500, 2000)
    masks, boxes = pasted_masks(60, size)
    one_mask = size[0] * size[1]
    labels, scores = np.zeros(60, np.int64), np.linspace(1.0, 0.1, 60)
    image = np.zeros((*size, 3), np.uint8)
    for name, step in (("rle", lambda: detections_to_coco(1, boxes, scores, labels, [1], masks=masks)),
                       ("draw", lambda: draw_detections(image, boxes, scores, labels, ["a"], masks=masks))):  # fmt: skip
        tracemalloc.start()
        try:
            step()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak <= 10 * one_mask, (name, peak / one_mask)  # drawing: the RGB copy it draws on is 3 masks' worth
