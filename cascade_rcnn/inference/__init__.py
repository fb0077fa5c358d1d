"""Inference beyond one pass per image: sliced (tiled) inference for large images (`tiling`) and test-time
augmentation (`tta`), both through the model's own detection flow and both box-only.

`predict_augmented` is what `Detector.predict(..., tile=..., tta=...)` and the `predict` / `eval` commands run for one
image: TTA alone detects the image under each view and merges them; tiling detects each slice (under each TTA view
when both are asked for: TTA is then the detector that tiling runs on a slice) and merges across slices.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cascade_rcnn.data.image_io import load_image, to_rgb
from cascade_rcnn.inference.tiling import TileConfig, as_hwc, crop, predict_tiled
from cascade_rcnn.inference.tta import TTAConfig, detect_boxes, predict_tta
from cascade_rcnn.modeling.detector import CascadeRCNN
from cascade_rcnn.structures import Detections

__all__ = ["TTAConfig", "TileConfig", "largest_stride", "load_pixels", "predict_augmented"]

logger = logging.getLogger(__name__)
_said: set[str] = set()


def largest_stride(model: CascadeRCNN) -> int:
    """The stride of the model's coarsest anchor level (64 for P2-P6 FPN presets)."""
    return int(max(model.rpn.anchor_generator.strides))


def load_pixels(image: Any) -> np.ndarray | Tensor:
    """An image input as pixels, without a float copy: a path is decoded (`load_image`, its default size limit), a
    PIL image becomes an (H, W, 3) uint8 array; arrays and tensors are returned as they are."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    return image


def predict_augmented(
    model: CascadeRCNN,
    image: np.ndarray | Tensor,
    *,
    tile: TileConfig | None = None,
    tta: TTAConfig | None = None,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = False,
    name: str = "slices",
) -> Detections:
    """Detections of one image ((H, W[, 3]) array or (3, H, W) tensor, 0-255) with tiling and/or TTA, in its pixels,
    boxes only (`masks` None: a mask model says so once). `batch_size`: images per forward pass (slices with `tile`:
    its own `batch_size`)."""
    if tile is None and tta is None:
        raise ValueError("predict_augmented needs tile or tta")
    if model.mask_heads is not None:
        say_once("tiling and TTA are box-only: this mask model's detections come without masks")
    per_pass = tile.batch_size if tile is not None else batch_size

    def detect(images: list[Tensor]) -> list[Detections]:
        if tta is not None:
            return predict_tta(model, images, tta, batch_size=per_pass)
        return detect_boxes(model, images, batch_size=per_pass)

    pixels = as_hwc(image)
    if tile is None:
        return detect([crop(pixels, (0, 0, pixels.shape[1], pixels.shape[0])).to(device)])[0].to("cpu")
    tile.check_model(largest_stride(model))
    full_size = model.transform.resized_size(pixels.shape[0], pixels.shape[1]) if tile.full_image else None
    return predict_tiled(pixels, tile, detect, full_image_size=full_size, device=device, progress=progress, name=name)


def say_once(message: str) -> None:
    """Log `message` as a warning the first time it is said in this process (one line on stderr by default)."""
    if message not in _said:
        _said.add(message)
        logger.warning(message)
