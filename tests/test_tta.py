"""Test-time augmentation (cascade_rcnn.inference.tta): views through the model's own flow, mmdetection's merge, and
the predict/eval flags of tiling and TTA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rcnn import Detector
from cascade_rcnn.cli import main
from cascade_rcnn.errors import ConfigError
from cascade_rcnn.inference import TTAConfig
from cascade_rcnn.inference.tta import ScaledResize, flip_boxes, merge_views, parse_scales, predict_tta
from cascade_rcnn.modeling.transform import KeepRatioResize, SecondRescale, ShortestEdgeResize
from cascade_rcnn.structures import Detections
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector(config=tiny_config(num_classes=3, **{"postprocess.score_thresh": 0.0,
                                                         "postprocess.detections_per_image": 20}))


def _tensor(height: int, width: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(3, height, width)).astype(np.float32))


@pytest.mark.parametrize("rule", [KeepRatioResize(min_size=800, max_size=1333),
                                  ShortestEdgeResize(min_size=800, max_size=1333),
                                  SecondRescale(KeepRatioResize(min_size=600, max_size=1000))])  # fmt: skip
def test_scaled_resize_multiplies_the_rules_own_size(rule):
    for h, w in [(480, 640), (1000, 300), (37, 2000)]:
        assert ScaledResize(rule, 1.0).steps(h, w) == rule.steps(h, w)
        (steps, scale), (scaled, scaled_scale) = rule.steps(h, w), ScaledResize(rule, 1.5).steps(h, w)
        assert scaled[:-1] == steps[:-1]
        assert scaled[-1] == (int(steps[-1][0] * 1.5 + 0.5), int(steps[-1][1] * 1.5 + 0.5))
        assert scaled_scale == pytest.approx(scale * 1.5)


def test_flip_boxes_is_mmdetections_bbox_flip_and_its_own_inverse():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 50.0]])
    assert flip_boxes(boxes, 100).tolist() == [[70.0, 5.0, 90.0, 25.0], [0.0, 0.0, 100.0, 50.0]]
    assert torch.equal(flip_boxes(flip_boxes(boxes, 100), 100), boxes)


def test_merge_is_concatenation_then_class_nms_then_the_cap():
    a = Detections(torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), torch.tensor([0.9, 0.3]), torch.tensor([0, 1]))
    b = Detections(torch.tensor([[1.0, 0, 10, 10], [0, 0, 10, 10], [100, 100, 110, 110]]),
                   torch.tensor([0.95, 0.8, 0.5]), torch.tensor([0, 1, 0]))  # fmt: skip
    merged = merge_views([a, b], nms_thresh=0.5, max_per_image=3)
    # b's first box (IoU 0.9 with a's first, same class, higher score) wins; the class-1 box at the same place stays.
    assert merged.scores.tolist() == pytest.approx([0.95, 0.8, 0.5])
    assert merged.labels.tolist() == [0, 1, 0]
    assert merged.boxes[0].tolist() == [1.0, 0, 10, 10]


def test_one_unflipped_view_at_scale_one_is_the_plain_model(detector):
    image = _tensor(150, 200, seed=1)
    plain = detector.predict(image)
    tta = detector.predict(image, tta=TTAConfig(scales=(1.0,), flip=False))
    assert len(plain) > 0
    torch.testing.assert_close(tta.boxes, plain.boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(tta.scores, plain.scores, atol=1e-6, rtol=0)
    assert torch.equal(tta.labels, plain.labels)


def test_flip_tta_is_flip_equivariant(detector):
    """The views of an image and of its mirror are the same two images: the merged results mirror each other."""
    image = _tensor(100, 130, seed=2)
    config = TTAConfig(scales=(1.0,))
    model = detector.inference_model
    direct = predict_tta(model, [image], config)[0]
    mirrored = predict_tta(model, [image.flip(-1)], config)[0]
    assert len(direct) == len(mirrored) > 0
    torch.testing.assert_close(flip_boxes(mirrored.boxes, 130), direct.boxes, atol=1e-2, rtol=0)
    torch.testing.assert_close(mirrored.scores, direct.scores, atol=1e-4, rtol=0)


def test_tta_views_come_back_in_original_pixels(detector):
    """Each view's boxes are mapped back: every merged box lies inside the image, and views at other scales see
    the same image (the boxes of a scale-2 view alone are in the image's pixels, not the view's)."""
    image = _tensor(100, 120, seed=3)
    merged = detector.predict(image, tta=TTAConfig(scales=(0.5, 1.5), flip=False))
    assert len(merged) > 0
    assert (merged.boxes >= 0).all() and (merged.boxes[:, 2] <= 120).all() and (merged.boxes[:, 3] <= 100).all()
    big = predict_tta(detector.inference_model, [image], TTAConfig(scales=(1.5,), flip=False))[0]
    assert len(big) > 0 and big.boxes[:, 2].max() <= 120 and big.boxes[:, 3].max() <= 100
    assert big.boxes[:, 2].max() > 60  # not squeezed into a smaller frame either


@pytest.mark.parametrize("scales,message", [((), "give at least one scale"), ((0.0,), "0.0 is outside [0.1, 4.0]"),
                                            ((1.0, 1.0), "repeats a scale"), ((float("inf"),), "inf is outside")])
def test_bad_tta_settings_are_one_line_errors(scales, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        TTAConfig(scales=scales)
    assert parse_scales("0.8, 1,1.2") == (0.8, 1.0, 1.2)
    with pytest.raises(ConfigError, match="expected comma-separated numbers"):
        parse_scales("1;2")


# ---------------------------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_and_set(tmp_path_factory: pytest.TempPathFactory, detector: Detector) -> tuple[Path, Path, Path]:
    """The tiny detector's weights and a two-image COCO set: one 300x260 image (tiled) and one small one (run whole)."""
    root = tmp_path_factory.mktemp("tiles")
    weights = detector.save(root / "tiny.safetensors")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for image_id, (w, h) in enumerate([(200, 140), (120, 100)], start=1):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(images / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
    annotations = root / "gt.json"
    annotations.write_text(json.dumps({
        "images": entries, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(detector.class_names)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "area": 1200,
                         "iscrowd": 0}]}))  # fmt: skip
    return weights, images, annotations


def test_eval_records_tiling_and_tta_in_metrics_json(weights_and_set, tmp_path, capsys):
    weights, images, annotations = weights_and_set
    out = tmp_path / "out"
    code = main(["eval", "--weights", str(weights), "--images", str(images), "--annotations", str(annotations),
                 "--out", str(out), "--device", "cpu", "--tile", "128", "--tile-overlap", "0.25", "--tta",
                 "--tta-scales", "0.8", "--tta-no-flip"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["inference"]
    assert record["tile"]["size"] == 128 and record["tile"]["overlap"] == 0.25 and not record["tile"]["full_image"]
    assert record["tta"]["scales"] == [0.8] and record["tta"]["flip"] is False
    assert record["seconds_per_image"] > 0 and 0.0 <= metrics["AP"] <= 1.0
    assert '"tile": {"size": 128' in capsys.readouterr().out


def test_predict_tiles_and_refuses_bad_input_on_one_line(weights_and_set, tmp_path, capsys):
    weights, images, _ = weights_and_set
    base = ["predict", str(images), "--weights", str(weights), "--device", "cpu", "--out", str(tmp_path / "p")]
    assert main([*base, "--tile", "128", "--tile-full", "--score-thresh", "0.0"]) == 0
    results = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert {r["image_id"] for r in results} == {1, 2}
    assert all(r["bbox"][0] + r["bbox"][2] <= 200.01 and r["bbox"][1] + r["bbox"][3] <= 140.01 for r in results)
    assert max(r["bbox"][0] + r["bbox"][2] for r in results if r["image_id"] == 1) > 128  # past the first slice
    capsys.readouterr()
    for extra, message in [(["--tile", "32"], "--tile 32: smaller than the model's largest stride (64 px)"),
                           (["--tile", "128", "--tile-overlap", "0.95"], "--tile-overlap 0.95: must be in [0, 0.9]"),
                           (["--tile-full"], "--tile-full only with --tile SIZE"),
                           (["--tta", "--tta-scales", "a"], "--tta-scales 'a': expected comma-separated numbers"),
                           (["--tta", "--backend", "onnxruntime"], "--tta run the torch backend's model"),
                           (["--max-megapixels", "0.01", "--tile", "128"], "image too large")]:  # fmt: skip
        code = main([*base, *extra])
        err = capsys.readouterr().err
        assert code in (1, 2) and message in err, (extra, err)
        assert "Traceback" not in err
