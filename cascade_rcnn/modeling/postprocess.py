"""Post-processing: class-aware NMS, the per-image selection of a batch's candidates, and `PostProcessor`, which owns
the last step of the detection flow (score threshold, per-class NMS, the way back to original pixels).

`batched_nms` keeps groups (classes, or RPN levels) apart in one of three ways, the `kind`s of
`postprocess.class_nms`:

- "offset" (mmcv's `batched_nms`): below 10000 boxes one NMS call on boxes offset by `group * (max coordinate + 1)`,
  so groups never suppress each other (and the floats are mmcv's); above, mmcv runs one NMS per group, which is
  computed here as one call on boxes shifted apart in float64, where the shifts are exact;
- "per_class": always one NMS call per group (the seed's per-class loop);
- "torchvision": `torchvision.ops.batched_nms` itself, as detectron2 calls it (a per-class loop above 1000 boxes on
  the CPU, the offset trick below, and its own order among tied scores).

NMS suppresses when IoU > threshold, areas without "+1" (torchvision `nms`). When only the best `max_keep` kept boxes
are wanted, NMS runs on the best-scoring candidates first and widens the set only when too few survive: greedy NMS
decides each box from higher-scoring boxes alone, so the result is the same as on all candidates, at a fraction of
the cost when there are 10^4-10^5 of them.

While tracing for ONNX export every kind is the offset trick (a loop cannot be traced), and the images of a batch go
through one ONNX `NonMaxSuppression` with the images as its classes (`ImageNMS`): the results can differ from the
eager ones only where an IoU is within ~1e-4 of the threshold.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchvision.ops import batched_nms as torchvision_batched_nms
from torchvision.ops import nms

from cascade_rcnn.modeling.box_coder import clip_boxes
from cascade_rcnn.modeling.transform import boxes_to_original

SPLIT_THRESHOLD = 10000
NMSKind = Literal["offset", "per_class", "torchvision"]


def is_tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    iou_threshold: float,
    kind: NMSKind = "offset",
    max_keep: int | None = None,
) -> Tensor:
    """Indices of the boxes (N, 4) kept by NMS within each group, sorted by decreasing score; only the first
    `max_keep` when given. `kind` as in the module docstring."""
    if boxes.numel() == 0 or (max_keep is not None and max_keep <= 0):
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if kind == "torchvision":
        return torchvision_batched_nms(boxes, scores, groups, iou_threshold)[:max_keep]
    if kind == "offset" and boxes.shape[0] < SPLIT_THRESHOLD:
        offset_boxes = boxes + (groups.to(boxes) * (boxes.max() + 1))[:, None]
        if max_keep is None:
            return nms(offset_boxes, scores, iou_threshold)
        return _nms_best_first(offset_boxes, scores, iou_threshold, max_keep)
    if kind == "per_class" or max_keep is None:
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


def nms_per_image(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    images: Tensor,
    valid: Tensor,
    num_images: Tensor | int,
    iou_threshold: float,
    max_per_image: int,
    kind: NMSKind = "offset",
    full_nms: bool = False,
) -> tuple[Tensor, Tensor]:
    """NMS of a batch's flat candidate list, each image on its own: (image, index) of the kept candidates.

    boxes (N, 4) >= 0, scores (N,), groups (N,) (classes or RPN levels), images (N,) int64, valid (N,) bool (invalid
    candidates are never kept). The result is grouped by image (ascending), each image's kept candidates by decreasing
    score, at most `max_per_image` each: the per-image `batched_nms` of the eager path, or, while tracing, the offset
    trick with each image's own maximum coordinate in one `ImageNMS`. `full_nms` runs NMS on all of an image's
    candidates, then keeps the first `max_per_image` (mmdetection's proposals: among exactly tied scores, torchvision's
    sort then orders the same candidates as mmdetection's), instead of on the best-scoring ones first.
    """
    if is_tracing():
        return _traced_nms_per_image(boxes, scores, groups, images, valid, num_images, iou_threshold, max_per_image)
    kept_images, kept = [], []
    for image in range(int(num_images)):
        idx = torch.nonzero((images == image) & valid).squeeze(1)
        max_keep = None if full_nms else max_per_image
        keep = idx[batched_nms(boxes[idx], scores[idx], groups[idx], iou_threshold, kind, max_keep)[:max_per_image]]
        kept_images.append(torch.full_like(keep, image))
        kept.append(keep)
    if not kept:
        empty = torch.empty((0,), dtype=torch.int64, device=boxes.device)
        return empty, empty
    return torch.cat(kept_images), torch.cat(kept)


def _traced_nms_per_image(
    boxes: Tensor, scores: Tensor, groups: Tensor, images: Tensor, valid: Tensor, num_images: Tensor | int,
    iou_threshold: float, max_per_image: int,
) -> tuple[Tensor, Tensor]:
    image_ids = torch.arange(num_images, device=boxes.device)
    member = images[None, :] == image_ids[:, None]  # (B, N)
    coords = torch.where(valid, boxes.amax(dim=1), torch.zeros_like(scores))
    image_max = torch.where(member, coords[None, :], torch.zeros_like(coords)[None, :]).amax(dim=1)
    shifted = boxes + (groups.to(boxes.dtype) * (image_max[images] + 1))[:, None]
    per_image = torch.where(member & valid[None, :], scores[None, :], torch.full_like(scores, float("-inf"))[None, :])
    selected = ImageNMS.apply(shifted, per_image, iou_threshold, max_per_image)
    return selected[:, 0], selected[:, 1]


class ImageNMS(torch.autograd.Function):
    """NMS run separately per image over one flat candidate list, exported as one ONNX NonMaxSuppression.

    boxes (N, 4), scores (B, N) with -inf wherever a candidate is not the row's image's (or is invalid). Returns
    (M, 2) int64 rows [image, candidate index], grouped by image, each image's kept candidates by decreasing score
    (ties in index order), at most `max_per_image` each. Suppression when IoU > `iou_threshold` (torchvision's and
    ONNX Runtime's rule): every candidate gets the score -inf in every image but its own, so each image is
    suppressed alone and capped alone.
    """

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou_threshold: float, max_per_image: int) -> Tensor:
        selected = []
        for image, row in enumerate(scores):
            idx = torch.nonzero(row > float("-inf")).squeeze(1)
            keep = idx[nms(boxes[idx], row[idx], iou_threshold)][:max_per_image]
            selected.append(torch.stack([torch.full_like(keep, image), keep], dim=1))
        return torch.cat(selected) if selected else boxes.new_zeros((0, 2), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float, max_per_image: int):
        selected = g.op(
            "NonMaxSuppression",
            g.op("Unsqueeze", boxes, g.op("Constant", value_t=torch.tensor([0]))),
            g.op("Unsqueeze", scores, g.op("Constant", value_t=torch.tensor([0]))),
            g.op("Constant", value_t=torch.tensor([max_per_image], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([float("-inf")], dtype=torch.float32)),
        )
        # Rows are [batch 0, class = image, box index].
        return g.op("Gather", selected, g.op("Constant", value_t=torch.tensor([1, 2])), axis_i=1)


class PostProcessor:
    """Candidates of a batch -> detections in original-image pixels: the score threshold (strict `>`), per-class NMS
    of `class_nms` kind, at most `detections_per_image` per image, and the way back to original pixels.

    `rescale="before_nms"` (mmdetection) maps the boxes to original pixels, then runs NMS; `"after_nms"`
    (detectron2's `detector_postprocess`) runs NMS in the resized frame, then maps the kept boxes back, clips them to
    the original image and drops boxes left empty (so fewer than `detections_per_image` may remain).
    """

    def __init__(
        self,
        *,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_image: int = 100,
        class_nms: NMSKind = "offset",
        rescale: Literal["before_nms", "after_nms", "divide_after_nms"] = "before_nms",
    ) -> None:
        if class_nms not in ("offset", "per_class", "torchvision"):
            raise ValueError(f"unknown class_nms {class_nms!r}")
        if rescale not in ("before_nms", "after_nms", "divide_after_nms"):
            raise ValueError(f"unknown rescale {rescale!r}")
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_image = detections_per_image
        self.class_nms = class_nms
        self.rescale = rescale

    def __call__(
        self, boxes: Tensor, scores: Tensor, roi_images: Tensor, scale_factors: Tensor, original_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections of every image of a batch: `select` without the resized-frame boxes."""
        return self.select(boxes, scores, roi_images, scale_factors, original_sizes)[:4]

    def select(
        self, boxes: Tensor, scores: Tensor, roi_images: Tensor, scale_factors: Tensor, original_sizes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Detections of every image of a batch, and their boxes in the resized frame (where the mask heads pool).

        Args:
            boxes: (R, 4) class-agnostic or (R, 4K) class-specific boxes in the resized frame.
            scores: (R, K) foreground class scores (background column already removed).
            roi_images: (R,) int64 image of each candidate, ascending.
            scale_factors: (B, 2) float64 (w_scale, h_scale); original_sizes: (B, 2) int64 (h, w).
        Returns:
            boxes (D, 4), scores (D,), labels (D,) int64, image (D,) int64: grouped by image, each image's by
            decreasing score; and the same boxes in the resized frame (D, 4). Candidates are flattened
            candidate-major (index = r * K + k) before the score threshold, as mmdetection does.
        """
        r, num_classes = scores.shape[0], scores.shape[1]
        frame_boxes = boxes.unflatten(1, (-1, 4)).expand(r, num_classes, 4).reshape(-1, 4)
        if self.rescale == "before_nms":
            boxes = boxes_to_original(boxes, scale_factors[roi_images])
            boxes = boxes.unflatten(1, (-1, 4)).expand(r, num_classes, 4).reshape(-1, 4)
        else:
            boxes = frame_boxes
        labels = torch.arange(num_classes, device=boxes.device)[None, :].expand(r, num_classes).reshape(-1)
        images = roi_images[:, None].expand(r, num_classes).reshape(-1)
        scores = scores.reshape(-1)
        image, index = nms_per_image(
            boxes, scores, labels, images, scores > self.score_thresh, scale_factors.shape[0], self.nms_thresh,
            self.detections_per_image, self.class_nms,
        )
        boxes, scores, labels, frame_boxes = boxes[index], scores[index], labels[index], frame_boxes[index]
        if self.rescale == "divide_after_nms":
            # mmdetection divides by the float32 scale factors (not a multiplication by their reciprocals).
            boxes = boxes / scale_factors[image].to(boxes.dtype).repeat(1, 2)
        elif self.rescale == "after_nms":
            boxes = clip_boxes(boxes_to_original(boxes, scale_factors[image]), original_sizes[image])
            nonempty = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).squeeze(1)
            boxes, scores, labels, image = boxes[nonempty], scores[nonempty], labels[nonempty], image[nonempty]
            frame_boxes = frame_boxes[nonempty]
        return boxes, scores, labels, image, frame_boxes


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
    kind: NMSKind = "offset",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class NMS of one image's candidates (boxes (N, 4) or (N, 4K), scores (N, K)), already in the frame the
    boxes are wanted in: `PostProcessor` without the rescale. Returns boxes (M, 4), scores (M,), labels (M,)."""
    no_rescale = torch.ones((1, 2), dtype=torch.float64, device=boxes.device)
    process = PostProcessor(
        score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_image=max_detections, class_nms=kind
    )
    images = torch.zeros((scores.shape[0],), dtype=torch.int64, device=boxes.device)
    boxes, scores, labels, _ = process(boxes, scores, images, no_rescale, no_rescale.long())
    return boxes, scores, labels
