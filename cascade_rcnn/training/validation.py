"""COCO evaluation during training, spread over the processes of a distributed run.

Each process predicts a strided share of the val images (rank r takes images r, r + N, ...), the COCO results dicts
are gathered on rank 0, and rank 0 scores them with `cascade_rcnn.evaluation.coco.evaluate_coco` (pycocotools).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cascade_rcnn.data.image_io import load_image
from cascade_rcnn.errors import ImageReadError
from cascade_rcnn.evaluation.coco import EvalResult, detections_to_coco, evaluate_coco
from cascade_rcnn.modeling.detector import CascadeRCNN
from cascade_rcnn.training.data import ValSet
from cascade_rcnn.training.distributed import DistInfo, gather_to_main


@torch.no_grad()
def predict_share(
    model: CascadeRCNN,
    val: ValSet,
    info: DistInfo,
    device: torch.device,
    batch_size: int,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """This process's share of the val set: (COCO results dicts, evaluated image ids, unreadable image messages)."""
    records = val.dataset.records[info.rank :: info.world_size]
    results: list[dict[str, Any]] = []
    image_ids: list[int] = []
    failed: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(records), batch_size):
            loaded: list[tuple[int, Tensor]] = []
            for record in records[start : start + batch_size]:
                try:
                    pixels = load_image(val.dataset.image_root / record.file_name)
                except ImageReadError as error:
                    failed.append(str(error))
                    continue
                loaded.append((record.image_id, torch.from_numpy(pixels).permute(2, 0, 1).float().to(device)))
            # Images share a forward pass only when their sizes match: padding changes features near the border.
            by_size: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
            for image_id, image in loaded:
                by_size.setdefault(tuple(image.shape), []).append((image_id, image))
            for group in by_size.values():
                with autocast or contextlib.nullcontext():
                    outputs = model.predict([image for _, image in group])
                for (image_id, _), det in zip(group, outputs):
                    results += detections_to_coco(
                        image_id, det.boxes.float(), det.scores.float(), det.labels, val.category_ids
                    )
                    image_ids.append(image_id)
    finally:
        model.train(was_training)
    return results, image_ids, failed


def evaluate(
    model: CascadeRCNN,
    val: ValSet,
    info: DistInfo,
    device: torch.device,
    batch_size: int = 2,
    out_dir: str | Path | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[EvalResult | None, list[str], int]:
    """COCO box metrics of `model` on `val` (None on ranks other than 0), the unreadable images, and how many
    images were evaluated (over all processes).

    With `out_dir`, rank 0 also writes `metrics.json`, `per_class_ap.json` and the precision-recall curves there.
    """
    share = predict_share(model, val, info, device, batch_size, autocast)
    gathered = gather_to_main(share, info)
    if gathered is None:
        return None, [], 0
    results = [d for part in gathered for d in part[0]]
    image_ids = [i for part in gathered for i in part[1]]
    failed = [m for part in gathered for m in part[2]]
    return evaluate_coco(val.gt, results, out_dir=out_dir, image_ids=image_ids), failed, len(image_ids)
