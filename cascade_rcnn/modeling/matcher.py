"""Matching candidate boxes (anchors or proposals) to ground truth, and sampling a balanced subset for the losses.

Semantics of mmdetection's `MaxIoUAssigner` + `RandomSampler`:
- IoU >= fg_thresh: positive, matched to the gt of highest IoU;
- IoU < bg_thresh: negative (background);
- in between: ignored (never sampled);
- low-quality matches (RPN only): every candidate whose IoU with a gt equals that gt's best IoU (>= min IoU) is matched
  to it, so each gt gets at least one positive; a later gt overrides an earlier one on the same candidate.
Crowd ground truth is never matched: candidates it covers (intersection over candidate area > 0.5) that would be
negatives are ignored instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

BACKGROUND = -1
IGNORE = -2


class Matcher:
    def __init__(self, fg_thresh: float, bg_thresh: float, low_quality_min_iou: float | None = None) -> None:
        self.fg_thresh = fg_thresh
        self.bg_thresh = bg_thresh
        self.low_quality_min_iou = low_quality_min_iou

    def __call__(self, gt_boxes: Tensor, boxes: Tensor, gt_crowd: Tensor | None = None) -> Tensor:
        """(N,) int64 for `boxes` (N, 4) against `gt_boxes` (G, 4): the matched gt index, BACKGROUND or IGNORE.

        Crowd gts (`gt_crowd` (G,) bool) are excluded from matching and turn the negatives they cover into IGNORE.
        """
        n = boxes.shape[0]
        if gt_crowd is not None and bool(gt_crowd.any()):
            matches = self._match(gt_boxes[~gt_crowd], boxes)
            real = torch.nonzero(~gt_crowd).squeeze(1)
            matches = torch.where(matches >= 0, real[matches.clamp(min=0)], matches)
            covered = intersection_over_box(gt_boxes[gt_crowd], boxes).amax(dim=0) > 0.5
            return torch.where(covered & (matches == BACKGROUND), torch.full_like(matches, IGNORE), matches)
        if gt_boxes.shape[0] == 0:
            return torch.full((n,), BACKGROUND, dtype=torch.int64, device=boxes.device)
        return self._match(gt_boxes, boxes)

    def _match(self, gt_boxes: Tensor, boxes: Tensor) -> Tensor:
        n = boxes.shape[0]
        if gt_boxes.shape[0] == 0 or n == 0:
            return torch.full((n,), BACKGROUND, dtype=torch.int64, device=boxes.device)
        iou = box_iou(gt_boxes, boxes)  # (G, N)
        max_iou, argmax = iou.max(dim=0)
        matches = torch.full((n,), IGNORE, dtype=torch.int64, device=boxes.device)
        matches[(max_iou >= 0) & (max_iou < self.bg_thresh)] = BACKGROUND
        positive = max_iou >= self.fg_thresh
        matches[positive] = argmax[positive]
        if self.low_quality_min_iou is not None:
            gt_best = iou.max(dim=1, keepdim=True).values  # (G, 1)
            is_best = (iou == gt_best) & (gt_best >= self.low_quality_min_iou)  # (G, N)
            has_best = is_best.any(dim=0)
            # The last gt in order wins ties, as mmdetection's loop over gts overwrites earlier ones.
            last_gt = is_best.shape[0] - 1 - is_best.flip(0).int().argmax(dim=0)
            matches[has_best] = last_gt[has_best]
        return matches


def intersection_over_box(gt_boxes: Tensor, boxes: Tensor) -> Tensor:
    """(G, N): area of intersection of each gt with each box, divided by the box's own area."""
    lt = torch.max(gt_boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.min(gt_boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return inter / area.clamp(min=1e-6)[None, :]


def sampling_generator(target: dict[str, Tensor], stream: int) -> torch.Generator | None:
    """The generator for one image's sampling at one place of the model, or None (torch's global generator).

    A target may carry `sample_seed`, a non-negative int64 scalar below 2**56 (on the CPU, to avoid a device sync).
    Each sampling step then draws from its own generator seeded by (sample_seed, `stream`) (0 for the RPN, k + 1 for
    cascade stage k, < 64), so an image's samples do not depend on the other images of its batch or on the process it
    runs in: a distributed step then equals the single-process step on the combined batch (cascade_rcnn.training).
    """
    seed = target.get("sample_seed")
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed) * 64 + stream)


def sample_indices(
    matches: Tensor, batch_size: int, positive_fraction: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Randomly pick at most `batch_size` candidates: up to `int(batch_size * positive_fraction)` positives, the rest
    negatives. Returns (positive indices, negative indices) into `matches`; IGNORE candidates are never picked."""
    positive = torch.nonzero(matches >= 0).squeeze(1)
    negative = torch.nonzero(matches == BACKGROUND).squeeze(1)
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    pos_perm = torch.randperm(positive.numel(), generator=generator)[:num_pos].to(positive.device)
    neg_perm = torch.randperm(negative.numel(), generator=generator)[:num_neg].to(negative.device)
    return positive[pos_perm], negative[neg_perm]
