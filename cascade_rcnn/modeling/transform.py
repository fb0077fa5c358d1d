"""Input transform: resize, normalisation and padding into one batch tensor, and the way back.

The transform owns the resize, so callers give and get original-image pixels. Each peer's convention (the size rule,
the canvas, how boxes go back, the pixel resize) is an object of `cascade_rcnn.preprocess`, chosen from the config by
`input_convention` and passed in; the pixel arithmetic is `cascade_rcnn.preprocess`'s too (the torch-free runtime
runs the same code), here on tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from cascade_rcnn.preprocess import (  # noqa: F401 (the rules are part of this module's interface)
    FixedCanvas,
    KeepRatioResize,
    PadToMultiple,
    SecondRescale,
    ShortestEdgeResize,
    cv2_bilinear,
    cv2_linear_taps,
    per_axis_factors,
    resize_pil_array,
    scalar_factors,
)


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

    (3, H, W) values 0..255 (any dtype, any device; rounded) -> (3, h, w) float32, integer-valued, for `size` = (h, w).
    Sampling positions are half-pixel centred, weights are 11-bit fixed point (`cascade_rcnn.preprocess.cv2_bilinear`,
    here on the image's device). A float resize rounded to integers differs from it by 1 at ~12% of the pixels, always
    upwards.
    """
    x = image.round().clamp(0, 255).to(torch.int32)
    (h, w), (src_h, src_w) = size, x.shape[-2:]

    def taps(dst: int, src: int, clamp_outside: bool) -> tuple[Tensor, ...]:
        return tuple(torch.from_numpy(t).to(x.device) for t in cv2_linear_taps(dst, src, clamp_outside))

    return cv2_bilinear(x, taps(w, src_w, True), taps(h, src_h, False)).clamp_(0, 255).float()


def resize_bilinear_pil(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Pillow's `Image.resize(size, BILINEAR)` of the 8-bit image, as detectron2's `ResizeShortestEdge` runs it
    (`cascade_rcnn.preprocess.resize_pil_array`): (3, H, W) values 0..255 (any dtype, any device; rounded) -> (3, h, w)
    float32, integer-valued, on the same device. Pillow runs on the CPU."""
    resized = resize_pil_array(image.detach().cpu().numpy(), size)
    return torch.from_numpy(np.ascontiguousarray(resized)).to(image.device)
