"""Feature pyramid network: P2..P5 from C2..C5 by 1x1 laterals, a nearest-neighbour top-down path and 3x3 output
convs (no activations), and P6 by a stride-2 1x1 max-pool of P5 (mmdetection `add_extra_convs=False`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, ...] = (256, 512, 1024, 2048), out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for conv in [*self.lateral_convs, *self.fpn_convs]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Iterable[Tensor]) -> list[Tensor]:
        """[C2..C5] -> [P2..P6], each (B, out_channels, H_l, W_l).

        `features` may be a list or the backbone's generator (`ResNetBackbone.feature_maps`): each lateral conv
        then runs after the next backbone stage, and C_k is let go as soon as both have read it, so that the
        largest backbone maps are never alive together (at 800 x 1333 about 130 MB less peak memory)."""
        laterals: list[Tensor] = []
        pending = None
        for level, feature in enumerate(features):
            if pending is not None:
                laterals.append(self.lateral_convs[level - 1](pending))
            pending = feature
        laterals.append(self.lateral_convs[len(laterals)](pending))
        del pending, feature
        return self.outputs(laterals)

    def outputs(self, laterals: list[Tensor]) -> list[Tensor]:
        """[P2..P6] from the lateral maps [L2..L5] (the 1x1 convs' outputs). `laterals` is consumed: the top-down sums
        are made in place, and the list is emptied as the output convs read it, so each map is freed as soon as
        possible (at 800 x 1333 the stride-4 map alone is 62 MB)."""
        for i in range(len(laterals) - 1, 0, -1):
            add_upsampled_(laterals[i - 1], laterals[i])
        outs = []
        while laterals:
            outs.append(self.fpn_convs[len(outs)](laterals.pop(0)))
        outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


def add_upsampled_(fine: Tensor, coarse: Tensor) -> Tensor:
    """fine += nearest-neighbour upsampling of `coarse` to fine's size, in place.

    When fine is exactly twice coarse's size (every level of a /32-padded input), nearest upsampling repeats each
    coarse pixel 2 x 2, so it is added through a broadcasting view with no upsampled copy; other sizes (odd inputs)
    go through `F.interpolate(size=...)`, which picks source pixel floor(dst * in / out): the same rule.
    """
    (h, w), (hc, wc) = fine.shape[-2:], coarse.shape[-2:]
    if (h, w) == (2 * hc, 2 * wc) and not torch.jit.is_tracing():
        b, c = fine.shape[:2]
        fine.view(b, c, hc, 2, wc, 2).add_(coarse[:, :, :, None, :, None])
    else:
        fine.add_(F.interpolate(coarse, size=(h, w), mode="nearest"))
    return fine
