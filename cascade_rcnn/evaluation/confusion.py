"""Confusion matrix of a detector over its classes plus background, at one IoU and one score threshold.

Rows are the ground truth, columns the prediction (mmdetection's `confusion_matrix.py` layout); index K (the last) is
background on both axes:

- `matrix[g, p]` (g, p < K): an object of class g matched by a detection of class p (the diagonal: right class);
- `matrix[g, K]`: an object of class g that no detection above the score threshold matched (missed);
- `matrix[K, p]`: a detection of class p that matched no object (a false positive: background, a duplicate, or a box
  too far off); `matrix[K, K]` is always 0.

Matching, per image, over the detections scoring >= `score_threshold`, highest score first (as COCO matches): first
each detection takes the unmatched object *of its class* with the highest IoU >= `iou_threshold` (so the diagonal
counts what COCO counts as true positives at that IoU); then each detection still unmatched takes the unmatched object
of *any* class with the highest IoU >= `iou_threshold` (a confusion). A detection left over that overlaps a crowd
region of its class by >= `iou_threshold` (pycocotools' crowd IoU: intersection over the detection's area) is ignored,
as COCO ignores it; crowd regions are never objects to miss. IoUs are pycocotools' (`mask.iou`), of boxes or masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cascade_rcnn.evaluation.coco import contiguous_category_ids

# The default score threshold: mmdetection's tools/analysis_tools/confusion_matrix.py default (--score-thr 0.3).
DEFAULT_SCORE_THRESHOLD = 0.3


@dataclass
class ConfusionMatrix:
    """(K + 1, K + 1) counts, rows ground truth, columns prediction, index K background (see the module docstring)."""

    class_names: list[str]  # K names, in sorted category-id order
    category_ids: list[int]
    matrix: np.ndarray  # (K + 1, K + 1) int64
    iou_threshold: float
    score_threshold: float
    iou_type: str = "bbox"

    @property
    def labels(self) -> list[str]:
        """The K + 1 axis labels: the class names, then "background"."""
        return [*self.class_names, "background"]

    def most_confused(self, limit: int = 10) -> list[tuple[str, str, int]]:
        """The largest off-diagonal counts between two classes: (ground truth, predicted, count), largest first."""
        k = len(self.class_names)
        pairs = [(int(self.matrix[g, p]), g, p) for g in range(k) for p in range(k) if g != p and self.matrix[g, p]]
        pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
        return [(self.class_names[g], self.class_names[p], count) for count, g, p in pairs[:limit]]

    def to_json(self) -> dict[str, Any]:
        return {"iou_type": self.iou_type, "iou_threshold": self.iou_threshold,
                "score_threshold": self.score_threshold, "rows": "ground truth", "columns": "prediction",
                "labels": self.labels, "category_ids": self.category_ids, "matrix": self.matrix.tolist()}  # fmt: skip

    def plot(self, path: Any) -> None:
        """Write the matrix as a PNG: colour is the row-normalised fraction, counts printed when K <= 30."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        labels = self.labels
        n = len(labels)
        rows = self.matrix.sum(axis=1, keepdims=True)
        fraction = np.where(rows > 0, self.matrix / np.maximum(rows, 1), 0.0)
        side = min(max(4.0, 0.35 * n + 2.0), 30.0)
        figure = Figure(figsize=(side + 1.0, side))
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
        font = 8 if n <= 30 else 5
        ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
        ax.set_yticks(range(n), labels, fontsize=font)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
        ax.set_title(f"confusion matrix ({self.iou_type} IoU >= {self.iou_threshold:g}, "
                     f"score >= {self.score_threshold:g})")  # fmt: skip
        if n <= 30:
            for g in range(n):
                for p in range(n):
                    if self.matrix[g, p]:
                        ax.text(p, g, str(int(self.matrix[g, p])), ha="center", va="center", fontsize=font,
                                color="white" if fraction[g, p] > 0.5 else "black")  # fmt: skip
        figure.savefig(path, format="png", dpi=100, bbox_inches="tight")


def confusion_matrix(
    gt: COCO,
    detections: Sequence[dict[str, Any]],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    image_ids: Iterable[int] | None = None,
    iou_type: str = "bbox",
) -> ConfusionMatrix:
    """Count matches, confusions, misses and false positives (see the module docstring).

    Args:
        gt: the annotations.
        detections: COCO results dicts (validated beforehand, e.g. by `evaluate_coco`); "segm" uses their
            `segmentation` RLEs.
        image_ids: count only these images (default: every image of the annotation file).
    """
    category_ids = contiguous_category_ids(gt)
    index_of = {cat_id: i for i, cat_id in enumerate(category_ids)}
    k = len(category_ids)
    matrix = np.zeros((k + 1, k + 1), np.int64)
    images = sorted(gt.imgs) if image_ids is None else sorted(set(image_ids))
    by_image: dict[int, list[dict[str, Any]]] = {}
    for det in detections:
        if det["score"] >= score_threshold:
            by_image.setdefault(det["image_id"], []).append(det)
    for image_id in images:
        anns = gt.imgToAnns.get(image_id, [])
        objects = [ann for ann in anns if not ann.get("iscrowd", 0)]
        crowds = [ann for ann in anns if ann.get("iscrowd", 0)]
        dets = sorted(by_image.get(image_id, []), key=lambda det: -det["score"])  # stable: ties keep file order
        gt_labels = np.array([index_of[ann["category_id"]] for ann in objects], np.int64)
        dt_labels = np.array([index_of[det["category_id"]] for det in dets], np.int64)
        ious = _ious(gt, dets, objects, iou_type, crowd=False)  # (D, G)
        taken = np.zeros(len(objects), bool)
        matched = np.zeros(len(dets), bool)
        for same_class in (True, False):
            for d in range(len(dets)):
                if matched[d]:
                    continue
                candidates = (ious[d] >= iou_threshold) & ~taken
                if same_class:
                    candidates &= gt_labels == dt_labels[d]
                if candidates.any():
                    g = int(np.argmax(np.where(candidates, ious[d], -1.0)))
                    taken[g] = matched[d] = True
                    matrix[gt_labels[g], dt_labels[d]] += 1
        crowd_ious = _ious(gt, dets, crowds, iou_type, crowd=True)
        crowd_labels = np.array([index_of[ann["category_id"]] for ann in crowds], np.int64)
        for d in np.flatnonzero(~matched):
            on_crowd = (crowd_ious[d] >= iou_threshold) & (crowd_labels == dt_labels[d])
            if not on_crowd.any():
                matrix[k, dt_labels[d]] += 1
        np.add.at(matrix, (gt_labels[~taken], k), 1)
    names = [str(gt.cats[cat_id].get("name", cat_id)) for cat_id in category_ids]
    return ConfusionMatrix(class_names=names, category_ids=list(category_ids), matrix=matrix,
                           iou_threshold=iou_threshold, score_threshold=score_threshold, iou_type=iou_type)  # fmt: skip


def _ious(gt: COCO, dets: list[dict[str, Any]], anns: list[dict[str, Any]], iou_type: str, crowd: bool) -> np.ndarray:
    """(D, G) pycocotools IoUs of detections with annotations (crowd: intersection over the detection's area)."""
    if not dets or not anns:
        return np.zeros((len(dets), len(anns)))
    if iou_type == "segm":
        dt = [det["segmentation"] for det in dets]
        gt_shapes = [gt.annToRLE(ann) for ann in anns]
    else:
        dt = [list(map(float, det["bbox"])) for det in dets]
        gt_shapes = [list(map(float, ann["bbox"])) for ann in anns]
    return np.asarray(mask_utils.iou(dt, gt_shapes, [int(crowd)] * len(anns)), np.float64).reshape(len(dets), len(anns))
