"""Anchor generator: one set of anchors per FPN level, in the order the RPN head's outputs are flattened.

Order within a level is location-major (y, then x), then the anchor shapes (ratio-major, then scale), which matches
`rpn_cls.permute(0, 2, 3, 1).reshape(B, -1)`. Anchors are xyxy in the resized (network input) frame.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    def __init__(
        self,
        strides: tuple[int, ...] = (4, 8, 16, 32, 64),
        scales: tuple[float, ...] = (8.0,),
        ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        center_offset: float = 0.0,
        legacy_v1: bool = False,
    ) -> None:
        super().__init__()
        self.strides = strides
        with torch.device("cpu"):  # constants of the config: on the CPU even when the model is built on meta
            self.base_anchors = [
                base_anchors(stride, scales, ratios, center_offset, legacy_v1) for stride in strides
            ]

    @property
    def num_anchors_per_location(self) -> int:
        return self.base_anchors[0].shape[0]

    def forward(self, feature_sizes: list[tuple[int, int]], device: torch.device | None = None) -> list[Tensor]:
        """Anchors per level: list of (H_l * W_l * A, 4) float32 tensors for feature maps of size (H_l, W_l)."""
        return [
            grid_anchors(base.to(device), stride, size)
            for base, stride, size in zip(self.base_anchors, self.strides, feature_sizes)
        ]


def base_anchors(
    stride: int, scales: tuple[float, ...], ratios: tuple[float, ...], center_offset: float, legacy_v1: bool
) -> Tensor:
    """The A = len(ratios) * len(scales) anchors (A, 4) centred on the first feature cell.

    h / w = ratio and w * h = (stride * scale)^2. The centre is `stride * center_offset` (mmdet: 0, i.e. the cell's
    top-left corner). `legacy_v1` is mmdetection v1's (and the seed's) convention: centre (stride - 1) / 2, half-extent
    (size - 1) / 2, rounded to integers.
    """
    ratios_t = torch.tensor(ratios, dtype=torch.float32)
    scales_t = torch.tensor(scales, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    if legacy_v1:
        center = 0.5 * (stride - 1)
        anchors = torch.stack(
            [center - 0.5 * (ws - 1), center - 0.5 * (hs - 1), center + 0.5 * (ws - 1), center + 0.5 * (hs - 1)],
            dim=-1,
        )
        return anchors.round()
    center = stride * center_offset
    return torch.stack([center - 0.5 * ws, center - 0.5 * hs, center + 0.5 * ws, center + 0.5 * hs], dim=-1)


def grid_anchors(base: Tensor, stride: int, size: tuple[int, int]) -> Tensor:
    """Shift `base` (A, 4) over an (H, W) grid with step `stride`: (H * W * A, 4), y-major, then x, then anchor."""
    h, w = size
    shift_x = torch.arange(w, device=base.device, dtype=torch.float32) * stride
    shift_y = torch.arange(h, device=base.device, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4)


def valid_anchor_flags(
    feature_size: tuple[int, int], valid_size: tuple[int, int], stride: int, num_anchors: int, device: torch.device
) -> Tensor:
    """(H * W * A,) bool: anchors whose cell lies inside the image's own padded area `valid_size` = (h, w).

    In a batch, smaller images are padded to the largest; cells over that extra padding get no training targets.
    """
    h, w = feature_size
    valid_h = min(math.ceil(valid_size[0] / stride), h)
    valid_w = min(math.ceil(valid_size[1] / stride), w)
    valid_y = torch.arange(h, device=device) < valid_h
    valid_x = torch.arange(w, device=device) < valid_w
    valid = valid_y[:, None] & valid_x[None, :]
    return valid[:, :, None].expand(h, w, num_anchors).reshape(-1)


def inside_anchor_flags(anchors: Tensor, image_size: tuple[int, int], allowed_border: float = 0.0) -> Tensor:
    """(N,) bool: anchors (N, 4) lying inside the image (h, w) = `image_size`, up to `allowed_border` pixels:
    x1 >= -b, y1 >= -b, x2 < w + b, y2 < h + b (strict on the right and bottom, as mmdetection's
    `anchor_inside_flags`). A negative `allowed_border` keeps every anchor."""
    if allowed_border < 0:
        return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    h, w = image_size
    b = allowed_border
    return (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b) & (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b)
