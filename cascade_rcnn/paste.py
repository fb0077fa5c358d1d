"""Pasting mask probabilities into images, in numpy: the one implementation the PyTorch model
(`cascade_rcnn.modeling.masks.paste_masks`), the ONNX Runtime and OpenVINO backends and the torch-free
`LeanDetector` share.

The rule is the peers' (mmdetection's and detectron2's `_do_paste_mask` on the CPU, box by box): a detection's S x S
probability cells are stretched over its float box, cell centres at x1 + (j + 0.5) (x2 - x1) / S, and sampled
bilinearly at the pixel centres with zero beyond the outer cells, i.e. `grid_sample(align_corners=False,
padding_mode="zeros")`; pixels >= the threshold are the mask. Only pixels within one pixel of the box are sampled; the
rest are False. The arithmetic is torch's x86 CPU `grid_sample` kernel's, operation for operation in float32,
including the fused multiply-adds its compiler makes of `(g + 1) * (S / 2) - 0.5` and of the four-corner sum, so the
masks are bit-identical to it: tested against `grid_sample` itself, and pixel for pixel against mmdetection's
recorded masks. (`_fma` computes in float64, where a float32 product is exact; its float32 result can differ from a
true fused multiply-add only when the float64 sum lands exactly halfway between two float32 values.)
"""

from __future__ import annotations

import math

import numpy as np


def paste_masks_array(
    probs: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], threshold: float = 0.5
) -> np.ndarray:
    """(D, h, w) bool masks in an (h, w) image from probabilities (D, S, S) over `boxes` (D, 4), in that image's
    pixels. One bool mask per detection is all that is held (the float maps are one box, + 1 px, at a time). A box
    with a NaN or infinite coordinate gets an empty mask."""
    h, w = image_size
    probs = np.asarray(probs, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    masks = np.zeros((len(probs), h, w), dtype=bool)  # calloc: pages no mask touches are never resident
    threshold = np.float32(threshold)
    # Cell index -1 and S read this zero border; anything further out is clipped onto it.
    padded = np.zeros((probs.shape[0], probs.shape[1] + 2, probs.shape[2] + 2), dtype=np.float32)
    padded[:, 1:-1, 1:-1] = probs
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero-size box's inf and NaN, as in torch
        for i, box in enumerate(boxes):
            if not np.isfinite(box).all():  # no pixel centre is inside a NaN or infinite box
                continue
            x0, y0 = max(math.floor(box[0]) - 1, 0), max(math.floor(box[1]) - 1, 0)
            x1, y1 = min(math.ceil(box[2]) + 1, w), min(math.ceil(box[3]) + 1, h)
            if x1 <= x0 or y1 <= y0:
                continue
            ys = _cells_axis(y0, y1, box[1], box[3], probs.shape[1])
            xs = _cells_axis(x0, x1, box[0], box[2], probs.shape[2])
            masks[i, y0:y1, x0:x1] = _bilinear(padded[i], ys, xs) >= threshold
    return masks


def _cells_axis(first: int, stop: int, start: np.float32, end: np.float32, size: int) -> np.ndarray:
    """Pixel centres first..stop-1 along one axis in cell units of the box [start, end]: grid_sample's [-1, 1] grid
    (in the peers' order of operations; a zero-size box's inf becomes 0, as in the peers), unnormalised as its CPU
    kernel does, (g + 1) * (S / 2) - 0.5, all in float32."""
    one, two, half = np.float32(1), np.float32(2), np.float32(0.5)
    grid = ((np.arange(first, stop, dtype=np.float32) + half) - start) / (end - start) * two - one
    grid[np.isinf(grid)] = 0
    return _fma(grid + one, np.float32(size / 2), -half)


def _bilinear(padded: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """S x S cells (`padded`: in a zero border) sampled at every (ys[r], xs[c]) (cell units), zero outside: the
    four corners' values times their weights, summed in grid_sample's order, fma(se, fma(sw, fma(ne, nw))), each
    weight a product of two float32 axis distances. A NaN coordinate (a zero-size box's 0/0) samples NaN, which no
    threshold passes."""
    size_y, size_x = padded.shape[0] - 2, padded.shape[1] - 2

    def axis(coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        low = np.floor(coords)
        near = coords - low  # distance to the lower cell: the upper cell's weight
        far = np.float32(1) - near
        index = np.nan_to_num(low, nan=-2.0).clip(-2, size).astype(np.int64)
        inside_low = (index >= 0) & (index < size)
        inside_high = (index + 1 >= 0) & (index + 1 < size)
        # Out-of-range corners read the padding's zeros (torch masks them to 0 the same way).
        return np.where(inside_low, index + 1, 0), np.where(inside_high, index + 2, 0), near, far

    n_idx, s_idx, n, s = axis(ys, size_y)
    w_idx, e_idx, w, e = axis(xs, size_x)
    nw = s[:, None] * e[None, :]
    ne = s[:, None] * w[None, :]
    sw = n[:, None] * e[None, :]
    se = n[:, None] * w[None, :]
    north, south = padded[n_idx], padded[s_idx]  # the rows first: (len(ys), S + 2) each
    total = north[:, w_idx] * nw
    total = _fma(north[:, e_idx], ne, total)
    total = _fma(south[:, w_idx], sw, total)
    return _fma(south[:, e_idx], se, total)


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """a * b + c in float32 with one rounding after the sum, as the CPU's fused multiply-add."""
    return (np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64) + c).astype(np.float32)
