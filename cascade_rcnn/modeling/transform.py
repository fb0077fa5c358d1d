"""Input transform: resize, normalisation and padding into one batch tensor, and the way back.

The transform owns the resize, so callers give and get original-image pixels. Each peer's convention is an object
that `build_transform` chooses from the config:

- mmdetection: `KeepRatioResize` (mmcv `imrescale`), pixels resized in OpenCV's fixed-point bilinear arithmetic
  (`resize_bilinear_cv2`, bit-exact with mmcv's cv2), `PadToMultiple(32)`, boxes back through each axis' factor;
- detectron2: `ShortestEdgeResize` (`ResizeShortestEdge`, in its float order), Pillow's bilinear resize
  (`resize_bilinear_pil`, antialiased when shrinking), BGR channel order;
- the seed (MindSpore): `SecondRescale` (an image still taller than min_size is resized again to that height), a
  `FixedCanvas` padded before normalisation whose whole extent the RPN and heads clip to, and boxes back through the
  resize scale itself (`scalar_factors`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn


@dataclass
class ImageBatch:
    tensor: Tensor  # (B, 3, H_pad, W_pad) normalised, padded bottom/right to a multiple of size_divisible or pad_to
    # (h, w) of each image's extent for the RPN and heads (clipping, valid anchors): the resized image inside the
    # padding, or the whole padded canvas with clip_to="canvas"
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]  # (h, w) of each input image
    scale_factors: list[tuple[float, float]]  # (w_scale, h_scale) = (new_w / w, new_h / h)

    def as_tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(images, image_sizes (B, 2) int64, scale_factors (B, 2) float64, original_sizes (B, 2) int64): the inputs
        of `CascadeRCNN.detect` and of the ONNX graph."""
        device = self.tensor.device
        return (
            self.tensor,
            torch.tensor(self.image_sizes, dtype=torch.int64, device=device).reshape(-1, 2),
            torch.tensor(self.scale_factors, dtype=torch.float64, device=device).reshape(-1, 2),
            torch.tensor(self.original_sizes, dtype=torch.int64, device=device).reshape(-1, 2),
        )


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

    def fill(self, tensor: Tensor, pixel_mean: Tensor, pixel_std: Tensor) -> None:
        """Write the padding value into a fresh canvas `tensor` (B, 3, H, W) of zeros."""
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


class Transform(nn.Module):
    """Resize, colour order, normalisation and padding into one batch tensor, and the way back; each convention is
    an object or a function given by `build_transform`:

    - `resize`: the size rule (`KeepRatioResize`, `ShortestEdgeResize`, `SecondRescale`);
    - `resize_pixels`: how pixels are resized (`resize_bilinear_cv2`, `resize_bilinear_pil`);
    - `canvas`: the padding and what the network is told each image's extent is (`PadToMultiple`, `FixedCanvas`);
    - `box_factors`: how boxes go back to original pixels (`per_axis_factors`, `scalar_factors`);
    - `channels`: the order in which the network's first conv takes the RGB channels ((0, 1, 2), or (2, 1, 0) BGR).
    """

    def __init__(
        self,
        *,
        resize: KeepRatioResize,
        resize_pixels: Callable[[Tensor, tuple[int, int]], Tensor],
        canvas: PadToMultiple,
        box_factors: Callable[[tuple[int, int], tuple[int, int], float], tuple[float, float]] = per_axis_factors,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
        channels: tuple[int, int, int] = (0, 1, 2),
    ) -> None:
        super().__init__()
        self.resize_rule = resize
        self.resize_pixels = resize_pixels
        self.canvas = canvas
        self.box_factors = box_factors
        self.channels = list(channels)
        # Constants of the config, not weights: made on the CPU even when the model is built on the meta device.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, device="cpu").view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, device="cpu").view(3, 1, 1), persistent=False)

    @property
    def min_size(self) -> int:
        return self.resize_rule.min_size

    @property
    def max_size(self) -> int:
        return self.resize_rule.max_size

    def resize_steps(self, h: int, w: int, min_size: int | None = None) -> tuple[list[tuple[int, int]], float]:
        """The (new_h, new_w) of each successive resize of an (h, w) image (one, or two with `SecondRescale`) and the
        overall scale s (the product of the steps' scales)."""
        return self.resize_rule.steps(h, w, min_size)

    def resized_size(self, h: int, w: int, min_size: int | None = None) -> tuple[int, int]:
        """(new_h, new_w) for an (h, w) image."""
        return self.resize_steps(h, w, min_size)[0][-1]

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        """The (h, w) of the input tensor an (h, w) image alone is padded into."""
        return self.canvas.size([self.resized_size(h, w)])

    def resize(self, image: Tensor, min_size: int | None = None) -> Tensor:
        """(3, H, W) RGB 0-255 (any dtype) -> (3, h, w) float32 at the configured scale, integer-valued."""
        image = image.float()
        for size in self.resize_steps(*image.shape[-2:], min_size)[0]:
            if size != tuple(image.shape[-2:]):
                # Each pass is rounded to integer levels: the seed's second pass resizes the first one's uint8 output.
                image = self.resize_pixels(image, size)
        return image

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, min_size: int | None = None
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        """Resize, normalise and pad `images` ((3, H, W) RGB 0-255); scale target boxes into the resized frame."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        scales = [self.resize_steps(*size, min_size)[1] for size in original_sizes]
        resized = [self.resize(img, min_size) for img in images]
        batch = self.batch(resized, original_sizes, scales)
        if targets is not None:
            targets = [
                {**t, "boxes": t["boxes"] * t["boxes"].new_tensor([sw, sh, sw, sh])}
                for t, (sw, sh) in zip(targets, batch.scale_factors)
            ]
            for t, img in zip(targets, resized):
                if "masks" in t:  # instance masks (G, H, W), nearest-neighbour as mmcv rescales them
                    t["masks"] = resize_masks(t["masks"], tuple(img.shape[-2:]))
        return batch, targets

    def batch(
        self, resized: list[Tensor], original_sizes: list[tuple[int, int]], scales: list[float] | None = None
    ) -> ImageBatch:
        """Normalise and pad already-resized RGB images into one tensor; `original_sizes` give the scale factors
        (with `scalar_factors`, `scales`: each image's resize scale s, computed from its size when not given)."""
        sizes = [tuple(img.shape[-2:]) for img in resized]
        canvas = self.canvas.size(sizes)
        tensor = resized[0].new_zeros((len(resized), 3, *canvas), dtype=torch.float32)
        self.canvas.fill(tensor, self.pixel_mean, self.pixel_std)
        for i, img in enumerate(resized):
            img = img[self.channels]
            tensor[i, :, : img.shape[1], : img.shape[2]] = (img.float() - self.pixel_mean) / self.pixel_std
        if scales is None:
            scales = [self.resize_steps(*size)[1] for size in original_sizes]
        factors = [self.box_factors(s, o, scale) for s, o, scale in zip(sizes, original_sizes, scales)]
        return ImageBatch(tensor, self.canvas.extents(sizes, canvas), list(original_sizes), factors)

    @staticmethod
    def to_original(boxes: Tensor, scale_factor: tuple[float, float]) -> Tensor:
        """Boxes (N, 4k) of one image from the resized frame back to original pixels (`boxes_to_original`)."""
        factors = torch.tensor([scale_factor], dtype=torch.float64, device=boxes.device).expand(boxes.shape[0], 2)
        return boxes_to_original(boxes, factors)


def boxes_to_original(boxes: Tensor, scale_factors: Tensor) -> Tensor:
    """Boxes (N, 4k) from the resized frame back to original pixels; `scale_factors` (N, 2) float64 (w_scale,
    h_scale) of each box's image. Multiplies by the float64 reciprocals rounded to float32, as mmdetection's
    `scale_boxes`, so results match to the last bit."""
    factors = (1.0 / scale_factors).to(boxes.dtype).repeat(1, 2)  # (N, 4): 1/sw, 1/sh, 1/sw, 1/sh
    return (boxes.unflatten(1, (-1, 4)) * factors[:, None, :]).reshape(boxes.shape)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of masks (G, H, W) to (G, h, w) = `size`, as OpenCV's INTER_NEAREST (mmcv's
    `BitmapMasks.rescale`): output row i takes input row floor(i * (1 / (h / H))), clamped to H - 1 (OpenCV computes
    the factor this way, in double precision); columns likewise."""
    if tuple(size) == tuple(masks.shape[-2:]):
        return masks

    def sources(old: int, new: int) -> Tensor:
        steps = torch.arange(new, dtype=torch.float64) * (1.0 / (new / old))
        return steps.floor().long().clamp(max=old - 1).to(masks.device)

    return masks.index_select(-2, sources(masks.shape[-2], size[0])).index_select(-1, sources(masks.shape[-1], size[1]))


def resize_bilinear_cv2(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of an 8-bit image in OpenCV's `cv2.resize(..., INTER_LINEAR)` arithmetic, which mmdetection's
    `Resize` runs on the decoded uint8 image; bit-exact with it (checked on the mmdetection reference inputs).

    (3, H, W) values 0..255 (any dtype; rounded) -> (3, h, w) float32, integer-valued, for `size` = (h, w). Sampling
    positions are half-pixel centred, weights are 11-bit fixed point. Columns past the border take weight (1, 0); rows
    keep their fractional weights on the clamped row (OpenCV clamps the two differently). The vertical pass truncates
    as OpenCV's SIMD code does: ((r0 >> 4) * b0 >> 16) + ((r1 >> 4) * b1 >> 16), then (+ 2) >> 2. A float resize
    rounded to integers differs from it by 1 at ~12% of the pixels, always upwards.
    """
    x = image.round().clamp(0, 255).to(torch.int32)
    (h, w), (src_h, src_w) = size, x.shape[-2:]
    x0, x1, a0, a1 = _cv2_linear_taps(w, src_w, True, x.device)
    y0, y1, b0, b1 = _cv2_linear_taps(h, src_h, False, x.device)
    rows = x.index_select(-1, x0) * a0 + x.index_select(-1, x1) * a1  # weights sum to 2048
    rows >>= 4
    out = (rows.index_select(-2, y0) * b0[:, None]) >> 16
    out += (rows.index_select(-2, y1) * b1[:, None]) >> 16
    out += 2
    out >>= 2
    return out.clamp_(0, 255).float()


def resize_bilinear_pil(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Pillow's `Image.resize(size, BILINEAR)` of the 8-bit image, as detectron2's `ResizeShortestEdge` runs it.

    (3, H, W) values 0..255 (any dtype, any device; rounded) -> (3, h, w) float32, integer-valued, on the same device,
    for `size` = (h, w). Pillow widens its triangle filter by the shrink factor, so shrinking is antialiased (a plain
    bilinear resize differs by up to 30 levels there); Pillow runs on the CPU.
    """
    array = image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    resized = Image.fromarray(array).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).to(image.device, torch.float32)


def _cv2_linear_taps(dst: int, src: int, clamp_outside: bool, device: torch.device) -> tuple[Tensor, ...]:
    """Source indices (first, second) and 11-bit weights (w0, w1) of each of `dst` outputs along an axis of `src`."""
    # float64 position rounded to float32, as OpenCV: (float)((d + 0.5) * scale - 0.5) with scale = 1 / (dst / src).
    pos = ((torch.arange(dst, dtype=torch.float64, device=device) + 0.5) * (1.0 / (dst / src)) - 0.5).float()
    first = pos.floor()
    frac = pos - first
    first = first.long()
    if clamp_outside:
        frac = torch.where((first < 0) | (first >= src - 1), torch.zeros_like(frac), frac)
    w0 = ((1 - frac) * 2048).round().to(torch.int32)  # round half to even, as cvRound
    w1 = (frac * 2048).round().to(torch.int32)
    return first.clamp(0, src - 1), (first + 1).clamp(0, src - 1), w0, w1
