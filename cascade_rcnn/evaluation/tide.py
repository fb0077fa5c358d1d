"""TIDE error decomposition (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV
2020), computed by the paper's own package, `tidecv`.

Every detection that is not a true positive at IoU `fg_iou` (0.5), and every object no detection found, gets one error
type; the first definition that applies wins, in this order (IoU_max is a detection's highest IoU with any ground
truth of the named kind; `bg_iou` is 0.1):

- **loc** (localisation): `bg_iou` <= IoU_max <= `fg_iou` with an object of the detection's class;
- **cls** (classification): IoU_max >= `fg_iou` with an object of another class;
- **dupe** (duplicate): IoU_max >= `fg_iou` with an object of its class that a higher-scoring detection already took;
- **bkg** (background): IoU_max <= `bg_iou` with every object;
- **both** (classification and localisation): any other false positive (`bg_iou` <= IoU_max <= `fg_iou` with an
  object of another class);
- **miss**: an object that no detection matched and that no cls or loc error could be fixed into.

The dAP of a type is AP@`fg_iou` after its oracle fixes all errors of that type, minus AP@`fg_iou` as it is: cls and
loc errors become true positives (the highest-scoring one per object; the others are suppressed), dupe, bkg and both
detections are removed, missed objects are removed from the ground truth. Each oracle is applied alone (not
progressively), as in the paper's main table. Two more: `false_positive` (every false positive scored 0) and
`false_negative` (every unmatched object removed).

The numbers are tidecv's (its `TIDERun`): this module only builds its inputs from COCO annotations and results and
reads its errors back by detection index and annotation id. Two departures from tidecv's *counts* (not its dAP):
detections that COCO would ignore (matched to a crowd region) are not counted or listed, although tidecv classifies
them too (their fixes change no AP); and values are fractions like the COCO metrics, not percentage points.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pycocotools.coco import COCO

from cascade_rcnn.errors import ConfigError

# tidecv's short names (its TIDE._error_types order) -> ours.
ERROR_TYPES: tuple[str, ...] = ("cls", "loc", "both", "dupe", "bkg", "miss")
_TIDECV_NAMES = {"Cls": "cls", "Loc": "loc", "Both": "both", "Dupe": "dupe", "Bkg": "bkg", "Miss": "miss"}

ERROR_DESCRIPTIONS: dict[str, str] = {
    "cls": "classification: IoU >= 0.5 with an object of another class",
    "loc": "localisation: 0.1 <= IoU <= 0.5 with an object of the right class",
    "both": "classification and localisation: 0.1 <= IoU <= 0.5 with an object of another class",
    "dupe": "duplicate: IoU >= 0.5 with an object of the right class that a higher-scoring detection took",
    "bkg": "background: IoU <= 0.1 with every object",
    "miss": "missed: an object no detection found (nor a cls or loc error could be fixed into)",
}


@dataclass(frozen=True)
class ErrorCase:
    """One error: a detection (index into the analysed detection list) or, for "miss", an object.

    `annotation_id` is the object the error is about where there is one: the object a cls / loc detection overlaps,
    the object a duplicate repeats, the missed object; None for bkg and both.
    """

    kind: str
    image_id: int
    detection: int | None
    annotation_id: int | None
    score: float | None


@dataclass
class ErrorAnalysis:
    """What `analyze_errors` found; AP and dAP are fractions (AP@`fg_iou`, tidecv's own 101-point AP)."""

    iou_type: str
    ap: float
    dap: dict[str, float]  # ERROR_TYPES -> dAP (nan when the oracle leaves nothing to score)
    special: dict[str, float]  # "false_positive", "false_negative" -> dAP
    counts: dict[str, int]  # ERROR_TYPES -> how many
    cases: list[ErrorCase] = field(default_factory=list)
    fg_iou: float = 0.5
    bg_iou: float = 0.1
    note: str | None = None  # why nothing was analysed, when so

    def to_json(self) -> dict[str, Any]:
        """The numbers (not the cases) as a JSON-ready dict; nan becomes None."""

        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {"iou_type": self.iou_type, "fg_iou": self.fg_iou, "bg_iou": self.bg_iou, "ap": number(self.ap),
                "dap": {k: number(v) for k, v in self.dap.items()},
                "special": {k: number(v) for k, v in self.special.items()}, "counts": dict(self.counts),
                "note": self.note}  # fmt: skip


def analyze_errors(
    gt: COCO,
    detections: Sequence[dict[str, Any]],
    *,
    iou_type: str = "bbox",
    image_ids: Iterable[int] | None = None,
    fg_iou: float = 0.5,
    bg_iou: float = 0.1,
    max_detections: int = 100,
) -> ErrorAnalysis:
    """Run tidecv's TIDE on COCO annotations and COCO results (validated by `evaluate_coco` beforehand).

    Args:
        gt: the annotations; crowd objects become tidecv ignore regions, as COCO ignores detections on them.
        detections: COCO results dicts (`bbox` [x, y, w, h]; `segmentation` RLE for "segm").
        iou_type: "bbox" or "segm" (tidecv's mask mode; the annotations' polygons are converted to RLE).
        image_ids: analyse only these images (default: every image of the annotation file).
        fg_iou, bg_iou: the paper's foreground and background IoU thresholds.
        max_detections: per image, the highest-scoring ones (COCO's 100).

    Returns:
        An `ErrorAnalysis`. Without detections every object is a miss (and the miss dAP is undefined: its oracle
        leaves nothing to score); with neither detections nor objects, only a `note` saying so.
    """
    TIDE, Data, FalsePositiveError = _tidecv()

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type {iou_type!r} is not supported: 'bbox' or 'segm'")
    images = sorted(gt.imgs) if image_ids is None else sorted(set(image_ids))
    wanted = set(images)
    annotations = [ann for ann in gt.dataset["annotations"] if ann["image_id"] in wanted]
    dets = [(index, det) for index, det in enumerate(detections) if det["image_id"] in wanted]
    if not dets and not any(not ann.get("iscrowd", 0) for ann in annotations):
        note = "neither detections nor objects to analyse"
        return ErrorAnalysis(iou_type, math.nan, dict.fromkeys(ERROR_TYPES, math.nan),
                             {"false_positive": math.nan, "false_negative": math.nan}, dict.fromkeys(ERROR_TYPES, 0),
                             note=note, fg_iou=fg_iou, bg_iou=bg_iou)  # fmt: skip

    mask_mode = iou_type == "segm"
    gt_data, dt_data = Data("ground truth", max_dets=max_detections), Data("detections", max_dets=max_detections)
    for image_id in images:  # every image, so an image without objects still turns its detections into bkg errors
        gt_data.add_image(image_id, str(gt.imgs[image_id].get("file_name", image_id)))
    for cat_id, cat in gt.cats.items():
        gt_data.add_class(cat_id, str(cat.get("name", cat_id)))
    annotation_ids: list[int] = []  # tidecv's gt `_id` (its insertion order) -> COCO annotation id
    for ann in annotations:
        shape = {"mask": gt.annToRLE(ann)} if mask_mode else {"box": list(ann["bbox"])}
        if ann.get("iscrowd", 0):
            gt_data.add_ignore_region(ann["image_id"], ann["category_id"], **shape)
        else:
            gt_data.add_ground_truth(ann["image_id"], ann["category_id"], **shape)
        annotation_ids.append(ann["id"])
    detection_indices: list[int] = []  # tidecv's prediction `_id` -> index into `detections`
    for index, det in dets:
        shape = {"mask": det["segmentation"]} if mask_mode else {"box": list(det["bbox"])}
        dt_data.add_detection(det["image_id"], det["category_id"], float(det["score"]), **shape)
        detection_indices.append(index)

    # TIDE() builds a seaborn plotter that restyles matplotlib globally; keep that inside this block.
    import matplotlib

    with matplotlib.rc_context(), contextlib.redirect_stdout(io.StringIO()):
        tide = TIDE(pos_threshold=fg_iou, background_threshold=bg_iou, mode=TIDE.MASK if mask_mode else TIDE.BOX)
        run = tide.evaluate(gt_data, dt_data, name="detections")
        dap = {kind: math.nan for kind in ERROR_TYPES}
        for error_type in TIDE._error_types:  # one oracle at a time, so one undefined dAP leaves the others
            fixed = _safe(lambda: run.fix_main_errors(error_types=[error_type]), {})  # noqa: B023
            for fixed_type, value in fixed.items():
                dap[_TIDECV_NAMES[fixed_type.short_name]] = value / 100.0
        # TIDERun.fix_special_errors, one at a time for the same reason.
        false_positive = _safe(lambda: run.fix_errors(transform=FalsePositiveError.fix).get_mAP() - run.ap, math.nan)
        false_negative = _safe(lambda: run.fix_errors(false_neg_dict=run.false_negatives).get_mAP() - run.ap,
                               math.nan)  # fmt: skip
    specials = {"false_positive": false_positive / 100.0, "false_negative": false_negative / 100.0}

    cases: list[ErrorCase] = []
    for error in run.errors:
        kind = _TIDECV_NAMES[error.short_name]
        pred = getattr(error, "pred", None)
        if pred is not None and pred.get("used") is None:
            continue  # on a crowd region: COCO ignores it, and so does its oracle (see the module docstring)
        target = getattr(error, "gt", None)
        if kind == "dupe":
            target = gt_data.annotations[error.suppressor["matched_with"]]
        cases.append(ErrorCase(
            kind=kind,
            image_id=int((pred or target)["image"]),
            detection=None if pred is None else detection_indices[pred["_id"]],
            annotation_id=None if target is None else int(annotation_ids[target["_id"]]),
            score=None if pred is None else float(pred["score"]),
        ))  # fmt: skip
    counts = dict.fromkeys(ERROR_TYPES, 0)
    for case in cases:
        counts[case.kind] += 1
    return ErrorAnalysis(iou_type=iou_type, ap=run.ap / 100.0, dap=dap, special=specials, counts=counts, cases=cases,
                         fg_iou=fg_iou, bg_iou=bg_iou)  # fmt: skip


def _safe(compute: Any, default: Any) -> Any:
    """tidecv divides by the number of classes left to score: an oracle that removes every object and detection
    (e.g. fixing misses when nothing was detected) divides by zero; such a dAP is undefined, not an error."""
    try:
        return compute()
    except ZeroDivisionError:
        return default


def require_tidecv() -> None:
    """Raise a one-line ConfigError naming the extra when tidecv (the `report` extra) is not installed."""
    _tidecv()


def _tidecv() -> tuple[Any, Any, Any]:
    try:
        from tidecv import TIDE, Data
        from tidecv.errors.main_errors import FalsePositiveError
    except ImportError:
        raise ConfigError(
            "the report's error analysis needs tidecv: pip install 'cascade-rcnn[report]'"
        ) from None
    return TIDE, Data, FalsePositiveError
