"""Test-time augmentation: each image detected as a horizontal flip and at several scales, the views merged.

    image -> views (scale s x {as is, flipped}) -> the model's own flow on each (its transform with the resize scaled
          by s, detect, per-class NMS, back to the view's pixels) -> flipped views' boxes flipped back (x -> W - x)
          -> all views' detections concatenated -> class-aware NMS -> the best `max_per_image`

The merge is mmdetection 3.x's `DetTTAModel`: `merge_aug_bboxes` maps each view's final detections back to the
original image (`bbox_flip`: x1' = W - x2, x2' = W - x1) and concatenates them, then `_merge_single_sample` runs
class-aware NMS (mmcv `batched_nms`, `tta_cfg.nms` IoU 0.5 in its configs) and keeps the first `max_per_img` (100).
Scores are not averaged and boxes are not voted: a detection found by several views keeps the best view's box and
score. Here the NMS is `postprocess.batched_nms` of the model's own kind (mmcv's offset trick for mmdetection
presets), at the model's own NMS IoU and detection cap unless the `TTAConfig` says otherwise.

A scale s multiplies the size the model's transform would resize the image to (1.0: the model's normal input; 1.2:
20% larger on each side), through `ScaledResize` wrapped around the model's own resize rule, so every preset's size
convention stays as it is.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cascade_rcnn.errors import ConfigError
from cascade_rcnn.modeling.detector import CascadeRCNN, split_by_image
from cascade_rcnn.modeling.postprocess import batched_nms
from cascade_rcnn.modeling.transform import KeepRatioResize, Transform
from cascade_rcnn.structures import Detections


@dataclass(frozen=True)
class TTAConfig:
    """Which views test-time augmentation runs and how they are merged.

    scales: factors on the model's own input size, one view each (and one more flipped with `flip`); `(1.0,)` with
    `flip` is mmdetection's flip TTA. nms_thresh / max_per_image: the merge's NMS IoU and detection cap; None takes
    the model's own (`postprocess.nms_thresh`, `postprocess.detections_per_image`).
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    nms_thresh: float | None = None
    max_per_image: int | None = None

    def __post_init__(self) -> None:
        scales = tuple(float(s) for s in self.scales)
        if not scales:
            raise ConfigError("tta scales: give at least one scale (1.0 is the model's own input size)")
        bad = [s for s in scales if not (math.isfinite(s) and 0.1 <= s <= 4.0)]
        if bad:
            raise ConfigError(f"tta scales: {bad[0]} is outside [0.1, 4.0] (a factor on the model's input size)")
        if len(set(scales)) != len(scales):
            raise ConfigError(f"tta scales: {', '.join(map(str, scales))} repeats a scale")
        if self.nms_thresh is not None and not 0.0 < self.nms_thresh <= 1.0:
            raise ConfigError(f"tta nms_thresh: {self.nms_thresh} is outside (0, 1]")
        if self.max_per_image is not None and self.max_per_image < 1:
            raise ConfigError(f"tta max_per_image: {self.max_per_image} is not a positive count")
        object.__setattr__(self, "scales", scales)

    @property
    def num_views(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def describe(self) -> dict[str, object]:
        """What a metrics file records of this TTA."""
        return {"scales": list(self.scales), "flip": self.flip, "nms_thresh": self.nms_thresh,
                "max_per_image": self.max_per_image, "merge": "mmdetection DetTTAModel: concatenate views, class NMS"}


def parse_scales(text: str) -> tuple[float, ...]:
    """`--tta-scales 0.8,1.0,1.2` -> (0.8, 1.0, 1.2); a malformed list is a one-line `ConfigError`."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--tta-scales {text!r}: expected comma-separated numbers, e.g. 0.8,1.0,1.2") from None


class ScaledResize(KeepRatioResize):
    """A resize rule whose final size is `factor` times that of `rule` (each side, + 0.5 truncated, at least 1 px);
    the overall scale is multiplied by `factor` too, so boxes go back to original pixels by either box-factor rule."""

    def __init__(self, rule: KeepRatioResize, factor: float) -> None:
        super().__init__(min_size=round(rule.min_size * factor), max_size=round(rule.max_size * factor))
        self.rule, self.factor = rule, factor

    def steps(self, h: int, w: int, min_size: int | None = None) -> tuple[list[tuple[int, int]], float]:
        steps, scale = self.rule.steps(h, w, min_size)
        last_h, last_w = steps[-1]
        last = (max(1, int(last_h * self.factor + 0.5)), max(1, int(last_w * self.factor + 0.5)))
        return [*steps[:-1], last], scale * self.factor


def scaled_transform(transform: Transform, factor: float) -> Transform:
    """`transform` with its resize scaled by `factor` (itself for 1.0): a shallow copy sharing its buffers."""
    if factor == 1.0:
        return transform
    scaled = copy.copy(transform)
    scaled.resize_rule = ScaledResize(transform.resize_rule, factor)
    return scaled


def detect_boxes(
    model: CascadeRCNN, images: Sequence[Tensor], *, batch_size: int = 1, transform: Transform | None = None
) -> list[Detections]:
    """The model's detections (boxes, scores, labels; no masks, no stages) of `images` ((3, H, W) RGB 0-255 float32,
    on the model's device), in each image's pixels: `transform` (default the model's own), then `CascadeRCNN.detect`.

    Images run together, `batch_size` at a time, only when their padded input sizes are equal (as `Detector.predict`
    groups them), so results equal one-by-one results. A mask model's mask probabilities are computed and dropped:
    masks over a slice or a rescaled view are not pasted (tiling and TTA are box-only).
    """
    transform = model.transform if transform is None else transform
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(transform.padded_size(*image.shape[-2:]), []).append(i)
    results: list[Detections | None] = [None] * len(images)
    with torch.inference_mode():
        for members in groups.values():
            for start in range(0, len(members), max(batch_size, 1)):
                chunk = members[start : start + max(batch_size, 1)]
                batch, _ = transform([images[i] for i in chunk])
                outputs = model.detect(*batch.as_tensors())
                for i, detections in zip(chunk, split_by_image(outputs[:4], len(chunk))):
                    results[i] = detections
    return results  # type: ignore[return-value]


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Boxes (N, 4) xyxy of a horizontally flipped image of `width` px -> the same boxes in the unflipped image
    (mmdetection's `bbox_flip`, horizontal: x1' = W - x2, x2' = W - x1)."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def merge_views(
    views: Sequence[Detections], *, nms_thresh: float, max_per_image: int, kind: str = "offset"
) -> Detections:
    """mmdetection's TTA merge of one image's views (already in its pixels): concatenate, class-aware NMS at
    `nms_thresh` (`postprocess.batched_nms` of `kind`), the first `max_per_image` by decreasing score."""
    boxes = torch.cat([v.boxes for v in views])
    scores = torch.cat([v.scores for v in views])
    labels = torch.cat([v.labels for v in views])
    keep = batched_nms(boxes, scores, labels, nms_thresh, kind, max_per_image)  # type: ignore[arg-type]
    return Detections(boxes[keep], scores[keep], labels[keep])


def predict_tta(
    model: CascadeRCNN, images: Sequence[Tensor], config: TTAConfig, *, batch_size: int = 1
) -> list[Detections]:
    """Detections of each of `images` ((3, H, W) RGB 0-255 float32 on the model's device) under `config`'s views,
    merged as the module docstring says; boxes in each image's pixels, sorted by decreasing score."""
    post = model.postprocessor
    nms_thresh = post.nms_thresh if config.nms_thresh is None else config.nms_thresh
    max_per_image = post.detections_per_image if config.max_per_image is None else config.max_per_image
    per_image: list[list[Detections]] = [[] for _ in images]
    for scale in config.scales:
        transform = scaled_transform(model.transform, scale)
        inputs, owners = [], []
        for i, image in enumerate(images):
            for flipped in (False, True) if config.flip else (False,):
                inputs.append(image.flip(-1) if flipped else image)
                owners.append((i, flipped))
        try:
            outputs = detect_boxes(model, inputs, batch_size=batch_size, transform=transform)
        except ValueError as error:  # FixedCanvas: an enlarged image does not fit the seed's fixed input canvas
            raise ConfigError(f"tta scale {scale}: {error}; this model takes scales <= 1 only") from None
        for (i, flipped), det in zip(owners, outputs):
            if flipped:
                det.boxes = flip_boxes(det.boxes, images[i].shape[-1])
            per_image[i].append(det)
    return [merge_views(v, nms_thresh=nms_thresh, max_per_image=max_per_image, kind=post.class_nms) for v in per_image]
