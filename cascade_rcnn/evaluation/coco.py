"""COCO box and mask evaluation: a thin wrapper around pycocotools' `COCOeval`, plus a streaming results writer.

The numbers are pycocotools' own: `evaluate_coco` only validates the inputs, runs `COCOeval.evaluate / accumulate /
summarize` with stdout silenced, and reads `stats` and `eval["precision"]`. Nothing of COCOeval is re-implemented.

Detections flow through this module in the COCO *results* format: one dict per box,
`{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}` in original-image pixels; a mask
model's dicts also hold `"segmentation": {"size": [H, W], "counts": str}` (pycocotools' compressed RLE of the instance
mask over the original image, as mmdetection and detectron2 write their segm results).
`CocoResultsWriter` turns per-image model outputs (`xyxy` boxes, 0-based contiguous labels) into such dicts and appends
them to a JSON file as they come, so a long evaluation holds one batch of detections in memory, not the whole set.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cascade_rcnn.data.masks import check_segmentation, has_segmentation
from cascade_rcnn.errors import DatasetError
from cascade_rcnn.evaluation.rle import encode_masks

# The 12 numbers of `COCOeval.stats`, in its order.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# (IoU, area, max detections) of each metric, for the printed table; mirrors `COCOeval.summarize`.
_METRIC_SETTINGS: dict[str, tuple[str, str, int]] = {
    "AP": ("0.50:0.95", "all", 100),
    "AP50": ("0.50", "all", 100),
    "AP75": ("0.75", "all", 100),
    "APs": ("0.50:0.95", "small", 100),
    "APm": ("0.50:0.95", "medium", 100),
    "APl": ("0.50:0.95", "large", 100),
    "AR1": ("0.50:0.95", "all", 1),
    "AR10": ("0.50:0.95", "all", 10),
    "AR100": ("0.50:0.95", "all", 100),
    "ARs": ("0.50:0.95", "small", 100),
    "ARm": ("0.50:0.95", "medium", 100),
    "ARl": ("0.50:0.95", "large", 100),
}

# The 80 category ids of COCO 2017 detection, in the order of `cascade_rcnn.config.COCO_CLASSES` (ids 1..90 with gaps).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Ground truth and label mapping
# ---------------------------------------------------------------------------------------------------------------------


def load_coco_gt(annotations: str | Path | COCO) -> COCO:
    """Load a COCO-format annotation file (pycocotools' banner silenced); a `COCO` object is returned as is.

    Raises `DatasetError` naming the file when it is missing or is not a COCO detection JSON.
    """
    if isinstance(annotations, COCO):
        return annotations
    path = Path(annotations)
    try:
        with path.open("rb") as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DatasetError(f"{path}: cannot read annotation JSON ({error})") from None
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), list) for k in ("images", "categories")):
        raise DatasetError(f"{path}: not a COCO annotation file (needs 'images' and 'categories' lists)")
    dataset.setdefault("annotations", [])
    problems = _gt_problems(dataset)
    if problems:
        # pycocotools indexes these with no checks: a missing key is a bare KeyError, a duplicate id overwrites.
        raise DatasetError(f"{path}: {len(problems)} problems in the annotation file", problems)
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _gt_problems(dataset: dict[str, Any]) -> list[str]:
    """Every entry of a COCO annotation dict that pycocotools' box evaluation cannot use, one line each."""
    problems: list[str] = []
    if not isinstance(dataset["annotations"], list):
        return [f"'annotations' is a {type(dataset['annotations']).__name__}, expected a list"]
    known: dict[str, set[int]] = {"images": set(), "categories": set(), "annotations": set()}
    for key, ids in known.items():
        for index, entry in enumerate(dataset[key]):
            entry_id = entry.get("id") if isinstance(entry, dict) else None
            if not (isinstance(entry_id, int) and not isinstance(entry_id, bool)):
                problems.append(f"{key}[{index}]: needs an integer 'id', got {_short(entry)}")
            elif entry_id in ids:
                problems.append(f"{key}[{index}]: duplicate id {entry_id}")
            else:
                ids.add(entry_id)
    for index, ann in enumerate(dataset["annotations"]):
        if not isinstance(ann, dict):
            continue  # reported above
        where = f"annotations[{index}]"
        for key, listed in (("image_id", "images"), ("category_id", "categories")):
            value = ann.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value not in known[listed]:
                problems.append(f"{where}: '{key}' {_short(value)} is not an id in '{listed}'")
        bbox, area = ann.get("bbox"), ann.get("area")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
            problems.append(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {_short(bbox)}")
        if not _is_finite_number(area):
            problems.append(f"{where}: 'area' must be a finite number, got {_short(area)}")
        if ann.get("iscrowd") not in (0, 1):
            problems.append(f"{where}: 'iscrowd' must be 0 or 1, got {_short(ann.get('iscrowd'))}")
    return problems


def _is_finite_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # a JSON integer too large for a float
        return False


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def contiguous_category_ids(gt: COCO) -> list[int]:
    """The annotation file's category ids, sorted: contiguous label `i` <-> `contiguous_category_ids(gt)[i]`.

    This is the convention every COCO-trained detector uses (label 0 is COCO id 1 "person", label 79 is id 90).
    """
    return sorted(gt.getCatIds())


def map_labels_to_category_ids(class_names: Sequence[str], gt: COCO) -> tuple[list[int | None], str]:
    """Map a model's contiguous labels to the annotation file's category ids.

    Returns `(category_id_per_label, how)`, where `category_id_per_label[label]` is a COCO category id, or None for a
    model class that the annotation file does not have (its detections cannot be scored and are dropped), and `how`
    says in words which rule matched.

    Rules, first that applies:
      1. the model's class names are the annotation's category names (case-insensitive, any order): by name, so a
         model whose classes are listed in another order is still scored correctly;
      2. the model has as many classes as the file has categories: by position in the sorted category ids (the
         COCO-trained convention; class names may differ, e.g. an untrained model's placeholder names);
      3. every category of the file has a model class of the same name: by name; extra model classes are dropped.
    Raises `DatasetError` naming the categories the model lacks when none applies.
    """
    sorted_ids = contiguous_category_ids(gt)
    name_of_id = {cat_id: str(gt.cats[cat_id].get("name", "")) for cat_id in sorted_ids}
    id_of_name = {name.strip().lower(): cat_id for cat_id, name in name_of_id.items()}
    model_names = [str(name).strip().lower() for name in class_names]
    if set(model_names) == set(id_of_name) and len(model_names) == len(sorted_ids):
        return [id_of_name[name] for name in model_names], "by class name"
    if len(class_names) == len(sorted_ids):
        return list(sorted_ids), "by position in the sorted category ids"
    missing = [cat_id for cat_id in sorted_ids if name_of_id[cat_id].strip().lower() not in model_names]
    if not missing:
        return [id_of_name.get(name) for name in model_names], "by class name"
    raise DatasetError(
        f"cannot map the model's {len(class_names)} classes to the annotation file's {len(sorted_ids)} categories: "
        f"the counts differ and {len(missing)} categories have no model class of the same name",
        [f"category {name_of_id[cat_id]!r} (id {cat_id})" for cat_id in missing],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Model outputs -> COCO results
# ---------------------------------------------------------------------------------------------------------------------


def _as_numpy(values: torch.Tensor | np.ndarray | Sequence[Any], dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    category_ids: Sequence[int | None],
    *,
    wh_plus_one: bool = False,
    masks: torch.Tensor | np.ndarray | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Convert one image's detections to COCO results dicts.

    Args:
        image_id: the image's COCO id.
        boxes: (N, 4) `xyxy` in original-image pixels.
        scores: (N,) confidences.
        labels: (N,) 0-based contiguous labels; `category_ids[label]` is the COCO id written, None drops the box.
        wh_plus_one: write w = x2 - x1 + 1, h = y2 - y1 + 1 (a model's `postprocess.coco_wh_plus_one`: the seed's
            MindSpore det2json) instead of x2 - x1, y2 - y1.
        masks: (N, H, W) bool instance masks over the original image (mask models), written as `segmentation`
            (compressed RLE, `evaluation.rle.encode_masks`); None writes no `segmentation` key.
        extra: more keys copied into every dict (e.g. `file_name`).

    Returns:
        One dict per kept box, `bbox` as `[x, y, w, h]` (float64 of the input values, not rounded), and
        `segmentation` after `score` when `masks` is given.
    """
    boxes_xyxy = _as_numpy(boxes, np.float64).reshape(-1, 4)
    scores_np = _as_numpy(scores, np.float64).reshape(-1)
    labels_np = _as_numpy(labels, np.int64).reshape(-1)
    if not (len(boxes_xyxy) == len(scores_np) == len(labels_np)):
        raise ValueError(
            f"boxes, scores, labels disagree in length: {len(boxes_xyxy)}, {len(scores_np)}, {len(labels_np)}"
        )
    bad = labels_np[(labels_np < 0) | (labels_np >= len(category_ids))]
    if len(bad):
        raise DatasetError(
            f"label {int(bad[0])} has no category id: the label map has {len(category_ids)} entries "
            "(the model's classes do not fit the annotation file)"
        )
    if masks is not None and len(masks) != len(labels_np):
        raise ValueError(f"{len(masks)} masks for {len(labels_np)} detections")
    boxes_xywh = boxes_xyxy.copy()
    boxes_xywh[:, 2:] -= boxes_xyxy[:, :2]
    if wh_plus_one:
        boxes_xywh[:, 2:] += 1.0
    kept = [i for i, label in enumerate(labels_np.tolist()) if category_ids[label] is not None]
    # Only the kept masks are encoded: the RLE is the costly part of a mask model's results.
    rles = encode_masks([masks[i] for i in kept]) if masks is not None else None  # views: no copy of all
    results = []
    for n, i in enumerate(kept):
        result = {"image_id": int(image_id), "category_id": int(category_ids[labels_np[i]]),
                  "bbox": boxes_xywh[i].tolist(), "score": float(scores_np[i])}  # fmt: skip
        if rles is not None:
            result["segmentation"] = rles[n]
        results.append({**result, **extra})
    return results


class CocoResultsWriter:
    """Append COCO results dicts to a JSON array file as they are produced, so memory stays flat.

    The file is `[`, then one JSON object per line separated by commas, then `]`: valid JSON that `json.load` and
    pycocotools read as the list of all added detections. Use as a context manager; the closing bracket is written
    even when the block raises, so what was written so far stays a readable (partial) results file.

    Example:
        with CocoResultsWriter(out / "detections.json", category_ids) as writer:
            for image_id, det in ...:
                writer.add(image_id, det.boxes, det.scores, det.labels)
    """

    def __init__(self, path: str | Path, category_ids: Sequence[int | None], wh_plus_one: bool = False) -> None:
        self.path = Path(path)
        self.category_ids = list(category_ids)
        self.wh_plus_one = wh_plus_one  # see `detections_to_coco`
        self.count = 0  # detections written so far
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: io.TextIOWrapper | None = self.path.open("w", encoding="utf-8")
        self._file.write("[")

    def add(
        self,
        image_id: int,
        boxes: torch.Tensor | np.ndarray,
        scores: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        masks: torch.Tensor | np.ndarray | None = None,
        **extra: Any,
    ) -> int:
        """Write one image's detections (see `detections_to_coco`; `masks` adds `segmentation`); returns how many
        dicts were written."""
        return self.add_results(detections_to_coco(
            image_id, boxes, scores, labels, self.category_ids, wh_plus_one=self.wh_plus_one, masks=masks, **extra
        ))  # fmt: skip

    def add_results(self, results: Iterable[dict[str, Any]]) -> int:
        """Write ready-made COCO results dicts; returns how many."""
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        written = 0
        for item in results:
            self._file.write(("\n" if self.count == 0 else ",\n") + json.dumps(item))
            self.count += 1
            written += 1
        return written

    def close(self) -> None:
        if self._file is not None:
            self._file.write("\n]\n")
            self._file.close()
            self._file = None

    def __enter__(self) -> CocoResultsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What `evaluate_coco` found.

    Attributes:
        metrics: the 12 COCO numbers (`METRIC_NAMES`), fractions, exactly `COCOeval.stats`; -1.0 where COCO reports
            -1 (no ground truth in that area range).
        per_class: AP@[.50:.95] (area all, 100 detections) by category name, in category-id order; -1.0 for a
            category without ground truth.
        precision: `COCOeval.eval["precision"]`, shape (T=10 IoUs, R=101 recalls, K categories, A=4 areas, M=3
            max-detection settings); -1 where undefined.
        iou_thresholds: (T,) the IoU thresholds 0.50 ... 0.95.
        recall_thresholds: (R,) the recall points 0.00 ... 1.00.
        category_names: (K,) names along the precision array's K axis.
        num_detections: how many detections were evaluated.
        iou_type: "bbox" (box IoU) or "segm" (mask IoU).
    """

    metrics: dict[str, float]
    per_class: dict[str, float]
    precision: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    category_names: list[str]
    num_detections: int
    files: list[Path] = field(default_factory=list)  # files written by `evaluate_coco(out_dir=...)`
    iou_type: str = "bbox"

    def write_files(self, out_dir: str | Path) -> list[Path]:
        """Write `metrics.json` (the 12 metrics), `per_class_ap.json` and the PR-curve PNGs (`write_pr_curves`) to
        `out_dir`; a segm result's names end in `_segm` (`metrics_segm.json`, `pr_curves_segm/...`), so both fit in
        one folder and the box files keep their names. Adds the paths to `files` and returns them."""
        out_dir = Path(out_dir)
        suffix = "" if self.iou_type == "bbox" else f"_{self.iou_type}"
        written = [self.write_json(out_dir / f"metrics{suffix}.json")]
        per_class_path = out_dir / f"per_class_ap{suffix}.json"
        per_class_path.write_text(json.dumps(self.per_class, indent=2) + "\n", encoding="utf-8")
        written.append(per_class_path)
        written += self.write_pr_curves(out_dir, name=f"pr_curves{suffix}")
        self.files += written
        return written

    def format_table(self) -> str:
        """The 12 metrics (as `COCOeval.summarize` lists them) and the per-class AP, as fixed-width text."""
        lines = [f"{'metric':<7} {'IoU':<10} {'area':<7} {'maxDets':>7}  {'value':>6}"]
        for name in METRIC_NAMES:
            iou, area, max_dets = _METRIC_SETTINGS[name]
            lines.append(f"{name:<7} {iou:<10} {area:<7} {max_dets:>7}  {_fmt(self.metrics[name]):>6}")
        if self.per_class:
            lines.append("")
            lines.append("per-class AP@[.50:.95] ('-': no ground truth)")
            cells = [f"{name[:16]:<16} {_fmt(ap):>6}" for name, ap in self.per_class.items()]
            columns = 3
            for start in range(0, len(cells), columns):
                lines.append("   ".join(cells[start : start + columns]).rstrip())
        return "\n".join(lines)

    def pr_curve(self, iou_index: int) -> np.ndarray:
        """(R,) precision at each recall point for IoU threshold `iou_index`, averaged over categories that have
        ground truth (area all, 100 detections); -1 where no category has a defined value."""
        curves = self.precision[iou_index, :, :, 0, -1]  # (R, K)
        valid = curves > -1
        summed = np.where(valid, curves, 0.0).sum(axis=1)
        counts = valid.sum(axis=1)
        return np.where(counts > 0, summed / np.maximum(counts, 1), -1.0)

    def write_json(self, path: str | Path) -> Path:
        """Write the 12 metrics to `path` as a flat JSON object (exactly the keys `METRIC_NAMES`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.metrics, indent=2) + "\n", encoding="utf-8")
        return path

    def write_pr_curves(self, out_dir: str | Path, name: str = "pr_curves") -> list[Path]:
        """Write precision-recall curve PNGs: `<name>/pr_iou0.50.png` ... `pr_iou0.95.png` (one per IoU
        threshold) and `<name>.png` with all of them on one plot. Returns the paths written."""
        # Figure + Agg canvas directly, not pyplot: no global backend switch, no GUI, safe in threads and on servers.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out_dir = Path(out_dir)
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        recall = self.recall_thresholds
        kind = "" if self.iou_type == "bbox" else f"{self.iou_type} "  # box titles as they always were
        written: list[Path] = []

        def save(figure: Figure, path: Path) -> None:
            FigureCanvasAgg(figure)
            figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
            written.append(path)

        combined = Figure(figsize=(8, 5))
        combined_ax = combined.add_subplot()
        for t, iou in enumerate(self.iou_thresholds):
            curve = self.pr_curve(t)
            ap = float(curve[curve > -1].mean()) if (curve > -1).any() else -1.0
            label = f"IoU {iou:.2f}  AP {_fmt(ap)}"
            figure = Figure(figsize=(5, 4))
            ax = figure.add_subplot()
            _plot_curve(ax, recall, curve, label)
            ax.set_title(f"{kind}precision-recall, IoU {iou:.2f} (mean over categories)")
            save(figure, out_dir / name / f"pr_iou{iou:.2f}.png")
            _plot_curve(combined_ax, recall, curve, label, legend_outside=True)
        combined_ax.set_title(f"{kind}precision-recall per IoU threshold (mean over categories)")
        save(combined, out_dir / f"{name}.png")
        return written


def _fmt(value: float) -> str:
    return "-" if value < 0 or math.isnan(value) else f"{value:.3f}"


def _plot_curve(ax: Any, recall: np.ndarray, precision: np.ndarray, label: str, legend_outside: bool = False) -> None:
    defined = precision > -1
    ax.plot(recall[defined], precision[defined], label=label, linewidth=1.2)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    if legend_outside:  # ten curves: a legend inside would hide the low-recall ends of the lower ones
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")
    else:
        ax.legend(loc="lower left", fontsize="small")


def load_detections(path: str | Path) -> list[dict[str, Any]]:
    """Read a COCO results JSON file (a list of dicts); `DatasetError` naming the file when it is not one."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            detections = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: detections file not found") from None
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read detections JSON ({error})") from None
    if not isinstance(detections, list):
        raise DatasetError(
            f"{path}: a COCO results file is a JSON list of detections, found {type(detections).__name__}"
        )
    return detections


def has_segmentation_results(detections: list[Any]) -> bool:
    """Whether COCO results carry masks: any dict with a `segmentation` key (a mask model's results)."""
    return any(isinstance(det, dict) and "segmentation" in det for det in detections)


def check_segm_ground_truth(gt: COCO, source: str = "the annotation file") -> str | None:
    """Why `gt` cannot score masks, in words, or None when it can.

    Segm evaluation needs a mask for every object: a file whose annotations have no `segmentation` (None or `[]`,
    what box-only exporters and coco128's val file write) or only some of them (the others would be unmatchable
    objects, lowering AP for nothing the model did) gives a reason; so does an image without an integer `height`
    and `width` (pycocotools rasterises the polygons at that size). A file without annotations can be scored.

    Raises:
        DatasetError: segmentations that pycocotools' C code cannot take safely (`data.masks.check_segmentation`:
            short polygons, far-out points, RLEs of the wrong size), all of them listed.
    """
    annotations = gt.dataset.get("annotations", [])
    missing = sum(not has_segmentation(ann.get("segmentation")) for ann in annotations)
    if annotations and missing == len(annotations):
        return f"{source} has no instance masks (no annotation has a 'segmentation')"
    if missing:
        return f"{missing} of the {len(annotations)} annotations of {source} have no 'segmentation'"
    unsized = [image.get("id") for image in gt.dataset["images"]
               if not all(_is_positive_int(image.get(key)) for key in ("height", "width"))]  # fmt: skip
    if unsized:
        return f"{len(unsized)} images of {source} have no integer 'height' and 'width' (e.g. id {unsized[0]!r})"
    problems = []
    for index, ann in enumerate(annotations):
        image = gt.imgs[ann["image_id"]]
        reason = check_segmentation(ann["segmentation"], image["height"], image["width"])
        if reason:
            problems.append(f"annotations[{index}] (id {ann['id']}): {reason}")
    if problems:
        raise DatasetError(f"{source}: {len(problems)} unusable segmentations", problems)
    return None


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _validate_detections(detections: list[Any], gt: COCO, source: str, iou_type: str = "bbox") -> None:
    """Raise `DatasetError` listing malformed detections and unknown image / category ids (pycocotools would
    otherwise fail with a bare assertion, or silently ignore unknown categories). For "segm" each detection needs a
    `segmentation` RLE of its image's size with compressed (string) counts, as `loadRes` takes them; the counts are
    not decoded here (that would cost as much as the evaluation), and `bbox` may be absent."""
    problems: list[str] = []
    unknown_images: dict[Any, int] = {}
    unknown_categories: dict[Any, int] = {}
    required = ("image_id", "category_id", "bbox", "score") if iou_type == "bbox" else (
        "image_id", "category_id", "segmentation", "score")  # fmt: skip
    for index, det in enumerate(detections):
        if not isinstance(det, dict):
            problems.append(f"{source}[{index}]: not an object")
            continue
        missing = [key for key in required if key not in det]
        if missing:
            problems.append(f"{source}[{index}]: missing {', '.join(missing)}")
            continue
        bbox = det.get("bbox")
        if "bbox" in required and not (
            isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)
        ):
            problems.append(f"{source}[{index}]: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        if "segmentation" in required:
            image_id = det["image_id"]
            image = gt.imgs.get(image_id) if isinstance(image_id, (int, float, str)) else None
            problem = _rle_result_problem(det["segmentation"], image)
            if problem:
                problems.append(f"{source}[{index}]: {problem}")
        score = det["score"]
        if not _is_finite_number(score):
            problems.append(f"{source}[{index}]: score must be a finite number, got {score!r}")
        for key, known, unknown in (
            ("image_id", gt.imgs, unknown_images),
            ("category_id", gt.cats, unknown_categories),
        ):
            value = det[key]
            if not isinstance(value, (int, float, str)):  # unhashable or nonsense: name it rather than crash
                problems.append(f"{source}[{index}]: {key} must be an integer, got {value!r}")
            elif value not in known:
                unknown[value] = unknown.get(value, 0) + 1
    # Unknown ids are one line each kind, however many: a results file of another data set (other images) or of a
    # model with other classes is one mistake, said in one line, not a line per id.
    unknown: list[str] = []
    if unknown_images:
        unknown.append(f"image_id {_some(unknown_images)} {'is' if len(unknown_images) == 1 else 'are'} not in the "
                       "annotation file")  # fmt: skip
        if sum(unknown_images.values()) == len(detections):
            unknown[-1] += ": no detection is on one of its images, the two files are about different images"
    if unknown_categories:
        unknown.append(f"category_id {_some(unknown_categories)} {'is' if len(unknown_categories) == 1 else 'are'} "
                       f"not in the annotation file (its category ids: {_some(dict.fromkeys(sorted(gt.cats)))})")
    if unknown and not problems:
        error = DatasetError(f"{source}: " + "; ".join(unknown))  # one line, the kinds still listed in `problems`
        error.problems = unknown
        raise error
    problems += unknown
    if problems:
        raise DatasetError(f"{source}: {len(problems)} problems with the detections", problems)


def _some(counts: dict[Any, int | None], limit: int = 5) -> str:
    """The first `limit` keys, with their counts when given: "1001 (9 detections), 1002 (3), and 4 more"."""
    shown = [repr(key) if count is None else f"{key!r} ({count}{' detections' if index == 0 else ''})"
             for index, (key, count) in enumerate(list(counts.items())[:limit])]  # fmt: skip
    more = f", and {len(counts) - limit} more" if len(counts) > limit else ""
    return ", ".join(shown) + more


def _rle_result_problem(segmentation: Any, image: dict[str, Any] | None) -> str | None:
    """What is wrong with a results `segmentation` for `image` (None: an unknown image, reported elsewhere)."""
    if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes))):
        return f"segmentation must be a compressed RLE {{'size': [H, W], 'counts': str}}, got {_short(segmentation)}"
    size = segmentation.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_positive_int(v) for v in size)):
        return f"segmentation 'size' must be [height, width], got {_short(size)}"
    expected = None if image is None else [image.get("height"), image.get("width")]
    if expected is not None and size != expected:
        return f"segmentation size {size} differs from the image's [height, width] {expected}"
    return None


def evaluate_coco(
    gt: str | Path | COCO,
    detections: list[dict[str, Any]] | str | Path,
    *,
    out_dir: str | Path | None = None,
    iou_type: str = "bbox",
    image_ids: Iterable[int] | None = None,
    source: str | None = None,
) -> EvalResult:
    """Evaluate COCO results against COCO annotations with pycocotools.

    Args:
        gt: annotation file or a loaded `COCO`.
        detections: COCO results dicts, or a results JSON file. The caller's list is not modified (pycocotools adds
            keys to what it is given, so it gets copies).
        out_dir: when given, writes `metrics.json` (the 12 metrics), `per_class_ap.json` and the PR-curve PNGs
            there (`EvalResult.write_files`; `metrics_segm.json` ... for "segm").
        iou_type: "bbox", or "segm" (mask IoU of the results' `segmentation` RLEs; the annotation file needs masks,
            see `check_segm_ground_truth`).
        image_ids: evaluate only these images (default: every image of the annotation file, so an image without
            detections counts its objects as missed).
        source: what error messages call the detections (default: the file's path, or "detections" for a list).

    For "segm" the results go to pycocotools without their `bbox`, as mmdetection's CocoMetric and detectron2's
    COCOEvaluator pass them: given a `bbox`, `loadRes` would take the box area as each detection's area, and the
    small/medium/large split would differ from the masks' (AP over all areas is the same either way).

    An empty detection list is evaluated, not refused: pycocotools' `loadRes` cannot load one, so an empty results
    set is built directly and COCOeval runs as usual. The metrics are then what COCOeval reports for no detections:
    0.0 where ground truth exists, -1.0 where an area range has none.

    Raises:
        DatasetError: unreadable files, malformed detections, or detections whose image or category id is not in
            the annotation file (all of them listed); for "segm", an annotation file without usable masks.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type {iou_type!r} is not supported: 'bbox' or 'segm'")
    if source is None:
        source = str(detections) if isinstance(detections, (str, Path, os.PathLike)) else "detections"
    coco_gt = load_coco_gt(gt)
    if iou_type == "segm":
        named = str(gt) if isinstance(gt, (str, Path, os.PathLike)) else "the annotation file"
        reason = check_segm_ground_truth(coco_gt, named)
        if reason:
            raise DatasetError(f"cannot evaluate masks: {reason}")
    dets = load_detections(detections) if isinstance(detections, (str, Path, os.PathLike)) else detections
    _validate_detections(dets, coco_gt, source, iou_type)

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
        if dets:
            dropped = ("bbox",) if iou_type == "segm" else ()  # see the docstring
            coco_dt = coco_gt.loadRes([{k: v for k, v in det.items() if k not in dropped} for det in dets])
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": coco_gt.dataset["categories"],
                               "annotations": []}  # fmt: skip
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    metrics = {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats, strict=True)}
    precision = np.asarray(evaluator.eval["precision"])
    cat_ids = list(evaluator.params.catIds)
    names = [str(coco_gt.cats[cat_id].get("name", cat_id)) for cat_id in cat_ids]
    per_class: dict[str, float] = {}
    for k, name in enumerate(names):
        # Same reduction as COCOeval.summarize for AP: mean over defined entries, area "all", last maxDets (100).
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[name if name not in per_class else f"{name} (id {cat_ids[k]})"] = (
            float(np.mean(values)) if values.size else -1.0
        )
    result = EvalResult(
        metrics=metrics,
        per_class=per_class,
        precision=precision,
        iou_thresholds=np.asarray(evaluator.params.iouThrs),
        recall_thresholds=np.asarray(evaluator.params.recThrs),
        category_names=names,
        num_detections=len(dets),
        iou_type=iou_type,
    )
    if out_dir is not None:
        result.write_files(out_dir)
    return result
