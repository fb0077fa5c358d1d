"""Input transform: keep-ratio resize, normalisation and padding into one batch tensor, and the way back.

The transform owns the resize, so callers give and get original-image pixels. Resize (mmcv `imrescale`):
s = min(max_size / long side, min_size / short side), new size = int(size * s + 0.5) per axis, bilinear without
antialiasing, in OpenCV's fixed-point arithmetic for 8-bit images (`resize_bilinear_cv2`: bit-exact with mmcv's cv2).
The two axes' scale factors differ slightly; boxes
go back through each axis' own factor (`box_scale="per_axis"`) or through s itself (`"scalar"`, the seed's).

detectron2's conventions are settings too: `resize_rule="shortest_edge"` computes the size as `ResizeShortestEdge` does
(short side first, then the cap; in its float order, which rounds ~1 size in 10^4 one pixel differently), and
`resize_method="pil_bilinear"` resizes with Pillow as detectron2 does (bit-exact; antialiased when it shrinks).

The seed's (MindSpore) conventions are settings: `second_rescale` resizes an image still taller than min_size a second
time to that height; `pad_to` pads into a fixed canvas; `pad_before_normalize` pads the 0-255 image with zeros so that
padding becomes -mean/std; `clip_to="canvas"` reports the whole canvas as each image's extent to the RPN and heads.
"""

from __future__ import annotations

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


class Transform(nn.Module):
    def __init__(
        self,
        min_size: int = 800,
        max_size: int = 1333,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
        channel_order: str = "rgb",
        size_divisible: int = 32,
        second_rescale: bool = False,
        pad_to: tuple[int, int] | None = None,
        pad_before_normalize: bool = False,
        box_scale: str = "per_axis",
        clip_to: str = "image",
        resize_rule: str = "keep_ratio",
        resize_method: str = "cv2_bilinear",
    ) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size
        self.channel_order = channel_order
        self.size_divisible = size_divisible
        self.second_rescale = second_rescale
        self.pad_to = pad_to
        self.pad_before_normalize = pad_before_normalize
        self.box_scale = box_scale
        self.clip_to = clip_to
        self.resize_rule = resize_rule
        self.resize_method = resize_method
        # Constants of the config, not weights: made on the CPU even when the model is built on the meta device.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, device="cpu").view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, device="cpu").view(3, 1, 1), persistent=False)

    def resize_steps(self, h: int, w: int, min_size: int | None = None) -> tuple[list[tuple[int, int]], float]:
        """The (new_h, new_w) of each successive resize of an (h, w) image (one, or two with `second_rescale`) and the
        overall scale s (the product of the steps' scales)."""
        min_size = self.min_size if min_size is None else min_size
        if self.resize_rule == "shortest_edge":
            # detectron2 `ResizeShortestEdge.get_output_shape`, in its float order.
            scale = min_size / min(h, w)
            new_h, new_w = (min_size, scale * w) if h < w else (scale * h, min_size)
            if max(new_h, new_w) > self.max_size:
                cap = self.max_size / max(new_h, new_w)
                new_h, new_w, scale = new_h * cap, new_w * cap, scale * cap
            steps = [(int(new_h + 0.5), int(new_w + 0.5))]
        else:
            scale = min(self.max_size / max(h, w), min_size / min(h, w))
            steps = [(int(h * scale + 0.5), int(w * scale + 0.5))]
        if self.second_rescale and steps[0][0] > min_size:
            # mmcv imrescale to (min_size, min_size): min(m / long, m / short) = m / long side.
            nh, nw = steps[0]
            second = min_size / max(nh, nw)
            steps.append((int(nh * second + 0.5), int(nw * second + 0.5)))
            scale *= second
        return steps, scale

    def resized_size(self, h: int, w: int, min_size: int | None = None) -> tuple[int, int]:
        """(new_h, new_w) for an (h, w) image."""
        return self.resize_steps(h, w, min_size)[0][-1]

    def resize(self, image: Tensor, min_size: int | None = None) -> Tensor:
        """(3, H, W) RGB 0-255 (any dtype) -> (3, h, w) float32 at the configured scale, integer-valued."""
        image = image.float()
        for size in self.resize_steps(*image.shape[-2:], min_size)[0]:
            if size != tuple(image.shape[-2:]):
                # Each pass is rounded to integer levels: the seed's second pass resizes the first one's uint8 output.
                if self.resize_method == "pil_bilinear":
                    image = resize_bilinear_pil(image, size)
                else:
                    image = resize_bilinear_cv2(image, size)
        return image

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None, min_size: int | None = None
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        """Resize, normalise and pad `images` ((3, H, W) RGB 0-255); scale target boxes into the resized frame."""
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        scales = [self.resize_steps(*size, min_size)[1] for size in original_sizes]
        batch = self.batch([self.resize(img, min_size) for img in images], original_sizes, scales)
        if targets is not None:
            targets = [
                {**t, "boxes": t["boxes"] * t["boxes"].new_tensor([sw, sh, sw, sh])}
                for t, (sw, sh) in zip(targets, batch.scale_factors)
            ]
        return batch, targets

    def batch(
        self, resized: list[Tensor], original_sizes: list[tuple[int, int]], scales: list[float] | None = None
    ) -> ImageBatch:
        """Normalise and pad already-resized RGB images into one tensor; `original_sizes` give the scale factors
        (and, with box_scale="scalar", `scales`: each image's resize scale s, computed from its size when not given)."""
        sizes = [tuple(img.shape[-2:]) for img in resized]
        if self.pad_to is not None:
            pad_h, pad_w = self.pad_to
            if any(h > pad_h or w > pad_w for h, w in sizes):
                raise ValueError(f"resized images {sizes} do not fit the fixed canvas pad_to={self.pad_to}")
        else:
            d = self.size_divisible
            pad_h = -(-max(s[0] for s in sizes) // d) * d
            pad_w = -(-max(s[1] for s in sizes) // d) * d
        tensor = resized[0].new_zeros((len(resized), 3, pad_h, pad_w), dtype=torch.float32)
        if self.pad_before_normalize:
            # Zero padding of the 0-255 image, normalised with it (the seed): padded pixels are -mean / std.
            tensor[:] = (0.0 - self.pixel_mean) / self.pixel_std
        for i, img in enumerate(resized):
            if self.channel_order == "bgr":
                img = img.flip(0)
            # Otherwise normalise, then pad: padded pixels are 0 in normalised space (mmdetection, detectron2).
            tensor[i, :, : img.shape[1], : img.shape[2]] = (img.float() - self.pixel_mean) / self.pixel_std
        if self.box_scale == "scalar":
            if scales is None:
                scales = [self.resize_steps(*size)[1] for size in original_sizes]
            factors = [(s, s) for s in scales]
        else:
            factors = [(s[1] / o[1], s[0] / o[0]) for s, o in zip(sizes, original_sizes)]
        extents = [(pad_h, pad_w)] * len(sizes) if self.clip_to == "canvas" else sizes
        return ImageBatch(tensor, extents, list(original_sizes), factors)

    @staticmethod
    def to_original(boxes: Tensor, scale_factor: tuple[float, float]) -> Tensor:
        """Boxes (N, 4k) from the resized frame back to original pixels (multiplying by float64 reciprocals, as
        mmdetection's `scale_boxes`, so results match to the last bit)."""
        sw, sh = scale_factor
        factors = boxes.new_tensor([1 / sw, 1 / sh, 1 / sw, 1 / sh])
        return (boxes.view(boxes.shape[0], -1, 4) * factors).view(boxes.shape)


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
