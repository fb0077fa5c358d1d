"""Matching candidate boxes (anchors or proposals) to ground truth, and sampling a balanced subset for the losses.

Semantics of mmdetection's `MaxIoUAssigner` + `RandomSampler`:
- IoU >= fg_thresh: positive, matched to the gt of highest IoU (the first such gt on ties);
- IoU < bg_thresh: negative (background);
- in between: ignored (never sampled);
- low-quality matches (RPN only): for each gt in order whose best IoU is >= the minimum, every candidate whose IoU
  with it equals that best IoU exactly (float32 ties included) is matched to it, even when the candidate's own best
  gt is another one; a later gt overwrites an earlier one on the same candidate.
IoU is mmdetection's `bbox_overlaps`: no "+1", union floored at 1e-6 (so degenerate boxes give 0, never NaN).

Crowd boxes (`iscrowd`) are never ground truth. With mmdetection's config (`ignore_iof_thr=-1`) and in detectron2
(whose DatasetMapper drops them) they have no effect at all; `ignore_iof_thresh` (mmdetection's `ignore_iof_thr`)
makes every candidate covered by a crowd box (intersection over the candidate's area above it) ignored instead.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

BACKGROUND = -1
IGNORE = -2

logger = logging.getLogger(__name__)


class Matcher:
    def __init__(
        self,
        fg_thresh: float,
        bg_thresh: float,
        low_quality_min_iou: float | None = None,
        ignore_iof_thresh: float | None = None,
    ) -> None:
        self.fg_thresh = fg_thresh
        self.bg_thresh = bg_thresh
        self.low_quality_min_iou = low_quality_min_iou
        self.ignore_iof_thresh = ignore_iof_thresh

    def __call__(self, gt_boxes: Tensor, boxes: Tensor, crowd_boxes: Tensor | None = None) -> Tensor:
        """(N,) int64 for `boxes` (N, 4) against `gt_boxes` (G, 4): the matched gt index, BACKGROUND or IGNORE.

        `crowd_boxes` (C, 4) matter only with `ignore_iof_thresh` set: candidates they cover are IGNORE.
        """
        n = boxes.shape[0]
        iou = pairwise_iou(gt_boxes, boxes)  # (G, N)
        if self.ignore_iof_thresh is not None and crowd_boxes is not None and crowd_boxes.numel() and n:
            # mmdetection sets the covered candidates' IoU with every gt to -1: neither positive nor negative.
            covered = intersection_over_box(crowd_boxes, boxes).amax(dim=0) > self.ignore_iof_thresh
            iou = torch.where(covered[None, :], torch.full_like(iou, -1.0), iou)
        if gt_boxes.shape[0] == 0 or n == 0:
            return torch.full((n,), BACKGROUND, dtype=torch.int64, device=boxes.device)
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


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(M, N) IoU of xyxy `boxes1` (M, 4) with `boxes2` (N, 4), in mmdetection's `bbox_overlaps` float order, so
    that exact ties (which low-quality matching depends on) fall where mmdetection's fall."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - overlap).clamp(min=1e-6)
    return overlap / union


def intersection_over_box(gt_boxes: Tensor, boxes: Tensor) -> Tensor:
    """(G, N): area of intersection of each gt with each box, divided by the box's own area (floored at 1e-6)."""
    lt = torch.max(gt_boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.min(gt_boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / area.clamp(min=1e-6)[None, :]


def training_gt(
    target: dict[str, Tensor], image_size: tuple[int, int], warn: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """The boxes one image trains on: (gt boxes (G, 4), gt labels (G,), crowd boxes (C, 4)), in the resized frame.

    `target` holds `boxes` (N, 4) xyxy, `labels` (N,) and optionally `iscrowd` (N,) bool. Boxes are clipped to the
    image (h, w) = `image_size` (mmdetection's Resize clips them), and boxes left without positive width and height
    are dropped (a zero-size gt has no regression target), with a warning that counts them unless `warn` is False
    (the RPN warns; the cascade stages, reading the same targets, do not repeat it). Crowd boxes are kept apart: they
    are never ground truth (see `Matcher`). An image without boxes trains on background only.
    """
    boxes, valid, crowd = _clipped_gt(target, image_size)
    if warn and not bool(valid.all()):
        logger.warning("dropped %d ground-truth boxes without area inside the image", int((~valid).sum()))
    keep = valid & ~crowd
    return boxes[keep], target["labels"][keep], boxes[valid & crowd]


def training_gt_rows(target: dict[str, Tensor], image_size: tuple[int, int]) -> Tensor:
    """(G,) int64: the rows of `target` that `training_gt` keeps as ground truth, in its order (what per-gt data
    beside the boxes, such as instance masks, is indexed by)."""
    _, valid, crowd = _clipped_gt(target, image_size)
    return torch.nonzero(valid & ~crowd).squeeze(1)


def _clipped_gt(target: dict[str, Tensor], image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """`target`'s boxes clipped to the image, which of them keep an area (valid), and which are crowd boxes."""
    boxes = target["boxes"]
    crowd = target.get("iscrowd")
    crowd = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device) if crowd is None else crowd.to(torch.bool)
    h, w = image_size
    boxes = torch.stack(
        [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1
    )
    # Not `x2 > x1`: a NaN coordinate compares False, so it is dropped too.
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, valid, crowd


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
    negatives. Returns (positive indices, negative indices) into `matches`; IGNORE candidates are never picked.

    As mmdetection's `RandomSampler`: a kind with no more candidates than wanted is taken whole, in ascending order
    (and draws nothing from the generator); otherwise a random subset in random order.
    """
    positive = torch.nonzero(matches >= 0).squeeze(1)
    negative = torch.nonzero(matches == BACKGROUND).squeeze(1)
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    return random_subset(positive, num_pos, generator), random_subset(negative, num_neg, generator)


def random_subset(indices: Tensor, num: int, generator: torch.Generator | None) -> Tensor:
    if num >= indices.numel():
        return indices
    return indices[torch.randperm(indices.numel(), generator=generator)[:num].to(indices.device)]
