"""Post-processing: class-aware NMS and the per-image detection selection.

`batched_nms` follows mmcv's: below 10000 boxes one NMS call on boxes offset by `class * (max coordinate + 1)`, so
classes never suppress each other (and the floats are mmcv's); above, one NMS per class (the offset boxes would make
a single O(N^2) call slow). NMS suppresses when IoU > threshold, areas without "+1" (torchvision `nms`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

SPLIT_THRESHOLD = 10000


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Indices of the kept boxes (NMS within each group), sorted by decreasing score."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] < SPLIT_THRESHOLD or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        offsets = groups.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(groups):
        idx = torch.nonzero(groups == group).squeeze(1)
        keep_mask[idx[nms(boxes[idx], scores[idx], iou_threshold)]] = True
    keep = torch.nonzero(keep_mask).squeeze(1)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def multiclass_nms(
    boxes: Tensor, scores: Tensor, score_thresh: float, nms_thresh: float, max_detections: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class NMS of one image's candidates.

    Args:
        boxes: (N, 4) class-agnostic or (N, C * 4) class-specific boxes.
        scores: (N, C) foreground class scores (background column already removed).
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
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_detections]
    return boxes[keep], scores[keep], labels[keep]
