"""Binary masks <-> COCO run-length encoding (pycocotools), as COCO results files and the peers write them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pycocotools.mask as mask_utils

if TYPE_CHECKING:
    from torch import Tensor


def encode_masks(masks: Tensor | np.ndarray | Sequence[Tensor | np.ndarray]) -> list[dict[str, Any]]:
    """(N, H, W) binary masks (or a sequence of (H, W) ones) -> N COCO RLEs `{"size": [H, W], "counts": str}`
    (pycocotools' compressed counts, as mmdetection's `encode_mask_results` and detectron2's `instances_to_coco_json`
    write them)."""
    rles = []
    for mask in masks:  # one at a time: a column-major copy of all of them would double their memory
        if hasattr(mask, "detach"):  # a torch tensor; this module does not import torch (serve without it)
            mask = mask.detach().cpu().numpy()
        (rle,) = mask_utils.encode(np.asfortranarray(np.asarray(mask)[:, :, None], dtype=np.uint8))
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


def decode_masks(rles: list[dict[str, Any]], size: tuple[int, int]) -> Tensor:
    """COCO RLEs (counts as str or bytes) -> (N, H, W) bool; an empty list gives (0, H, W)."""
    import torch

    if not rles:
        return torch.zeros((0, *size), dtype=torch.bool)
    return torch.from_numpy(mask_utils.decode(list(rles))).permute(2, 0, 1).bool()
