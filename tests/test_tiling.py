"""Sliced inference (cascade_rcnn.inference.tiling) and the SAHI adapter: windows, merge rule, memory bound by
construction, original-pixel boxes, fallbacks and one-line errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cascade_rcnn import Detector
from cascade_rcnn.errors import ConfigError
from cascade_rcnn.inference import TileConfig
from cascade_rcnn.inference.tta import detect_boxes
from cascade_rcnn.inference.tiling import (
    as_hwc,
    merge_detections,
    predict_tiled,
    reduce_image,
    slice_windows,
)
from cascade_rcnn.structures import Detections
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def detector() -> Detector:
    torch.manual_seed(0)
    return Detector(config=tiny_config(num_classes=3, **{"postprocess.score_thresh": 0.0,
                                                         "postprocess.detections_per_image": 20}))


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Windows and bad input
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width,size,overlap",
                         [(300, 260, 128, 0.25), (1000, 77, 100, 0.0), (513, 512, 256, 0.9)])
def test_windows_cover_the_image_with_the_overlap_and_end_flush(height, width, size, overlap):
    config = TileConfig(size=size, overlap=overlap)
    windows = slice_windows(height, width, config)
    covered = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (x1 - x0, y1 - y0) == (min(size, width), min(size, height))
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({w[0] for w in windows})
    steps = np.diff(xs)
    assert (steps[:-1] == size - int(overlap * size)).all() if len(steps) > 1 else True
    assert max(w[2] for w in windows) == width and max(w[3] for w in windows) == height


@pytest.mark.parametrize("kwargs,message", [
    ({"size": 128, "overlap": 0.95}, "--tile-overlap 0.95: must be in [0, 0.9]"),
    ({"size": 128, "overlap": -0.1}, "--tile-overlap -0.1"),
    ({"size": 0}, "--tile 0: the slice size must be a positive number"),
    ({"size": 128, "overlap": float("nan")}, "--tile-overlap nan"),
])  # fmt: skip
def test_bad_tile_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError) as error:
        TileConfig(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_tile_smaller_than_the_largest_stride_is_refused(detector):
    with pytest.raises(ConfigError, match=r"--tile 32: smaller than the model's largest stride \(64 px\)"):
        detector.predict(_image(300, 300), tile=32)


def test_an_image_no_larger_than_a_tile_runs_whole(detector):
    image = _image(150, 120)
    plain = detector.predict(image)
    tiled = detector.predict(image, tile=TileConfig(size=200, full_image=True))
    assert len(plain) > 0
    torch.testing.assert_close(tiled.boxes, plain.boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(tiled.scores, plain.scores, atol=1e-5, rtol=0)
    assert torch.equal(tiled.labels, plain.labels)


# ---------------------------------------------------------------------------------------------------------------------
# The whole flow with the model: original pixels, batching
# ---------------------------------------------------------------------------------------------------------------------


def test_slices_give_boxes_in_original_pixels(detector):
    """Four copies of one image, cut exactly at the copies (no overlap): the tiled detections are each copy's plain
    detections shifted by its offset (no overlap: nothing to merge)."""
    small = _image(128, 128, seed=1)
    big = np.concatenate([np.concatenate([small, small], 1), np.concatenate([small, small], 1)], 0)
    plain = detector.predict(small)
    tiled = detector.predict(big, tile=TileConfig(size=128, overlap=0.0, batch_size=1))
    expected = torch.cat([plain.boxes + torch.tensor([x, y, x, y], dtype=torch.float32)
                          for y in (0, 128) for x in (0, 128)])  # fmt: skip
    order = torch.argsort(expected[:, 0] * 1e6 + expected[:, 1] * 1e3 + expected[:, 2])
    got = torch.argsort(tiled.boxes[:, 0] * 1e6 + tiled.boxes[:, 1] * 1e3 + tiled.boxes[:, 2])
    assert len(tiled) == 4 * len(plain) > 0
    torch.testing.assert_close(tiled.boxes[got], expected[order], atol=1e-3, rtol=0)


def test_batched_slices_equal_one_by_one(detector):
    crops = [torch.from_numpy(_image(128, 128, seed=k)).permute(2, 0, 1).float() for k in range(3)]
    one = [detect_boxes(detector.inference_model, [c])[0] for c in crops]
    batched = detect_boxes(detector.inference_model, crops, batch_size=2)
    for a, b in zip(one, batched):
        assert len(a) == len(b) > 0
        torch.testing.assert_close(b.boxes, a.boxes, atol=1e-2, rtol=0)  # pixels: batched convolutions round apart
        torch.testing.assert_close(b.scores, a.scores, atol=1e-3, rtol=0)


def test_a_mask_model_tiles_boxes_only_and_says_so_once(caplog):
    import cascade_rcnn.inference as inference

    torch.manual_seed(0)
    detector = Detector("cascade_mask_rcnn_r50_fpn", num_classes=3, optimize=False, **{
        "transform.min_size": 128, "transform.max_size": 192, "rpn.pre_nms_top_n_test": 200,
        "rpn.post_nms_top_n_test": 100, "postprocess.score_thresh": 0.0,
        "postprocess.detections_per_image": 5})  # fmt: skip
    inference._said.clear()
    with caplog.at_level(logging.WARNING, logger="cascade_rcnn.inference"):
        first = detector.predict(_image(160, 140), tile=128)
        second = detector.predict(_image(64, 64), tta=True)
    assert first.masks is None and second.masks is None and len(first) > 0
    said = [r.getMessage() for r in caplog.records if "box-only" in r.getMessage()]
    assert said == ["tiling and TTA are box-only: this mask model's detections come without masks"]


# ---------------------------------------------------------------------------------------------------------------------
# The merge rule, with an oracle detector that sees exactly the pixels of each object inside its slice
# ---------------------------------------------------------------------------------------------------------------------


def _scene(objects: list[tuple[int, int, int, int, int]], height: int, width: int) -> np.ndarray:
    """Objects (x0, y0, x1, y1, label) painted with a unique id in channel 0 and their label in channel 1."""
    image = np.zeros((height, width, 3), np.uint8)
    for k, (x0, y0, x1, y1, label) in enumerate(objects, start=1):
        image[y0:y1, x0:x1, 0] = k
        image[y0:y1, x0:x1, 1] = label
    return image


def _oracle(full_sizes: dict[int, int], constant_score: bool):
    """A detector that returns, for each object id visible in a crop, the box of its visible pixels; score 0.9, or the
    visible fraction of the object (a real detector is less sure of a cut object)."""

    def detect(crops: list[torch.Tensor]) -> list[Detections]:
        out = []
        for crop in crops:
            ids, labels = crop[0].round().long(), crop[1].round().long()
            boxes, scores, found = [], [], []
            for k in [int(v) for v in ids.unique() if v > 0]:
                ys, xs = torch.nonzero(ids == k, as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                scores.append(0.9 if constant_score else len(xs) / full_sizes[k])
                found.append(int(labels[ys[0], xs[0]]))
            out.append(Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                  torch.tensor(scores, dtype=torch.float32), torch.tensor(found, dtype=torch.int64)))
        return out

    return detect


@pytest.mark.parametrize("constant_score", [False, True])
def test_an_object_cut_by_slice_borders_comes_out_once_whole(constant_score):
    # Slices of 100 px with overlap 0.3: starts 0, 70, 140, 200 (size 300). Objects: inside one slice, cut by one
    # border but whole in the next slice, wider than the overlap (cut in every slice: its pieces are joined), cut in
    # both axes, and two touching objects of different classes that must stay apart.
    objects = [(10, 10, 40, 40, 1), (60, 20, 95, 50, 2), (45, 150, 125, 190, 0), (130, 130, 165, 168, 1),
               (220, 240, 260, 280, 0), (260, 240, 290, 280, 2)]  # fmt: skip
    sizes = {k: (x1 - x0) * (y1 - y0) for k, (x0, y0, x1, y1, _) in enumerate(objects, start=1)}
    image = _scene(objects, 300, 300)
    config = TileConfig(size=100, overlap=0.3, batch_size=3)
    result = predict_tiled(as_hwc(image), config, _oracle(sizes, constant_score))
    got = sorted(tuple(int(v) for v in box) + (int(label),) for box, label in zip(result.boxes, result.labels))
    assert got == sorted(objects)


def test_detections_of_one_slice_are_not_merged_but_different_classes_and_slices_are_kept_apart():
    # a (slice 0) contains b (slice 0): kept apart, the model's NMS decided; c (slice 1) inside a: merged into a.
    boxes = torch.tensor([[0, 0, 50, 50], [10, 10, 30, 30], [5, 5, 40, 45], [5, 5, 40, 45]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    merged = merge_detections(boxes, scores, labels, sources=torch.tensor([0, 0, 1, 1]))
    assert merged.scores.tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert merged.labels.tolist() == [0, 0, 1]
    everything = merge_detections(boxes, scores, labels)  # SAHI's rule: b and c both fold into a
    assert everything.scores.tolist() == pytest.approx([0.9, 0.6])


def test_merge_without_sources_is_sahis_greedy_nmm():
    sahi_combine = pytest.importorskip("sahi.postprocess.combine", reason="sahi not installed (pip install '.[sahi]')")
    from sahi.prediction import ObjectPrediction

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, size=(300, 2))
    wh = rng.uniform(5, 60, size=(300, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
    scores = torch.tensor(rng.permutation(300) / 300 + 0.001, dtype=torch.float32)  # distinct: no tie order to match
    labels = torch.tensor(rng.integers(0, 3, 300))
    ours = merge_detections(boxes, scores, labels, cell=64.0)
    predictions = [ObjectPrediction(bbox=b.tolist(), category_id=int(c), category_name=str(int(c)), score=float(s))
                   for b, s, c in zip(boxes.double(), scores, labels)]  # fmt: skip
    merged = sahi_combine.GreedyNMMPostprocess(match_threshold=0.5, match_metric="IOS", class_agnostic=False)(
        predictions
    )
    theirs = sorted((p.score.value, p.category.id, *p.bbox.to_xyxy()) for p in merged)
    mine = sorted((float(s), int(c), *b.tolist()) for s, c, b in zip(ours.scores, ours.labels, ours.boxes))
    assert len(mine) == len(theirs) < 300
    np.testing.assert_allclose(np.array(mine), np.array(theirs), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Memory: what reaches the model is bounded by construction
# ---------------------------------------------------------------------------------------------------------------------


def test_the_model_only_ever_sees_slices_and_a_reduced_whole_image():
    image = np.zeros((1500, 2000, 3), np.uint8)
    image.setflags(write=False)  # and it is never written
    seen: list[tuple[int, ...]] = []

    def detect(crops):
        seen.extend(tuple(c.shape) for c in crops)
        assert all(c.dtype == torch.float32 for c in crops)
        return [Detections(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64)) for _ in crops]

    config = TileConfig(size=128, overlap=0.2, full_image=True, batch_size=8)
    predict_tiled(as_hwc(image), config, detect, full_image_size=(192, 256))
    slices, whole = seen[:-1], seen[-1]
    assert len(slices) == len(slice_windows(1500, 2000, config)) and all(s == (3, 128, 128) for s in slices)
    assert whole == (3, 1500 // 7, 2000 // 7)  # the largest integer factor keeping it >= 192 x 256


def test_reduce_image_is_a_block_mean_computed_in_bands(monkeypatch):
    import cascade_rcnn.inference.tiling as tiling

    image = _image(70, 53, seed=3)
    expected = image[:69, :51].reshape(23, 3, 17, 3, 3).astype(np.float64).mean(axis=(1, 3))
    monkeypatch.setattr(tiling, "_BAND_PIXELS", 100)  # a few rows per band
    reduced = reduce_image(as_hwc(image), 3)
    np.testing.assert_allclose(reduced.permute(1, 2, 0).numpy(), expected, atol=1e-4)
    assert torch.equal(reduce_image(as_hwc(image), 1), torch.from_numpy(image).permute(2, 0, 1).float())


# ---------------------------------------------------------------------------------------------------------------------
# SAHI adapter
# ---------------------------------------------------------------------------------------------------------------------


def test_sahi_adapter_runs_in_sahis_pipeline(detector):
    pytest.importorskip("sahi", reason="sahi not installed (pip install '.[sahi]')")
    from sahi.predict import get_prediction, get_sliced_prediction

    from cascade_rcnn.integrations.sahi import CascadeRCNNDetectionModel

    model = CascadeRCNNDetectionModel(model=detector, confidence_threshold=0.0, device="cpu")
    image = _image(128, 128, seed=1)
    plain = detector.predict(image)
    result = get_prediction(image, model, shift_amount=[0, 0], full_shape=None, postprocess=None, verbose=0)
    boxes = torch.tensor([p.bbox.to_xyxy() for p in result.object_prediction_list], dtype=torch.float32)
    assert len(boxes) == len(plain) > 0
    torch.testing.assert_close(boxes, plain.boxes, atol=1e-3, rtol=0)
    assert [p.category.name for p in result.object_prediction_list] == plain.names

    big = np.concatenate([image, image], axis=1)
    sliced = get_sliced_prediction(big, model, slice_height=128, slice_width=128, overlap_height_ratio=0.0,
                                   overlap_width_ratio=0.0, perform_standard_pred=False, batch_size=2, verbose=0)
    right = [p.bbox.to_xyxy() for p in sliced.object_prediction_list if p.bbox.to_xyxy()[0] >= 128]
    assert right and all(0 <= v <= 256 for box in right for v in box)


def test_sahi_adapter_without_sahi_is_one_line_naming_the_extra(monkeypatch):
    import builtins
    import importlib
    import sys

    real_import = builtins.__import__

    def no_sahi(name, *args, **kwargs):
        if name == "sahi" or name.startswith("sahi."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sahi)
    monkeypatch.delitem(sys.modules, "cascade_rcnn.integrations.sahi", raising=False)
    with pytest.raises(ImportError) as error:
        importlib.import_module("cascade_rcnn.integrations.sahi")
    assert str(error.value) == "cascade_rcnn.integrations.sahi needs SAHI: pip install 'cascade-rcnn[sahi]'"
