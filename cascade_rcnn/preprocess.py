"""The input convention outside the network, in numpy: how an image is resized, normalised and padded into the
graph's inputs, and how boxes go back. No torch here: the PyTorch `Transform` (`cascade_rcnn.modeling.transform`)
uses these rules and pixel arithmetic, and `cascade_rcnn.deploy.lean` runs an exported graph with them alone.

Each peer's convention is an object that `input_convention` chooses from the config (the one place that reads
`TransformConfig`):

- mmdetection: `KeepRatioResize` (mmcv `imrescale`), pixels resized in OpenCV's fixed-point bilinear arithmetic
  (`resize_cv2_array`, bit-exact with mmcv's cv2), `PadToMultiple(32)`, boxes back through each axis' factor;
- detectron2: `ShortestEdgeResize` (`ResizeShortestEdge`, in its float order), Pillow's bilinear resize
  (`resize_pil_array`, antialiased when shrinking), BGR channel order;
- the seed (MindSpore): `SecondRescale` (an image still taller than min_size is resized again to that height), a
  `FixedCanvas` padded before normalisation whose whole extent the RPN and heads clip to, and boxes back through the
  resize scale itself (`scalar_factors`).

    convention = input_convention(config.transform)
    feeds = ArrayTransform(convention)([rgb_array])   # images, image_sizes, scale_factors, original_sizes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cascade_rcnn.config import TransformConfig

class KeepRatioResize:
    """mmcv `imrescale`: s = min(max_size / long side, min_size / short side), new size = int(side * s + 0.5)."""

    def __init__(self, *, min_size: int = 800, max_size: int = 1333) -> None:
        self.min_size, self.max_size = min_size, max_size

    def steps(self, h: int, w: int, min_size: int | None = None) -> tuple[list[tuple[int, int]], float]:
        """The (new_h, new_w) of each successive resize of an (h, w) image, and the overall scale s."""
        min_size = self.min_size if min_size is None else min_size
        scale = min(self.max_size / max(h, w), min_size / min(h, w))
        return [_at_least_one(h * scale + 0.5, w * scale + 0.5)], scale


class ShortestEdgeResize(KeepRatioResize):
    """detectron2 `ResizeShortestEdge.get_output_shape`, in its float order: the short side to min_size, the long side
    with it, both scaled down when the long side exceeds max_size, then + 0.5 truncated (~1 size in 10^4 differs by
    one pixel from `KeepRatioResize`)."""

    def steps(self, h: int, w: int, min_size: int | None = None) -> tuple[list[tuple[int, int]], float]:
        min_size = self.min_size if min_size is None else min_size
        scale = min_size / min(h, w)
        new_h, new_w = (min_size, scale * w) if h < w else (scale * h, min_size)
        if max(new_h, new_w) > self.max_size:
            cap = self.max_size / max(new_h, new_w)
            new_h, new_w, scale = new_h * cap, new_w * cap, scale * cap
        return [_at_least_one(new_h + 0.5, new_w + 0.5)], scale


class SecondRescale(KeepRatioResize):
    """The seed's portrait rule: after `first`, an image still taller than min_size is resized a second time, in a
    second bilinear pass, to height min_size (mmcv imrescale to (min_size, min_size): min(m / long, m / short) = m / long
    side), so that it fits the fixed canvas."""

    def __init__(self, first: KeepRatioResize) -> None:
        super().__init__(min_size=first.min_size, max_size=first.max_size)
        self.first = first

    def steps(self, h: int, w: int, min_size: int | None = None) -> tuple[list[tuple[int, int]], float]:
        min_size = self.min_size if min_size is None else min_size
        steps, scale = self.first.steps(h, w, min_size)
        nh, nw = steps[-1]
        if nh <= min_size:
            return steps, scale
        second = min_size / max(nh, nw)
        return [*steps, _at_least_one(nh * second + 0.5, nw * second + 0.5)], scale * second


def _at_least_one(h: float, w: float) -> tuple[int, int]:
    """(int(h), int(w)), each at least 1: a sliver such as a 1 x 3000 image would otherwise resize to nothing (the
    peers fail there; a one-pixel side keeps it detectable, with a scale factor that maps boxes back exactly)."""
    return max(int(h), 1), max(int(w), 1)


class PadToMultiple:
    """Pad the batch bottom/right to its largest image rounded up to a multiple of `divisor` (mmdetection,
    detectron2: padding is 0 in normalised space, and each image's own extent is what the RPN and heads clip to).

    The seed's variations are options: `pad_before_normalize` pads the 0-255 image with zeros, then normalises, so
    padding is -mean / std; `clip_to_canvas` tells the RPN and heads that every image spans the whole padded canvas
    (boxes clipped to it, training anchors kept inside it), whatever the image's size.
    """

    def __init__(self, divisor: int = 32, *, pad_before_normalize: bool = False, clip_to_canvas: bool = False) -> None:
        self.divisor = divisor
        self.pad_before_normalize = pad_before_normalize
        self.clip_to_canvas = clip_to_canvas

    def size(self, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """(H, W) of the canvas for resized images of `sizes`."""
        d = self.divisor
        return -(-max(s[0] for s in sizes) // d) * d, -(-max(s[1] for s in sizes) // d) * d

    def fill(self, tensor: Any, pixel_mean: Any, pixel_std: Any) -> None:
        """Write the padding value into a fresh canvas `tensor` (B, 3, H, W) of zeros (a numpy array or a torch
        tensor, with `pixel_mean` and `pixel_std` (3, 1, 1) of the same kind)."""
        if self.pad_before_normalize:
            tensor[:] = (0.0 - pixel_mean) / pixel_std

    def extents(self, sizes: list[tuple[int, int]], canvas: tuple[int, int]) -> list[tuple[int, int]]:
        """Each image's extent as the RPN and heads see it."""
        return [canvas] * len(sizes) if self.clip_to_canvas else list(sizes)


class FixedCanvas(PadToMultiple):
    """The seed's fixed canvas: every image padded into (h, w) = `size`; an image larger than it is an error."""

    def __init__(self, size: tuple[int, int], *, pad_before_normalize: bool = False, clip_to_canvas: bool = False) -> None:
        super().__init__(1, pad_before_normalize=pad_before_normalize, clip_to_canvas=clip_to_canvas)
        self.canvas = (int(size[0]), int(size[1]))

    def size(self, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        pad_h, pad_w = self.canvas
        if any(h > pad_h or w > pad_w for h, w in sizes):
            raise ValueError(f"resized images {sizes} do not fit the fixed canvas pad_to={self.canvas}")
        return self.canvas


def per_axis_factors(resized: tuple[int, int], original: tuple[int, int], scale: float) -> tuple[float, float]:
    """(w_scale, h_scale) = (new_w / w, new_h / h): boxes go back through each axis' own factor (mmdetection)."""
    return resized[1] / original[1], resized[0] / original[0]


def scalar_factors(resized: tuple[int, int], original: tuple[int, int], scale: float) -> tuple[float, float]:
    """(s, s): boxes go back through the resize scale itself on both axes (mmcv imrescale's scale, the seed's)."""
    return scale, scale



# ---------------------------------------------------------------------------------------------------------------------
# Pixels


def cv2_linear_taps(dst: int, src: int, clamp_outside: bool) -> tuple[np.ndarray, ...]:
    """Source indices (first, second) int64 and 11-bit weights (w0, w1) int32 of each of `dst` outputs along an axis
    of `src`, as OpenCV's INTER_LINEAR computes them."""
    # float64 position rounded to float32, as OpenCV: (float)((d + 0.5) * scale - 0.5) with scale = 1 / (dst / src).
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    first = np.floor(pos)
    frac = pos - first
    first = first.astype(np.int64)
    if clamp_outside:
        frac = np.where((first < 0) | (first >= src - 1), np.float32(0), frac)
    w0 = np.rint((1 - frac) * 2048).astype(np.int32)  # round half to even, as cvRound
    w1 = np.rint(frac * 2048).astype(np.int32)
    return first.clip(0, src - 1), (first + 1).clip(0, src - 1), w0, w1


def cv2_bilinear(x: Any, x_taps: tuple[Any, ...], y_taps: tuple[Any, ...]) -> Any:
    """OpenCV's fixed-point bilinear resize of `x` (..., H, W) int32, 0..255, with the taps of `cv2_linear_taps`
    (numpy arrays, or torch tensors on `x`'s device: the arithmetic is the same integer code for both). Columns past
    the border take weight (1, 0); rows keep their fractional weights on the clamped row (OpenCV clamps the two
    differently). The vertical pass truncates as OpenCV's SIMD code does: ((r0 >> 4) * b0 >> 16) + ((r1 >> 4) * b1
    >> 16), then (+ 2) >> 2."""
    x0, x1, a0, a1 = x_taps
    y0, y1, b0, b1 = y_taps
    rows = x[..., x0] * a0 + x[..., x1] * a1  # weights sum to 2048
    rows >>= 4
    out = (rows[..., y0, :] * b0[:, None]) >> 16
    out += (rows[..., y1, :] * b1[:, None]) >> 16
    out += 2
    out >>= 2
    return out


def resize_cv2_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) values 0..255 (any dtype; rounded) -> (3, h, w) float32, integer-valued, for `size` = (h, w), in
    OpenCV's `cv2.resize(..., INTER_LINEAR)` arithmetic (`cv2_bilinear`)."""
    x = np.rint(image).clip(0, 255).astype(np.int32)
    (h, w), (src_h, src_w) = size, x.shape[-2:]
    out = cv2_bilinear(x, cv2_linear_taps(w, src_w, True), cv2_linear_taps(h, src_h, False))
    return out.clip(0, 255).astype(np.float32)


def resize_pil_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's `Image.resize(size, BILINEAR)` of the 8-bit image, as detectron2's `ResizeShortestEdge` runs it:
    (3, H, W) values 0..255 (any dtype; rounded) -> (3, h, w) float32, integer-valued, for `size` = (h, w). Pillow
    widens its triangle filter by the shrink factor, so shrinking is antialiased (a plain bilinear resize differs by up
    to 30 levels there)."""
    array = np.rint(image).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    resized = Image.fromarray(np.ascontiguousarray(array)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32).transpose(2, 0, 1)


RESIZE_ARRAYS: dict[str, Callable[[np.ndarray, tuple[int, int]], np.ndarray]] = {
    "cv2_bilinear": resize_cv2_array,
    "pil_bilinear": resize_pil_array,
}


# ---------------------------------------------------------------------------------------------------------------------
# The convention, and the whole input transform in numpy


@dataclass(frozen=True)
class InputConvention:
    """What `TransformConfig` decides, as objects: the size rule, the canvas, how boxes go back, the normalisation,
    the channel order and the name of the pixel resize (`RESIZE_ARRAYS`)."""

    resize: KeepRatioResize
    canvas: PadToMultiple
    box_factors: Callable[[tuple[int, int], tuple[int, int], float], tuple[float, float]]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    channels: tuple[int, int, int]
    resize_method: str


def input_convention(t: TransformConfig) -> InputConvention:
    """The convention `t` describes (the PyTorch `Transform` and `ArrayTransform` are both built from it)."""
    rule_class = ShortestEdgeResize if t.resize_rule == "shortest_edge" else KeepRatioResize
    resize = rule_class(min_size=t.min_size, max_size=t.max_size)
    options = {"pad_before_normalize": t.pad_before_normalize, "clip_to_canvas": t.clip_to == "canvas"}
    canvas = PadToMultiple(t.size_divisible, **options) if t.pad_to is None else FixedCanvas(t.pad_to, **options)
    return InputConvention(
        resize=SecondRescale(resize) if t.second_rescale else resize,
        canvas=canvas,
        box_factors=scalar_factors if t.box_scale == "scalar" else per_axis_factors,
        pixel_mean=tuple(t.pixel_mean),
        pixel_std=tuple(t.pixel_std),
        channels=(2, 1, 0) if t.channel_order == "bgr" else (0, 1, 2),
        resize_method=t.resize_method,
    )


class ArrayTransform:
    """The PyTorch `Transform`'s inference path in numpy: resize, colour order, normalisation and padding of RGB
    images into an exported graph's inputs, bit-identical to `Transform` + `ImageBatch.as_tensors`."""

    def __init__(self, convention: InputConvention) -> None:
        self.convention = convention
        self.resize_pixels = RESIZE_ARRAYS[convention.resize_method]
        self.pixel_mean = np.asarray(convention.pixel_mean, dtype=np.float32).reshape(3, 1, 1)
        self.pixel_std = np.asarray(convention.pixel_std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """(H, W, 3) RGB 0-255 arrays -> {"images": (B, 3, H, W) float32, "image_sizes": (B, 2) int64,
        "scale_factors": (B, 2) float64 (w_scale, h_scale), "original_sizes": (B, 2) int64}."""
        c = self.convention
        original_sizes = [tuple(img.shape[:2]) for img in images]
        resized, scales = [], []
        for img in images:
            chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
            steps, scale = c.resize.steps(*chw.shape[-2:])
            for size in steps:
                if size != tuple(chw.shape[-2:]):
                    chw = self.resize_pixels(chw, size)
            resized.append(chw)
            scales.append(scale)
        sizes = [tuple(img.shape[-2:]) for img in resized]
        canvas = c.canvas.size(sizes)
        batch = np.zeros((len(images), 3, *canvas), dtype=np.float32)
        c.canvas.fill(batch, self.pixel_mean, self.pixel_std)
        for i, img in enumerate(resized):
            batch[i, :, : img.shape[1], : img.shape[2]] = (img[list(c.channels)] - self.pixel_mean) / self.pixel_std
        factors = [c.box_factors(s, o, scale) for s, o, scale in zip(sizes, original_sizes, scales)]
        return {
            "images": batch,
            "image_sizes": np.asarray(c.canvas.extents(sizes, canvas), dtype=np.int64).reshape(-1, 2),
            "scale_factors": np.asarray(factors, dtype=np.float64).reshape(-1, 2),
            "original_sizes": np.asarray(original_sizes, dtype=np.int64).reshape(-1, 2),
        }
