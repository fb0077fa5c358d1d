"""Masks on the deployment paths: the ONNX graph's `mask_probs` output and its metadata, pasted by `OnnxModel` with the
model's own `paste_masks` into the masks eager inference gives; a raw .onnx user who pastes by the documented rule
gets the same masks; the optimised copies keep the mask step (the model's own heads, a chunk of RoIs at a time; in
bf16 the heads in bfloat16, probabilities float32); pasting holds one box of floats at a time; the benchmark's mask
figures.

The preset-by-preset agreement of eager, optimised and ONNX Runtime masks on a real image is
`test_eager_optimised_and_onnxruntime_agree_on_every_preset` (tests/test_export.py), with `compare_masks` below.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from cascade_rcnn.api import Detector
from cascade_rcnn.benchmarks.calibrated_weights import calibrate_cascade
from cascade_rcnn.deploy.optimize import MASK_ROIS_PER_CHUNK, BFloat16, RoIChunks, optimize_for_inference
from cascade_rcnn.modeling.masks import paste_masks
from cascade_rcnn.structures import Detections

COCO128 = Path(
    os.environ.get("CASCADE_RCNN_COCO128", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco128")
)
VAL = COCO128 / "val2017"
needs_coco128 = pytest.mark.skipif(
    not (VAL / "000000001000.jpg").is_file(),
    reason=f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128 to its folder)",
)
# Small images, few proposals and narrow mask heads: what is tested here does not depend on the heads' width, and 3
# heads of 256 channels on 100 detections cost ~300 GFLOP a forward.
TINY = {
    "transform.min_size": 128,
    "transform.max_size": 192,
    "rpn.pre_nms_top_n_test": 300,
    "rpn.post_nms_top_n_test": 300,
    "mask.conv_dim": 32,
    "postprocess.detections_per_image": 40,
}
MASK_PRESETS = ["cascade_mask_rcnn_r50_fpn", "cascade_mask_rcnn_r50_fpn_detectron2"]

# Masks of matched detections: IoU >= 0.95, or at most 4 pixels apart (see tests/test_export.py for the figures).
MASK_IOU, MASK_PIXELS = 0.95, 4


def random_image(seed: int, size: tuple[int, int] = (120, 170)) -> torch.Tensor:
    return torch.rand((3, *size), generator=torch.Generator().manual_seed(seed)) * 255


def pair_detections(ref: Detections, out: Detections) -> tuple[torch.Tensor, torch.Tensor]:
    """For each reference detection: whether one of `out` has its label and IoU > 0.99, and the best one's index."""
    iou = box_iou(ref.boxes, out.boxes) * (ref.labels[:, None] == out.labels[None, :])
    best, j = iou.max(dim=1) if len(out) else (torch.zeros(len(ref)), torch.zeros(len(ref), dtype=torch.long))
    return best > 0.99, j


def compare_masks(ref: Detections, out: Detections) -> dict[str, float]:
    """The pasted masks of the detections `pair_detections` matches: how many were compared, how many fail the
    tolerance (IoU < MASK_IOU and more than MASK_PIXELS pixels apart), the worst IoU and the most pixels apart."""
    assert ref.masks is not None and out.masks is not None
    assert ref.masks.dtype == out.masks.dtype == torch.bool and ref.masks.shape[1:] == out.masks.shape[1:]
    matched, j = pair_detections(ref, out)
    a, b = ref.masks[matched].flatten(1), out.masks[j[matched]].flatten(1)
    iou = (a & b).sum(1) / (a | b).sum(1).clamp(min=1)
    differing = (a ^ b).sum(1)
    failing = (iou < MASK_IOU) & (differing > MASK_PIXELS)
    return {"compared": int(matched.sum()), "failing": int(failing.sum()),
            "min_iou": float(iou.min()) if len(iou) else 1.0, "max_pixels": int(differing.max()) if len(iou) else 0}


def assert_masks_not_degenerate(detections: Detections) -> None:
    """Calibrated mask logits: each detection's mask has pixels both in and out of it within its box."""
    assert detections.masks is not None and len(detections) > 0
    for mask, (x1, y1, x2, y2) in zip(detections.masks, detections.boxes.round().long().tolist()):
        inside = mask[y1:y2, x1:x2]
        if inside.numel() >= 16:
            assert 0 < int(inside.sum()) < inside.numel()


@functools.cache
def _calibrated_model(preset: str) -> torch.nn.Module:
    det = Detector(preset, **TINY)
    calibrate_cascade(det.model, random_image(100), delta_std=0.5, logit_std=2.5, background_logit=6.0)
    return det.model


def calibrated_mask_detector(preset: str) -> Detector:
    """A tiny `preset` detector with calibrated random weights (calibrated once per session; tests change only the
    detector's own settings, never the weights)."""
    return Detector(preset, **TINY, model=_calibrated_model(preset))


@pytest.fixture(scope="module", params=MASK_PRESETS)
def exported(request: pytest.FixtureRequest, module_tmp: Path) -> tuple[Detector, Path]:
    """A calibrated tiny mask detector of each mask convention (per-stage heads and mmdetection's rescale; one head
    and detectron2's), exported to ONNX."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from cascade_rcnn.deploy.onnx_export import export_onnx

    det = calibrated_mask_detector(request.param)
    path = export_onnx(det.model, module_tmp / f"{request.param}.onnx", config=det.config,
                       preset=request.param, example_size=(128, 192))  # fmt: skip
    return det, path


def test_mask_graph_contract(exported: tuple[Detector, Path]) -> None:
    import onnx

    from cascade_rcnn.deploy.onnx_export import MASK_OUTPUT, OUTPUT_NAMES

    det, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == [*OUTPUT_NAMES, MASK_OUTPUT]
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert dims[MASK_OUTPUT] == ["detections", 28, 28]
    assert model.graph.output[-1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in model.metadata_props}
    assert float(meta["mask_threshold"]) == det.model.mask_threshold == 0.5
    assert json.loads(meta["cascade_rcnn_config"])["mask"]["heads"] == det.config.mask.heads


def test_torch_free_runtime_masks_equal_the_onnx_detectors(exported: tuple[Detector, Path], tmp_path: Path) -> None:
    """`LeanDetector` (numpy and the runtime; in a process of its own, no torch) gives `OnnxDetector`'s boxes and
    masks to the last bit: the same graph on bit-identical inputs, pasted by the same numpy paste."""
    from PIL import Image

    from cascade_rcnn.deploy.backends import OnnxDetector
    from cascade_rcnn.deploy.lean import LeanDetector
    from test_lean import assert_lean_equals

    _, path = exported
    paths = []
    for seed, size in ((1, (120, 170)), (3, (90, 200))):
        paths.append(tmp_path / f"{seed}.png")
        Image.fromarray(random_image(seed, size).permute(1, 2, 0).byte().numpy()).save(paths[-1])
    lean = LeanDetector(path, threads=2)
    assert lean.mask_threshold == 0.5
    assert_lean_equals(lean, OnnxDetector(path, threads=2), paths)


def test_onnxruntime_masks_equal_eager_and_a_raw_paste(exported: tuple[Detector, Path]) -> None:
    """`OnnxDetector` masks agree with eager inference's (a batch of two of equal padded size, and one by one); a user
    of the raw graph who pastes `mask_probs` by the documented rule gets exactly `OnnxDetector`'s masks."""
    from cascade_rcnn.deploy.backends import OnnxDetector

    det, path = exported
    ort = OnnxDetector(path)
    assert ort.inference_model.mask_threshold == 0.5
    images = [random_image(1), random_image(2), random_image(3, (90, 200))]
    det.optimize = False
    eager = det.predict(images, batch_size=2)
    got = ort.predict(images, batch_size=2)
    for ref, out, image in zip(eager, got, images):
        assert_masks_not_degenerate(ref)
        assert out.masks.shape == (len(out), *image.shape[-2:]) and out.masks.dtype == torch.bool
        m = compare_masks(ref, out)
        assert m["compared"] >= len(ref) - 1 and m["failing"] == 0, m

    model = ort.inference_model
    batch, _ = model.transform(images[:2])
    names = [i.name for i in model.session.get_inputs()]
    feeds = dict(zip(names, (t.numpy() for t in batch.as_tensors())))
    boxes, _, _, image_index, probs = (torch.from_numpy(x) for x in model.session.run(None, feeds))
    assert probs.dtype == torch.float32 and probs.shape == (len(boxes), 28, 28)
    assert float(probs.min()) >= 0.0 and float(probs.max()) <= 1.0
    threshold = float(model.session.get_modelmeta().custom_metadata_map["mask_threshold"])
    for i, expected in enumerate(ort.predict(images[:2], batch_size=2)):
        rows = image_index == i
        raw = paste_masks(probs[rows], boxes[rows], tuple(images[i].shape[-2:]), threshold)
        assert torch.equal(raw, expected.masks)


def test_onnxruntime_image_without_detections_has_no_masks(tmp_path: Path) -> None:
    """No detection passes the graph's score threshold: the mask heads run on no RoI, and no mask is pasted."""
    pytest.importorskip("onnxruntime")
    from cascade_rcnn.deploy.backends import OnnxDetector
    from cascade_rcnn.deploy.onnx_export import export_onnx

    det = Detector("cascade_mask_rcnn_r50_fpn", **TINY, **{"postprocess.score_thresh": 1.0})
    path = export_onnx(det.model, tmp_path / "none.onnx", config=det.config, example_size=(128, 192))
    for out in (OnnxDetector(path).predict(random_image(5)), det.predict(random_image(5))):
        assert len(out) == 0 and out.masks.shape == (0, 120, 170) and out.masks.dtype == torch.bool


def test_optimised_copies_keep_the_mask_step() -> None:
    """The float32 copy runs the model's own mask heads (shared, not copied), a chunk of RoIs at a time, on its
    channels-last maps; the bf16 copy runs each head in bfloat16 (weights the model's, rounded once) and its
    probabilities come out float32. Both run the model's `CascadeMaskHeads.predict` (sigmoid, label, mean)."""
    det = calibrated_mask_detector("cascade_mask_rcnn_r50_fpn")
    model = det.model
    fast = optimize_for_inference(model)
    assert [h.body for h in fast.mask_heads.heads] == list(model.mask_heads.heads)
    assert all(isinstance(h, RoIChunks) and h.rows == MASK_ROIS_PER_CHUNK < 60 for h in fast.mask_heads.heads)
    assert type(fast.mask_heads).predict is type(model.mask_heads).predict
    assert fast.mask_heads.roi_align is model.mask_heads.roi_align
    bf16 = optimize_for_inference(model, bf16=True)
    assert all(isinstance(h.body, BFloat16) for h in bf16.mask_heads.heads) and len(bf16.mask_heads.heads) == 3
    head = bf16.mask_heads.heads[1].body.body
    assert torch.equal(head.logits.weight, model.mask_heads.heads[1].logits.weight.bfloat16())
    assert model.mask_heads.heads[1].logits.weight.dtype == torch.float32  # the model itself is untouched
    assert bf16.mask_heads.roi_align is model.mask_heads.roi_align

    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 256, 64 // s, 96 // s, generator=gen) for s in (1, 2, 4, 8, 16)]
    xy = torch.rand(60, 2, generator=gen) * 300
    image_index = (torch.arange(60)[:, None] % 2).float()
    rois = torch.cat([image_index, xy, xy + torch.rand(60, 2, generator=gen) * 80 + 4], dim=1)
    labels = torch.randint(0, 80, (60,), generator=gen)
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    with torch.inference_mode():
        expected = model.mask_heads.predict(features, rois, labels)
        got = fast.mask_heads.predict(channels_last, rois, labels)
        low = bf16.mask_heads.predict(channels_last, rois, labels)
    assert expected.shape == (60, 28, 28) and expected.dtype == got.dtype == low.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-5
    assert 1e-4 < float((low - expected).abs().max()) < 0.1  # bf16 rounding, not another computation

    det.bf16 = True
    out = det.predict(random_image(1))
    assert len(out) > 0 and out.masks.dtype == torch.bool and out.masks.shape == (len(out), 120, 170)
    assert out.boxes.dtype == torch.float32


def test_paste_holds_one_box_of_floats_at_a_time() -> None:
    """100 detections in a large image: besides the (100, h, w) bool result, what `paste_masks` allocates at once is
    a few float maps of one box (+1 px); never 100 image-size float masks (numpy's allocations, traced)."""
    import tracemalloc

    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(100, 2, generator=gen) * 1500
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=gen) * 300 + 1], dim=1)
    probs = torch.rand(100, 28, 28, generator=gen)
    tracemalloc.start()
    try:
        masks = paste_masks(probs, boxes, (1800, 1900))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert masks.dtype == torch.bool and masks.shape == (100, 1800, 1900)
    largest_box = float(((boxes[:, 2:] - boxes[:, :2]).ceil() + 3).prod(dim=1).max())
    assert peak - masks.numel() <= 100 * largest_box, (peak - masks.numel()) / largest_box


def test_a_misplaced_paste_fails_the_mask_tolerance() -> None:
    """The tolerance the deployment tests use sees the errors a second implementation of a step would make: a paste
    half a pixel off, or the probabilities of one head instead of the mean of three."""
    det = calibrated_mask_detector("cascade_mask_rcnn_r50_fpn")
    det.optimize = False
    image = random_image(1)
    ref = det.predict(image)
    assert len(ref) >= 20
    size = tuple(image.shape[-2:])
    batch, _ = det.model.transform([image])
    with torch.inference_mode():
        boxes, _, labels, _, probs = det.model.detect(*batch.as_tensors())
    assert torch.equal(paste_masks(probs, boxes, size), ref.masks)  # the reference is this paste
    shifted = Detections(ref.boxes, ref.scores, ref.labels, masks=paste_masks(probs, boxes + 0.5, size))
    assert compare_masks(ref, shifted)["failing"] >= len(ref) // 2
    heads = det.model.mask_heads
    with torch.inference_mode():
        features = det.model.fpn(det.model.backbone.feature_maps(batch.tensor))
        frame = boxes * torch.tensor(batch.scale_factors[0] * 2, dtype=torch.float32)
        rois = torch.cat([torch.zeros(len(boxes), 1), frame], dim=1)
        one_head = torch.sigmoid(heads.heads[0](heads.roi_align(features, rois))[torch.arange(len(boxes)), labels])
    single = Detections(ref.boxes, ref.scores, ref.labels, masks=paste_masks(one_head, boxes, size))
    assert compare_masks(ref, single)["failing"] >= len(ref) // 2
