"""Detections: what the detector returns for one image."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class Detections:
    """Detections of one image, in original-image pixels.

    boxes: (N, 4) float32 xyxy; scores: (N,); labels: (N,) int64 indices into `class_names`; sorted by decreasing
    score. `masks` (mask models only): (N, H, W) bool instance masks over the original image. `stages` (when asked
    for) holds each cascade stage's own detections: its own scores and boxes, after NMS.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_names: tuple[str, ...] = ()
    stages: list[Detections] | None = field(default=None, repr=False)
    masks: Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def names(self) -> list[str]:
        """The class name of each detection."""
        return [self.class_names[i] if i < len(self.class_names) else str(i) for i in self.labels.tolist()]

    def with_class_names(self, class_names: tuple[str, ...]) -> Detections:
        stages = None if self.stages is None else [s.with_class_names(class_names) for s in self.stages]
        return replace(self, class_names=tuple(class_names), stages=stages)

    def to(self, device: str) -> Detections:
        stages = None if self.stages is None else [s.to(device) for s in self.stages]
        masks = None if self.masks is None else self.masks.to(device)
        return replace(self, boxes=self.boxes.to(device), scores=self.scores.to(device),
                       labels=self.labels.to(device), stages=stages, masks=masks)

    def filter(self, score_thresh: float) -> Detections:
        keep = self.scores >= score_thresh
        masks = None if self.masks is None else select_masks(self.masks, keep)
        return replace(self, boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep], masks=masks)


def select_masks(masks: Any, keep: Any) -> Any:
    """`masks[keep]` for (N, H, W) bool masks (a tensor or a numpy array) and a bool `keep` (N,), copying only the
    rows that hold a True pixel. A pasted mask is False outside its box, and the array it was pasted into (np.zeros)
    leaves the memory of those rows unwritten, so it is never made resident: a whole-array copy would write every
    byte, which is 1.2 GB for 100 masks of a 12 MP photo. Keeping every mask copies nothing."""
    if not isinstance(masks, np.ndarray) and masks.device.type != "cpu":
        return masks[keep]
    rows_kept = np.flatnonzero(np.asarray(keep))
    if len(rows_kept) == len(masks):
        return masks
    source = np.asarray(masks)
    out = np.zeros((len(rows_kept), *source.shape[1:]), dtype=source.dtype)
    for j, i in enumerate(rows_kept):
        rows = np.flatnonzero(source[i].any(axis=1))
        if len(rows):
            out[j, rows[0] : rows[-1] + 1] = source[i, rows[0] : rows[-1] + 1]
    if isinstance(masks, np.ndarray):
        return out
    import torch

    return torch.from_numpy(out)
