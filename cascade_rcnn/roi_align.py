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

import torch
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
            pooled = roi_align(
                features[level],
                level_rois,
                self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=aligned,
            )
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
