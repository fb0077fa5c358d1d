"""Post-processing: class-aware NMS and the per-image detection selection.

`batched_nms` follows mmcv's: below 10000 boxes one NMS call on boxes offset by `class * (max coordinate + 1)`, so
classes never suppress each other (and the floats are mmcv's); above, one NMS per class (the offset boxes would make
a single O(N^2) call slow). NMS suppresses when IoU > threshold, areas without "+1" (torchvision `nms`).

When only the best `max_keep` kept boxes are wanted (the detections of an image), NMS runs on the best-scoring
candidates first and widens the set only when too few survive: greedy NMS decides each box from higher-scoring boxes
alone, so the result is the same as on all candidates, at a fraction of the cost when there are 10^4-10^5 of them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms as torchvision_batched_nms
from torchvision.ops import nms

SPLIT_THRESHOLD = 10000


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    iou_threshold: float,
    per_group: bool = False,
    max_keep: int | None = None,
) -> Tensor:
    """Indices of the kept boxes (NMS within each group), sorted by decreasing score; only the first `max_keep` when
    given.

    `per_group` always runs one NMS per group (the seed's per-class loop), never the offset trick, whose shifted
    coordinates round differently (except while tracing for export, where the loop cannot be traced).
    """
    if boxes.numel() == 0 or (max_keep is not None and max_keep <= 0):
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if (not per_group and boxes.shape[0] < SPLIT_THRESHOLD) or tracing:
        offsets = groups.to(boxes) * (boxes.max() + 1)
        if max_keep is None or tracing:
            return nms(boxes + offsets[:, None], scores, iou_threshold)[:max_keep]
        return _nms_best_first(boxes + offsets[:, None], scores, iou_threshold, max_keep)
    if per_group or max_keep is None:
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for group in torch.unique(groups):
            idx = torch.nonzero(groups == group).squeeze(1)
            keep_mask[idx[nms(boxes[idx], scores[idx], iou_threshold)]] = True
        keep = torch.nonzero(keep_mask).squeeze(1)
        return keep[scores[keep].argsort(descending=True, stable=True)][:max_keep]
    # mmcv's per-class NMS as one call: groups shifted apart in float64, where the shifts are exact, so each IoU is
    # that of the unshifted float32 boxes up to rounding (not the float32 offset trick's coarser coordinates).
    shifted = boxes.double() + (groups.double() * (boxes.max().double() + 1))[:, None]
    return _nms_best_first(shifted, scores.double(), iou_threshold, max_keep)


def _nms_best_first(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int) -> Tensor:
    """The first `max_keep` indices `nms(boxes, scores)` keeps, computed on the best-scoring boxes first."""
    order = scores.argsort(descending=True, stable=True)
    size = min(order.numel(), 16 * max_keep)
    while True:
        # Passed in score order, ties keep their original order, as in one call on all boxes.
        top = order[:size]
        keep = nms(boxes[top], scores[top], iou_threshold)
        if keep.numel() >= max_keep or size == order.numel():
            return top[keep[:max_keep]]
        size = min(order.numel(), 4 * size)


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
    per_class: bool = False,
    torchvision_nms: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class NMS of one image's candidates.

    Args:
        boxes: (N, 4) class-agnostic or (N, C * 4) class-specific boxes.
        scores: (N, C) foreground class scores (background column already removed).
        per_class: one NMS call per class instead of mmcv's class-offset trick (see `batched_nms`).
        torchvision_nms: `torchvision.ops.batched_nms` itself, as detectron2 calls it: a per-class loop above 1000
            candidates on the CPU (5000 on a GPU), the offset trick below, and its own order among tied scores.
    Returns:
        boxes (M, 4), scores (M,), labels (M,) int64, M <= max_detections, sorted by decreasing score. Candidates are
        flattened candidate-major (index = n * C + c) before the score threshold (strict `>`), as mmdetection does.
    """
    n, num_classes = scores.shape
    boxes = boxes.reshape(n, -1, 4).expand(n, num_classes, 4).reshape(-1, 4)
    labels = torch.arange(num_classes, device=scores.device).expand(n, num_classes).reshape(-1)
    scores = scores.reshape(-1)
    keep = torch.nonzero(scores > score_thresh).squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if torchvision_nms:
        keep = torchvision_batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]
    else:
        keep = batched_nms(boxes, scores, labels, nms_thresh, per_class, max_detections)
    return boxes[keep], scores[keep], labels[keep]
