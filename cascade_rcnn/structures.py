"""Detections: what the detector returns for one image."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

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
        masks = None if self.masks is None else self.masks[keep]
        return replace(self, boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep], masks=masks)
