"""A small data set with one of each TIDE error planted, shared by tests/test_report.py and test_report_browser.py.

Image 1 (320x240) holds six objects; the detections make exactly one error of each type (0.1 / 0.5 are TIDE's
background / foreground IoUs), each scoring above a true positive of its class so that fixing it raises AP:

    object  class  detections
    A       cat    TP 0.90 (exact), dupe 0.85 (IoU 0.85 with A)
    B       dog    TP 0.60 (exact), cls 0.95 (a cat box exactly on B)
    C       cat    TP 0.50 (exact), both 0.93 (a bird box at IoU 0.26 with C, no bird near)
    D       dog    loc 0.94 (a dog box at IoU 0.26 with D)
    E       bird   TP 0.40 (exact)
    F       cat    nothing: miss
    -       -      bkg 0.92 (a dog box touching no object)

Image 2 (300x200) has no object and no detection. Every object has a polygon (an ellipse in its box) and every
detection a mask RLE of the ellipse in its own box, so the same set scores segm too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from cascade_rcnn.structures import Detections

CLASS_NAMES = ("cat", "dog", "bird")
IMAGE_SIZE = (320, 240)
OBJECTS: dict[str, tuple[int, list[float]]] = {  # name -> (category id, [x, y, w, h])
    "A": (1, [10, 10, 60, 60]), "B": (2, [100, 10, 60, 60]), "C": (1, [200, 10, 60, 60]),
    "D": (2, [10, 120, 60, 60]), "E": (3, [100, 120, 60, 60]), "F": (1, [200, 120, 60, 60]),
}  # fmt: skip
# name -> (category id, score, [x, y, w, h]); the error names are TIDE's types, tp_* are true positives.
DETECTIONS: dict[str, tuple[int, float, list[float]]] = {
    "cls": (1, 0.95, [100, 10, 60, 60]), "loc": (2, 0.94, [45, 120, 60, 60]), "both": (3, 0.93, [235, 10, 60, 60]),
    "bkg": (2, 0.92, [270, 190, 40, 40]), "tp_A": (1, 0.90, [10, 10, 60, 60]), "dupe": (1, 0.85, [15, 10, 60, 60]),
    "tp_B": (2, 0.60, [100, 10, 60, 60]), "tp_C": (1, 0.50, [200, 10, 60, 60]), "tp_E": (3, 0.40, [100, 120, 60, 60]),
}  # fmt: skip
ERROR_NAMES = ("cls", "loc", "both", "dupe", "bkg", "miss")
# What replaces a dropped planted error where dropping alone would leave its object missed: true positives on F, D.
FOUND = {"miss": (1, 0.30, [200, 120, 60, 60]), "loc": (2, 0.94, [10, 120, 60, 60])}


@dataclass
class PlantedSet:
    annotations: Path
    images: Path
    detections: Path
    dataset: dict[str, Any]
    results: list[dict[str, Any]]  # the COCO results in `detections`, in file order
    names: list[str]  # which planted detection each result is


def _ellipse_polygon(box: list[float], points: int = 24) -> list[float]:
    x, y, w, h = box
    angles = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    xs, ys = x + w / 2 + (w / 2 - 1) * np.cos(angles), y + h / 2 + (h / 2 - 1) * np.sin(angles)
    return np.stack([xs, ys], axis=1).round(2).reshape(-1).tolist()


def ellipse_mask(box: list[float], size: tuple[int, int] = IMAGE_SIZE) -> np.ndarray:
    """(H, W) bool: the ellipse inscribed in `box` (the annotations' polygon, drawn by Pillow)."""
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).polygon(_ellipse_polygon(box), fill=1)
    return np.asarray(canvas, dtype=bool)


def _rle(box: list[float]) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(ellipse_mask(box).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_planted_set(root: Path, *, without: str | None = None, masks: bool = False) -> PlantedSet:
    """Write images/, annotations.json and detections.json under `root`.

    Args:
        without: one of ERROR_NAMES to leave unplanted: its detection dropped ("loc": D is found instead; "miss": F
            is found).
        masks: give each detection a `segmentation` (so eval scores segm as well).
    """
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(90, 170, size=(IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8))
    draw = ImageDraw.Draw(picture)
    colors = {1: (200, 60, 40), 2: (40, 170, 60), 3: (50, 70, 200)}
    for category_id, (x, y, w, h) in OBJECTS.values():
        draw.ellipse((x + 1, y + 1, x + w - 2, y + h - 2), fill=colors[category_id])
    picture.save(images / "planted.png")
    Image.fromarray(rng.integers(0, 255, size=(200, 300, 3), dtype=np.uint8)).save(images / "empty.png")

    annotations = [{"id": index + 1, "image_id": 1, "category_id": category_id, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0, "segmentation": [_ellipse_polygon(box)]}
                   for index, (category_id, box) in enumerate(OBJECTS.values())]  # fmt: skip
    dataset = {"images": [{"id": 1, "file_name": "planted.png", "width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1]},
                          {"id": 2, "file_name": "empty.png", "width": 300, "height": 200}],
               "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_NAMES)],
               "annotations": annotations}  # fmt: skip
    planted = {name: det for name, det in DETECTIONS.items() if name != without}
    if without in FOUND:
        planted[f"found_{without}"] = FOUND[without]
    results, names = [], []
    for name, (category_id, score, box) in planted.items():
        result = {"image_id": 1, "category_id": category_id, "bbox": box, "score": score}
        if masks:
            result["segmentation"] = _rle(box)
        results.append(result)
        names.append(name)
    (root / "annotations.json").write_text(json.dumps(dataset), encoding="utf-8")
    (root / "detections.json").write_text(json.dumps(results), encoding="utf-8")
    return PlantedSet(root / "annotations.json", images, root / "detections.json", dataset, results, names)


class PlantedDetector:
    """A stand-in model that returns the planted detections for image 1 (recognised by its size) and none for image
    2; with `return_stages`, three stages whose boxes are shifted by 20%, 10% and 5% of their size. `masks=True`
    makes it a mask model (ellipse masks in its boxes)."""

    class_names = CLASS_NAMES

    def __init__(self, masks: bool = False) -> None:
        self.config = SimpleNamespace(has_masks=masks, postprocess=SimpleNamespace(coco_wh_plus_one=False))
        self.masks = masks

    def predict(self, images: list[np.ndarray], *, batch_size: int = 1, score_thresh: float | None = None,
                return_stages: bool = False, **kwargs: Any) -> list[Detections]:  # fmt: skip
        out = []
        for image in images:
            height, width = image.shape[:2]
            planted = list(DETECTIONS.values()) if (width, height) == IMAGE_SIZE else []
            boxes = torch.tensor([[x, y, x + w, y + h] for _, _, (x, y, w, h) in planted]).reshape(-1, 4).float()
            scores = torch.tensor([score for _, score, _ in planted]).float()
            labels = torch.tensor([category_id - 1 for category_id, _, _ in planted], dtype=torch.long)
            det = Detections(boxes, scores, labels, CLASS_NAMES)
            if self.masks:
                det.masks = torch.from_numpy(np.stack([ellipse_mask(box, (width, height)) for _, _, box in planted])
                                             if planted else np.zeros((0, height, width), bool))  # fmt: skip
            if return_stages:
                size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
                det.stages = [Detections(boxes + size * shift, scores, labels, CLASS_NAMES)
                              for shift in (0.2, 0.1, 0.05)]  # fmt: skip
            out.append(det)
        return out
