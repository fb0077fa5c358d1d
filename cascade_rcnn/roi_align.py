"""Multi-level RoIAlign: each RoI is pooled from one FPN level chosen by its size.

level = floor(log2(sqrt(w * h) / canonical_size + eps)), clamped to the pooled levels (P2..P5); with
canonical_size 56 a 224 x 224 box lands on P4 (mmdetection `SingleRoIExtractor`, `finest_scale=56`).
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
    ) -> None:
        super().__init__()
        self.strides = strides
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_size = canonical_size
        self.level_eps = level_eps

    def assign_levels(self, rois: Tensor) -> Tensor:
        """(N,) int64 level index (0 = P2) for `rois` (N, 5) = [batch_idx, x1, y1, x2, y2]."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.canonical_size + self.level_eps))
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """Pool `rois` (N, 5) from `features` ([P2, P3, ...], extra levels ignored) into (N, C, S, S)."""
        levels = self.assign_levels(rois)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], self.output_size, self.output_size))
        for level, stride in enumerate(self.strides):
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel() == 0 and not torch.jit.is_tracing():
                continue
            pooled = roi_align(
                features[level],
                rois[idx],
                self.output_size,
                spatial_scale=1.0 / stride,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
            )
            out = out.index_copy(0, idx, pooled.to(out.dtype))
        return out
