"""Draw detections on an image with Pillow: one colour per class, "name 0.87" labels on a filled tag, and a mask
model's instance masks as translucent fills with outlines in the same colour."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from cascade_rcnn.data.image_io import to_rgb

RGB = tuple[int, int, int]

# Golden-ratio hue steps: consecutive labels land far apart on the colour wheel, and any number of classes gets
# colours without a fixed palette running out.
_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


def class_color(label: int) -> RGB:
    """A saturated colour for `label`, stable across images and runs; neighbouring labels differ clearly in hue,
    and alternate in brightness so two labels of similar hue still differ."""
    hue = (0.13 + label * _GOLDEN_RATIO_CONJUGATE) % 1.0
    value = 0.95 if label % 2 == 0 else 0.75
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _relative_luminance(color: RGB) -> float:
    """WCAG 2 relative luminance of an sRGB colour, 0 (black) .. 1 (white)."""

    def linear(channel: int) -> float:
        c = channel / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in color)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color_for(background: RGB) -> RGB:
    """Black or white, whichever has the higher WCAG contrast ratio against `background`."""
    lum = _relative_luminance(background)
    contrast_black = (lum + 0.05) / 0.05
    contrast_white = 1.05 / (lum + 0.05)
    return (0, 0, 0) if contrast_black >= contrast_white else (255, 255, 255)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_numpy(values: torch.Tensor | np.ndarray | Sequence, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def draw_detections(
    image: Image.Image | np.ndarray,
    boxes: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    scores: torch.Tensor | np.ndarray | Sequence[float] | None,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    class_names: Sequence[str],
    score_thresh: float = 0.0,
    masks: torch.Tensor | np.ndarray | None = None,
    mask_alpha: float = 0.5,
) -> Image.Image:
    """Return a copy of `image` with each detection whose score is >= `score_thresh` drawn on it.

    Args:
        image: a PIL image (any mode) or a (H, W, 3) / (H, W) uint8 array. Not modified.
        boxes: (N, 4) `xyxy` in the image's pixels.
        scores: (N,) confidences, printed with two decimals; None for ground truth (tags show the class name only).
        labels: (N,) 0-based indices into `class_names` (a label outside it is printed as "class <label>").
        class_names: the model's class names.
        score_thresh: boxes scoring below it are not drawn (nor their masks).
        masks: (N, H, W) bool instance masks over the image (a mask model's), or None.
        mask_alpha: opacity of the mask fill: each masked pixel becomes (1 - alpha) * pixel + alpha * colour.

    Returns:
        An RGB image of the same size. Masks are filled in their box's class colour and outlined in it (the mask's
        inner boundary, one line width thick), under all boxes and tags. Line width and font size grow with the image
        so the drawing stays readable on both thumbnails and large photos; the highest-scoring detections are drawn
        last, so they are on top.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"expected a (H, W, 3) or (H, W) uint8 array, got {image.dtype} {image.shape}")
        canvas = Image.fromarray(image).convert("RGB")  # fromarray shares memory: convert makes the copy we draw on
    else:
        canvas = to_rgb(image).copy()
    boxes_np = _to_numpy(boxes, np.float64).reshape(-1, 4)
    scores_np = np.ones(len(boxes_np)) if scores is None else _to_numpy(scores, np.float64).reshape(-1)
    labels_np = _to_numpy(labels, np.int64).reshape(-1)
    if not (len(boxes_np) == len(scores_np) == len(labels_np)):
        raise ValueError(
            f"boxes, scores, labels disagree in length: {len(boxes_np)}, {len(scores_np)}, {len(labels_np)}"
        )

    width, height = canvas.size
    scale = math.sqrt(width * height)
    line_width = max(1, round(scale / 300))
    font = _font(max(10, round(scale / 45)))
    pad = max(1, line_width)

    keep = np.flatnonzero((scores_np >= score_thresh) & np.isfinite(boxes_np).all(axis=1))
    order = keep[np.argsort(scores_np[keep], kind="stable")]
    if masks is not None:
        masks_np = _to_numpy(masks, bool)
        if masks_np.shape != (len(boxes_np), height, width):
            raise ValueError(f"masks of shape {masks_np.shape} for {len(boxes_np)} detections on a {width}x{height} "
                             f"image, expected ({len(boxes_np)}, {height}, {width})")  # fmt: skip
        # Every fill before any box: a box or its tag is never hidden under another detection's mask.
        # One mask at a time (a view): indexing them all at once would copy every mask whole.
        canvas = _overlay_masks(canvas, [masks_np[i] for i in order], [class_color(int(labels_np[i])) for i in order],
                                mask_alpha, line_width)  # fmt: skip
    draw = ImageDraw.Draw(canvas)

    for i in order:
        x1, y1, x2, y2 = boxes_np[i].tolist()
        label = int(labels_np[i])
        color = class_color(label)
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=color, width=line_width)

        name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        text = name if scores is None else f"{name} {scores_np[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        # Tag above the box's top-left corner; inside the box when there is no room above; kept within the width.
        tag_x = min(max(x1, 0.0), max(width - tag_w, 0))
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else max(y1, 0.0)
        draw.rectangle((tag_x, tag_y, tag_x + tag_w, tag_y + tag_h), fill=color)
        draw.text((tag_x + pad - left, tag_y + pad - top), text, fill=text_color_for(color), font=font)
    return canvas


def _overlay_masks(
    canvas: Image.Image, masks: Sequence[np.ndarray], colors: Sequence[RGB], alpha: float, outline_width: int
) -> Image.Image:
    """`canvas` with each of `masks` ((H, W) bool each, drawn in order: later ones on top) filled at opacity `alpha`
    and outlined, `colors[i]` for mask i. Work is confined to each mask's bounding rectangle."""
    pixels = np.array(canvas)  # (H, W, 3) uint8, a copy
    for mask, color in zip(masks, colors, strict=True):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            continue
        # One line width of margin: the erosion below must see the mask's surroundings.
        top, bottom = max(rows[0] - outline_width, 0), rows[-1] + outline_width + 1
        left, right = max(cols[0] - outline_width, 0), cols[-1] + outline_width + 1
        inside = mask[top:bottom, left:right]
        region = pixels[top:bottom, left:right]
        fill = np.asarray(color, np.float32)
        region[inside] = np.round(region[inside] * (1.0 - alpha) + fill * alpha).astype(np.uint8)
        # The outline is what a (2w+1)-pixel minimum filter (an erosion) removes: the inner boundary, w thick. Pillow
        # extends the edge pixels, so a mask cut by the image border gets no outline along it.
        eroded = Image.fromarray(inside.astype(np.uint8)).filter(ImageFilter.MinFilter(2 * outline_width + 1))
        region[inside & ~np.asarray(eroded, dtype=bool)] = color
    return Image.fromarray(pixels)
