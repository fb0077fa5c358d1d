"""Mask parity with the real mmdetection 3.3.0 and detectron2 Cascade Mask R-CNN R50-FPN (`shared/reference/mmdet_mask`,
`shared/reference/detectron2_mask`; their READMEs give the test-time mask semantics and the tolerances used here).

Most local first: the mask heads on the recorded 14x14 features, the paste of the recorded probabilities (the binary
masks must equal the recorded RLEs exactly), the post-processing of a mask model fed with recorded tensors, the mask
RoIAlign and heads on the recorded detections with the port's own FPN maps, and end to end from the recorded network
input: detections matched by label and box IoU, masks by IoU >= 0.95 or at most 4 differing pixels. Negative tests
show that a half-pixel paste shift and merging logits instead of probabilities are caught.

Run with `-s` to see the largest differences measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from cascade_rcnn.api import Detector
from cascade_rcnn.evaluation.rle import decode_masks, encode_masks
from cascade_rcnn.modeling.masks import paste_masks
from test_mmdet_parity import greedy_match, rel_diff, report

IMAGES = (
    "img00_000000000139",
    "img01_000000000285",
    "img02_000000000632",
    "img03_000000000724",
    "img04_000000000776",
    "img05_000000000785",
)
NETWORK_IMAGE = "img00_000000000139"  # one full forward per peer (a few seconds each on 2 cores)

HEAD_TOL = 1e-4  # mask head on recorded features, relative to max|ref|
POOLED_HEAD_TOL = 1e-3  # the port's own RoIAlign and FPN maps, relative
MERGED_PROB_TOL = 1e-4  # absolute
MASK_IOU = 0.95
MASK_XOR_PIXELS = 4
MATCH_IOU = 0.9


def load_records(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    records = {}
    for name in IMAGES:
        path = folder / f"{name}.npz"
        if not path.is_file():
            pytest.skip(f"reference record {path} not found")
        with np.load(path) as data:
            records[name] = {key: data[key] for key in data.files}
    return records


def original_size(record: dict[str, np.ndarray]) -> tuple[int, int]:
    return tuple(int(v) for v in record["ori_shape"])


def bgr_batch(detector: Detector, bgr_uint8: np.ndarray, size: tuple[int, int]):
    """A recorded, already resized BGR network input as the project's batch (the transform takes RGB)."""
    rgb = torch.from_numpy(np.ascontiguousarray(bgr_uint8[::-1].astype(np.float32)))
    return detector.model.transform.batch([rgb], [size])


def mask_agreement(mine: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """(IoU, differing pixels) of two (H, W) bool masks; two empty masks agree with IoU 1."""
    inter, union = int((mine & ref).sum()), int((mine | ref).sum())
    return (inter / union if union else 1.0), int((mine ^ ref).sum())


def masks_agree(mine: torch.Tensor, ref: torch.Tensor) -> bool:
    iou, xor = mask_agreement(mine, ref)
    return iou >= MASK_IOU or xor <= MASK_XOR_PIXELS


def check_end_to_end(det, ref_boxes, ref_scores, ref_labels, ref_masks, what: str, min_rate: float,
                     score_tol: float) -> None:
    """Detections matched (same label, box IoU >= 0.9, greedy by reference score); matched masks must agree."""
    boxes, scores, labels = det.boxes.numpy(), det.scores.numpy(), det.labels.numpy()
    pairs = greedy_match(ref_boxes, ref_scores, ref_labels, boxes, scores, labels, MATCH_IOU)
    rate = len(pairs) / max(len(ref_scores), len(scores), 1)
    report(f"{what}: detections matched ({len(scores)} vs {len(ref_scores)})", rate, min_rate)
    assert rate >= min_rate
    i, j = np.array(pairs).T
    score_diff = float(np.abs(scores[j] - ref_scores[i]).max())
    report(f"{what}: matched score difference", score_diff, score_tol)
    assert score_diff <= score_tol
    agreements = [mask_agreement(det.masks[b], ref_masks[a]) for a, b in pairs]
    worst_iou = min(iou for iou, _ in agreements)
    worst_xor = max(xor for _, xor in agreements)
    agreeing = sum(iou >= MASK_IOU or xor <= MASK_XOR_PIXELS for iou, xor in agreements) / len(pairs)
    report(f"{what}: matched masks agreeing (worst IoU {worst_iou:.3f}, worst XOR {worst_xor} px)", agreeing, 0.98)
    assert agreeing >= 0.98


# ---------------------------------------------------------------------------------------------------------------------
# mmdetection


@pytest.fixture(scope="module")
def mmdet_records(mmdet_mask_reference_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    return load_records(mmdet_mask_reference_dir)


@pytest.fixture(scope="module")
def mmdet_masks(mmdet_mask_reference_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """The recorded segm results per COCO image id, in detection order."""
    results: dict[int, list[dict[str, Any]]] = {}
    for entry in json.loads((mmdet_mask_reference_dir / "coco_segm_results.json").read_text()):
        results.setdefault(entry["image_id"], []).append(entry)
    return results


@pytest.fixture(scope="module")
def mmdet_detector(mmdet_mask_reference_checkpoint: Path) -> Detector:
    return Detector.from_weights(mmdet_mask_reference_checkpoint)


@pytest.fixture(scope="module")
def mmdet_run(mmdet_detector: Detector, mmdet_records) -> dict[str, Any]:
    """One full forward of NETWORK_IMAGE from the recorded network input, and the FPN maps it pooled from."""
    record = mmdet_records[NETWORK_IMAGE]
    model = mmdet_detector.model
    batch = bgr_batch(mmdet_detector, record["pipeline_inputs_uint8_bgr_chw"], original_size(record))
    caught: dict[str, Any] = {}
    hook = model.fpn.register_forward_hook(lambda _m, _i, out: caught.__setitem__("fpn", out))
    try:
        with torch.no_grad():
            detections = model.predict_batch(batch)[0]
    finally:
        hook.remove()
    return {"detections": detections, "features": caught["fpn"]}


def recorded_rles(record, segm: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    entries = segm.get(int(record["img_id"]), [])
    assert len(entries) == len(record["det_scores"])
    return [e["segmentation"] for e in entries]


def test_mmdet_mask_checkpoint_loads_completely(mmdet_detector: Detector, mmdet_mask_reference_dir: Path) -> None:
    """Every tensor but the batch-norm step counters (the project's batch norm has none), the mask heads included."""
    names = [line.split("\t")[0] for line in (mmdet_mask_reference_dir / "checkpoint_keys.txt").read_text().splitlines()]
    assert len(names) == 400
    tensors = [n for n in names if not n.endswith("num_batches_tracked")]
    report_ = mmdet_detector.load_report
    assert mmdet_detector.preset == "cascade_mask_rcnn_r50_fpn"
    assert (len(report_.loaded), report_.missing, report_.unexpected, report_.skipped) == (len(tensors), [], [], [])
    assert len(mmdet_detector.model.mask_heads.heads) == 3


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_mmdet_mask_heads_on_recorded_features(mmdet_detector: Detector, mmdet_records, stage: int) -> None:
    worst = 0.0
    for record in mmdet_records.values():
        idx = torch.from_numpy(record["mask_feats_sel_idx"])
        labels = torch.from_numpy(record["det_labels"])[idx]
        with torch.no_grad():
            logits = mmdet_detector.model.mask_heads.heads[stage](torch.from_numpy(record["mask_feats_sel"]))
        mine = logits[torch.arange(len(idx)), labels]
        worst = max(worst, rel_diff(mine, record[f"mask_logits_stage{stage}"][idx.numpy()]))
    report(f"mask head {stage} on recorded features, relative", worst, HEAD_TOL)
    assert worst <= HEAD_TOL


def test_mmdet_paste_of_recorded_probabilities_is_exact(mmdet_records, mmdet_masks) -> None:
    """All 444 recorded masks, pixel for pixel: the merged probabilities pasted over the final boxes, >= 0.5."""
    total = 0
    for record in mmdet_records.values():
        masks = paste_masks(torch.from_numpy(record["mask_prob_merged"]), torch.from_numpy(record["det_bboxes"]),
                            original_size(record))
        assert encode_masks(masks) == recorded_rles(record, mmdet_masks)
        np.testing.assert_array_equal(masks.sum(dim=(1, 2)).numpy(), record["det_mask_area"])
        total += len(masks)
    assert total == 444


def test_mmdet_half_pixel_paste_shift_is_caught(mmdet_records, mmdet_masks) -> None:
    """Pasting at pixel corners instead of centres (boxes shifted by half a pixel) breaks the exact equality on
    every image and the IoU / XOR criterion on some masks."""
    failing = 0
    for record in mmdet_records.values():
        shifted = torch.from_numpy(record["det_bboxes"]) + 0.5
        masks = paste_masks(torch.from_numpy(record["mask_prob_merged"]), shifted, original_size(record))
        ref = decode_masks(recorded_rles(record, mmdet_masks), original_size(record))
        assert not masks.equal(ref)
        failing += sum(not masks_agree(m, r) for m, r in zip(masks, ref))
    assert failing >= 10


def test_mmdet_postprocess_of_recorded_prenms(mmdet_detector: Detector, mmdet_records) -> None:
    """NMS in the resized frame, then the kept boxes divided by the float32 scale factors (B1, B6)."""
    post = mmdet_detector.model.postprocessor
    for name, record in mmdet_records.items():
        boxes = torch.from_numpy(record["prenms_bboxes_resized"])
        scores = torch.from_numpy(record["prenms_scores"][:, :80])
        sf = torch.from_numpy(record["scale_factor"]).reshape(1, 2)
        out = post.select(boxes, scores, torch.zeros(len(boxes), dtype=torch.int64), sf,
                          torch.tensor([original_size(record)]))
        final, det_scores, labels, _, resized = out
        np.testing.assert_array_equal(resized.numpy(), record["det_bboxes_resized"], err_msg=name)
        np.testing.assert_array_equal(labels.numpy(), record["det_labels"], err_msg=name)
        np.testing.assert_allclose(det_scores.numpy(), record["det_scores"], rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(final.numpy(), record["det_bboxes"], err_msg=name)


def test_mmdet_mask_roi_align_and_heads_on_recorded_detections(mmdet_detector: Detector, mmdet_run,
                                                                mmdet_records) -> None:
    record = mmdet_records[NETWORK_IMAGE]
    heads = mmdet_detector.model.mask_heads
    rois = torch.from_numpy(record["mask_rois"])
    labels = torch.from_numpy(record["det_labels"])
    rows = torch.arange(len(rois))
    with torch.no_grad():
        pooled = heads.roi_align(mmdet_run["features"], rois)
        for stage, head in enumerate(heads.heads):
            diff = rel_diff(head(pooled)[rows, labels], record[f"mask_logits_stage{stage}"])
            report(f"mask logits stage {stage}, own FPN and RoIAlign, relative", diff, POOLED_HEAD_TOL)
            assert diff <= POOLED_HEAD_TOL
        merged = heads.predict(mmdet_run["features"], rois, labels)
    diff = float((merged - torch.from_numpy(record["mask_prob_merged"])).abs().max())
    report("merged mask probabilities, absolute", diff, MERGED_PROB_TOL)
    assert diff <= MERGED_PROB_TOL
    # Averaging the logits instead of the probabilities (the box scores' rule, not the masks') is caught.
    logits = torch.stack([torch.from_numpy(record[f"mask_logits_stage{s}"]) for s in range(3)])
    wrong = torch.sigmoid(logits.mean(dim=0))
    assert float((wrong - torch.from_numpy(record["mask_prob_merged"])).abs().max()) > 100 * MERGED_PROB_TOL


def test_mmdet_masks_end_to_end(mmdet_run, mmdet_records, mmdet_masks) -> None:
    record = mmdet_records[NETWORK_IMAGE]
    ref_masks = decode_masks(recorded_rles(record, mmdet_masks), original_size(record))
    det = mmdet_run["detections"]
    assert det.masks.shape == (len(det), *original_size(record)) and det.masks.dtype == torch.bool
    check_end_to_end(det, record["det_bboxes"], record["det_scores"], record["det_labels"], ref_masks,
                     f"mmdet {NETWORK_IMAGE}", min_rate=0.97, score_tol=5e-3)


def test_mmdet_logit_merge_end_to_end_is_caught(mmdet_records, mmdet_masks) -> None:
    """Masks from merged logits (sigmoid of the mean) instead of merged probabilities fail the mask criterion."""
    failing = 0
    for record in mmdet_records.values():
        logits = torch.stack([torch.from_numpy(record[f"mask_logits_stage{s}"]) for s in range(3)])
        masks = paste_masks(torch.sigmoid(logits.mean(dim=0)), torch.from_numpy(record["det_bboxes"]),
                            original_size(record))
        ref = decode_masks(recorded_rles(record, mmdet_masks), original_size(record))
        failing += sum(not masks_agree(m, r) for m, r in zip(masks, ref))
    assert failing >= 10


# ---------------------------------------------------------------------------------------------------------------------
# detectron2


@pytest.fixture(scope="module")
def d2_records(detectron2_mask_reference_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    return load_records(detectron2_mask_reference_dir)


@pytest.fixture(scope="module")
def d2_detector(detectron2_mask_reference_checkpoint: Path) -> Detector:
    return Detector.from_weights(detectron2_mask_reference_checkpoint)


def d2_masks(record) -> torch.Tensor:
    size = original_size(record)
    return decode_masks([{"size": list(size), "counts": str(c)} for c in record["det_mask_rle_counts"]], size)


def test_detectron2_mask_checkpoint_loads_completely(d2_detector: Detector) -> None:
    report_ = d2_detector.load_report
    assert d2_detector.preset == "cascade_mask_rcnn_r50_fpn_detectron2"
    assert (len(report_.loaded), report_.missing, report_.unexpected, report_.skipped) == (323, [], [], [])
    assert len(d2_detector.model.mask_heads.heads) == 1


def test_detectron2_mask_head_on_recorded_features(d2_detector: Detector, d2_records) -> None:
    worst = 0.0
    for record in d2_records.values():
        idx = torch.from_numpy(record["mask_feats_sel_idx"])
        labels = torch.from_numpy(record["det_classes"])[idx]
        with torch.no_grad():
            logits = d2_detector.model.mask_heads.heads[0](torch.from_numpy(record["mask_feats_sel"]))
        worst = max(worst, rel_diff(logits[torch.arange(len(idx)), labels], record["mask_logits"][idx.numpy()]))
    report("detectron2 mask head on recorded features, relative", worst, HEAD_TOL)
    assert worst <= HEAD_TOL


def test_detectron2_paste_of_recorded_probabilities_is_exact(d2_records) -> None:
    for name, record in d2_records.items():
        probs = torch.sigmoid(torch.from_numpy(record["mask_logits"]))
        masks = paste_masks(probs, torch.from_numpy(record["det_boxes"]), original_size(record))
        assert [r["counts"] for r in encode_masks(masks)] == [str(c) for c in record["det_mask_rle_counts"]], name
        np.testing.assert_array_equal(masks.sum(dim=(1, 2)).numpy(), record["det_mask_area"])


def test_detectron2_mask_pooler_and_head_on_recorded_detections(d2_detector: Detector, d2_records) -> None:
    record = d2_records[NETWORK_IMAGE]
    model = d2_detector.model
    batch = bgr_batch(d2_detector, record["input_uint8_bgr_chw"], original_size(record))
    with torch.no_grad():
        features = model.fpn(model.backbone.feature_maps(batch.tensor))
        boxes = torch.from_numpy(record["roi_det_boxes"])
        rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
        probs = model.mask_heads.predict(features, rois, torch.from_numpy(record["roi_det_classes"]))
    diff = rel_diff(torch.logit(probs.double()), record["mask_logits"])
    report("detectron2 mask logits, own FPN and pooler, relative", diff, POOLED_HEAD_TOL)
    assert diff <= POOLED_HEAD_TOL


def test_detectron2_masks_end_to_end(d2_detector: Detector, d2_records) -> None:
    record = d2_records[NETWORK_IMAGE]
    batch = bgr_batch(d2_detector, record["input_uint8_bgr_chw"], original_size(record))
    with torch.no_grad():
        det = d2_detector.model.predict_batch(batch)[0]
    check_end_to_end(det, record["det_boxes"], record["det_scores"], record["det_classes"], d2_masks(record),
                     f"detectron2 {NETWORK_IMAGE}", min_rate=0.97, score_tol=1e-3)


def test_detectron2_rles_are_pycocotools_format(d2_records) -> None:
    """The encoder writes what pycocotools reads (a round trip of the recorded masks)."""
    record = d2_records[IMAGES[1]]
    masks = d2_masks(record)
    rles = encode_masks(masks)
    assert np.array_equal(mask_utils.area(rles), record["det_mask_area"])
