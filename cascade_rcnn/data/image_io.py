"""Image decoding with Pillow: EXIF orientation applied, every mode converted to 8-bit RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cascade_rcnn.errors import ImageReadError


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to a (H, W, 3) uint8 RGB array, in the orientation a viewer shows (EXIF applied)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(to_rgb(image))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"{path}: cannot read image ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, P, RGBA, CMYK, I;16, ...) to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(array.max(), 1.0) if image.mode != "I;16" else 255.0 / 65535.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")
