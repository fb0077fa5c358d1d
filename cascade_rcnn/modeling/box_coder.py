"""Box coder: boxes <-> regression deltas (dx, dy, dw, dh), normalised by per-stage stds.

Invariant (tested): `decode(encode(gt, proposals), proposals) == gt` for boxes with positive size, when no clamping
applies. Arithmetic follows mmdetection's `DeltaXYWHBBoxCoder` (centre/size form, no "+1", dw/dh clamped before exp, no
centre clamp), in its operation order so that float results match. `plus_one=True` gives the legacy "+1" convention
(width = x2 - x1 + 1) of mmdetection v1 and the seed's MindSpore code.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BoxCoder:
    def __init__(
        self,
        stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = 4.135166556742356,
        plus_one: bool = False,
        clip_offset: float | None = None,
        clamp_below: bool = True,
    ) -> None:
        self.stds = stds
        self.scale_clamp = scale_clamp
        # dw, dh are clamped to [-scale_clamp, scale_clamp] (mmdetection), or only from above (detectron2, whose clamp
        # guards exp() against overflow and lets boxes shrink freely).
        self.clamp_below = clamp_below
        self.offset = 1.0 if plus_one else 0.0
        # Clip bound (w - clip_offset, h - clip_offset): mmdetection v1 pairs "+1" widths with w - 1; the seed clips to w.
        self.clip_offset = self.offset if clip_offset is None else clip_offset

    def encode(self, gt_boxes: Tensor, proposal_boxes: Tensor) -> Tensor:
        """Deltas (N, 4) that move `proposal_boxes` (N, 4) onto `gt_boxes` (N, 4), divided by the stds."""
        proposals, gt = proposal_boxes.float(), gt_boxes.float()
        pw = proposals[:, 2] - proposals[:, 0] + self.offset
        ph = proposals[:, 3] - proposals[:, 1] + self.offset
        px = (proposals[:, 0] + proposals[:, 2]) * 0.5
        py = (proposals[:, 1] + proposals[:, 3]) * 0.5
        gw = gt[:, 2] - gt[:, 0] + self.offset
        gh = gt[:, 3] - gt[:, 1] + self.offset
        gx = (gt[:, 0] + gt[:, 2]) * 0.5
        gy = (gt[:, 1] + gt[:, 3]) * 0.5
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)
        return deltas / deltas.new_tensor(self.stds)

    def decode(self, deltas: Tensor, boxes: Tensor, max_shape: tuple[int, int] | Tensor | None = None) -> Tensor:
        """Apply `deltas` (N, 4k) to `boxes` (N, 4); boxes come out (N, 4k), clipped to `max_shape` = (h, w) if given.

        With k > 1 (class-specific deltas) each group of 4 columns is decoded on the same box.
        """
        n = deltas.shape[0]
        deltas = deltas.reshape(n, -1, 4) * deltas.new_tensor(self.stds)
        boxes = boxes.to(deltas.dtype)[:, None, :]
        pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
        pwh = boxes[..., 2:] - boxes[..., :2] + self.offset
        dwh = deltas[..., 2:].clamp(min=-self.scale_clamp if self.clamp_below else None, max=self.scale_clamp)
        gxy = pxy + pwh * deltas[..., :2]
        # Subtracting the legacy offset before halving keeps x2 - x1 + 1 == gw (a no-op when offset is 0).
        half = (pwh * dwh.exp() - self.offset) * 0.5
        decoded = torch.cat([gxy - half, gxy + half], dim=-1)
        if max_shape is not None:
            decoded = clip_boxes(decoded, max_shape, self.clip_offset)
        return decoded.reshape(n, -1)


def clip_boxes(boxes: Tensor, max_shape: tuple[int, int] | Tensor, offset: float = 0.0) -> Tensor:
    """Clip xyxy boxes (N, ..., 4) to [0, w - offset] x [0, h - offset].

    `max_shape` is (h, w) for every box, or a tensor of (h, w): shape (2,) for every box or (N, 2), one row per box
    (RoIs of several images in one batch).
    """
    if not isinstance(max_shape, Tensor):
        h, w = max_shape
        x = boxes[..., 0::2].clamp(min=0, max=w - offset)
        y = boxes[..., 1::2].clamp(min=0, max=h - offset)
        return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
    wh = max_shape.to(boxes.dtype).flip(-1)
    if wh.dim() == 2:
        wh = wh.reshape(wh.shape[0], *([1] * (boxes.dim() - 2)), 2)
    return torch.minimum(boxes.clamp(min=0), torch.cat([wh, wh], dim=-1) - offset)
