"""Multi-level RoIAlign: each RoI is pooled from one FPN level chosen by its size.

level = floor(log2(sqrt(w * h) / canonical_size + eps)), clamped to the pooled levels (P2..P5); with
canonical_size 56 a 224 x 224 box lands on P4 (mmdetection `SingleRoIExtractor`, `finest_scale=56`). With
`canonical_level` k the level is P(floor(k + log2(sqrt(w * h) / canonical_size + eps))) instead (detectron2
`assign_boxes_to_levels`: a 224 x 224 box on P4, eps 1e-8): the same bins, but adding k after the log rounds
differently within ~1e-7 of a bin edge.

`plus_one` is the legacy convention of mmdetection v1 and the seed (MindSpore `ROIAlign`, `roi_end_mode=1`): a RoI
spans [x1 * scale, (x2 + 1) * scale] on its level with no 1-cell minimum, and w + 1, h + 1 choose the level.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


class MultiScaleRoIAlign(nn.Module):
    def __init__(
        self,
        strides: tuple[int, ...] = (4, 8, 16, 32),
        output_size: int = 7,
        sampling_ratio: int = 0,
        aligned: bool = True,
        canonical_size: float = 56.0,
        level_eps: float = 1e-6,
        plus_one: bool = False,
        canonical_level: int | None = None,
        cpu_kernel: Literal["gather", "torchvision"] = "gather",
    ) -> None:
        super().__init__()
        if plus_one and aligned:
            raise ValueError("RoIAlign: plus_one is the legacy extent of aligned=False; it cannot be combined with aligned")
        self.strides = strides
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_size = canonical_size
        self.level_eps = level_eps
        self.plus_one = plus_one
        self.canonical_level = canonical_level
        # On the CPU (not while tracing), RoIs are pooled by `roi_align_channels_last`, equal to torchvision's kernel
        # up to float rounding: torchvision's CPU kernel runs on one thread, forward and backward (measured: one
        # cascade stage's forward + backward 2.2 s -> 1.0 s, a whole training step 1.62x -> ~1.2x torchvision's
        # Faster R-CNN step), and reads channels-last maps only after a copy. Other devices, and ONNX export, use
        # torchvision's kernel.
        self.cpu_kernel = cpu_kernel

    def assign_levels(self, rois: Tensor) -> Tensor:
        """(N,) int64 level index (0 = P2) for `rois` (N, 5) = [batch_idx, x1, y1, x2, y2]."""
        offset = 1.0 if self.plus_one else 0.0
        scale = torch.sqrt((rois[:, 3] - rois[:, 1] + offset) * (rois[:, 4] - rois[:, 2] + offset))
        log_scale = torch.log2(scale / self.canonical_size + self.level_eps)
        if self.canonical_level is None:
            levels = torch.floor(log_scale)
        else:
            # P-number of the first pooled level: P2 for stride 4.
            levels = torch.floor(self.canonical_level + log_scale) - (self.strides[0].bit_length() - 1)
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """Pool `rois` (N, 5) from `features` ([P2, P3, ...], extra levels ignored) into (N, C, S, S)."""
        levels = self.assign_levels(rois)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], self.output_size, self.output_size))
        tracing = torch.jit.is_tracing()
        level_indices, level_pooled = [], []
        for level, stride in enumerate(self.strides):
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel() == 0 and not torch.jit.is_tracing():
                continue
            level_rois, aligned = rois[idx], self.aligned
            if self.plus_one:
                # torchvision's aligned=True maps x to x * scale - 0.5 with no minimum size, so shifting the RoI by
                # half a cell (and x2, y2 by one more pixel) gives [x1 * scale, (x2 + 1) * scale], up to float rounding.
                half = 0.5 * stride
                level_rois = level_rois + level_rois.new_tensor([0.0, half, half, 1.0 + half, 1.0 + half])
                aligned = True
            pooled = self.pool_level(features[level], level_rois, stride, aligned)
            if tracing:
                level_indices.append(idx)
                level_pooled.append(pooled)
            else:
                out.index_copy_(0, idx, pooled.to(out.dtype))  # in place: copying `out` per level costs N x C x S x S
        if tracing:
            # ONNX's row scatter (ScatterElements) works element by element: instead concatenate the levels and put
            # the rows back in RoI order with one gather.
            order = torch.cat(level_indices)
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
            out = torch.cat(level_pooled)[inverse].to(out.dtype)
        return out

    def pool_level(self, feature: Tensor, rois: Tensor, stride: int, aligned: bool) -> Tensor:
        """RoIAlign of `rois` (K, 5) on one level `feature` (B, C, H, W) -> (K, C, S, S), float32 (as torchvision's
        kernel under autocast)."""
        if self.cpu_kernel == "gather" and feature.device.type == "cpu" and not torch.jit.is_tracing():
            # No gradient to the box coordinates, as torchvision's and mmcv's kernels.
            return roi_align_channels_last(
                feature.float(), rois.detach().float(), self.output_size, 1.0 / stride, self.sampling_ratio, aligned
            )
        return roi_align(
            feature, rois, self.output_size, spatial_scale=1.0 / stride, sampling_ratio=self.sampling_ratio,
            aligned=aligned,
        )


def roi_align_channels_last(
    feature: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    """`torchvision.ops.roi_align`, computed as weighted sums of feature-map rows: for CPU inference on channels-last
    maps, where it is several times faster than torchvision's kernel (which reads one channel plane at a time on one
    thread). Equal to torchvision's result up to float rounding (the sums run in another order).

    Every sample point of every bin is placed exactly as torchvision places it (bin size, adaptive grid
    ceil(bin size) when `sampling_ratio` <= 0, the half-pixel offset of `aligned`, the 1-cell minimum without it, the
    out-of-map and border rules of its bilinear interpolation). Each output bin is then one bag of
    `embedding_bag(mode="sum")`: the 4 corner pixels of each of its samples, weighted by the bilinear weight divided
    by the bin's sample count. Samples are enumerated exactly (no padding to the largest grid: elongated RoIs would
    make that several times the work).

    feature: (B, C, H, W), best channels-last (a (B*H*W, C) view then needs no copy); rois: (K, 5) [batch_idx, x1,
    y1, x2, y2] in input pixels. Returns (K, C, S, S) with channels-last strides.
    """
    batch, channels, height, width = feature.shape
    s, k, device = output_size, rois.shape[0], rois.device
    table = feature.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    offset = 0.5 if aligned else 0.0
    start = rois[:, 1:3] * spatial_scale - offset  # (K, 2) as (x, y)
    size = rois[:, 3:5] * spatial_scale - offset - start
    if not aligned:
        size = size.clamp(min=1.0)
    bin_size = size / s
    if sampling_ratio > 0:
        grid = torch.full(bin_size.shape, sampling_ratio, dtype=torch.long, device=device)
    else:
        grid = torch.ceil(bin_size).clamp(min=0).long()
    per_bin = grid[:, 0] * grid[:, 1]  # samples in each bin of a RoI (K,)
    per_roi = per_bin * (s * s)
    # One row per sample, RoI by RoI, bin by bin (row-major bins), y-major within a bin.
    roi = torch.repeat_interleave(torch.arange(k, device=device), per_roi)
    local = torch.arange(roi.shape[0], device=device) - (torch.cumsum(per_roi, 0) - per_roi)[roi]
    n, sample_grid = per_bin[roi], grid[roi]
    gx = sample_grid[:, 0]
    bin_index, within = local // n, local % n
    points = []
    for a, (cell, sample, limit) in enumerate(
        [(bin_index % s, within % gx, width), (bin_index // s, within // gx, height)]
    ):
        step, g = bin_size[roi, a], sample_grid[:, a].to(feature.dtype)
        c = start[roi, a] + cell.to(feature.dtype) * step + (sample.to(feature.dtype) + 0.5) * step / g
        valid = (c >= -1.0) & (c <= limit)
        c = c.clamp(min=0)
        low = c.long()
        top = low >= limit - 1
        low = torch.where(top, limit - 1, low)
        frac = torch.where(top, 0.0, c - low)
        points.append((low, torch.where(top, low, low + 1), frac, valid))
    (x0, x1, fx, x_ok), (y0, y1, fy, y_ok) = points
    base = rois[roi, 0].long() * (height * width)
    row0, row1 = base + y0 * width, base + y1 * width
    index = torch.stack([row0 + x0, row0 + x1, row1 + x0, row1 + x1], dim=1).flatten()
    wy = torch.stack([1.0 - fy, fy], dim=1) * ((x_ok & y_ok) / n.to(feature.dtype))[:, None]
    wx = torch.stack([1.0 - fx, fx], dim=1)
    weight = (wy[:, :, None] * wx[:, None, :]).flatten()
    bag_sizes = torch.repeat_interleave(4 * per_bin, s * s)
    offsets = torch.cumsum(bag_sizes, 0) - bag_sizes
    pooled = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weight)
    return pooled.view(k, s, s, channels).permute(0, 3, 1, 2)
