"""`eval --report`: one self-contained HTML page (and the same data as JSON, the plots as PNG files) that shows where a
detector fails, not only how well it does.

`write_report` writes, into the eval output folder:

- `report.html`: opens offline; no script, style or font from elsewhere, every plot and crop embedded as a data URI
  (the full drawn images the gallery crops link to lie beside it, in `report/images/`);
- `report.json`: every number the page shows;
- `report/*.png`: the plots (per-class precision-recall curves, the confusion matrix, the TIDE errors, the stages).

What it shows: the 12 COCO metrics (`EvalResult.metrics`, the numbers `metrics.json` holds); a sortable per-class
table (AP, AP50, AP75, APs/m/l from COCOeval's precision array, objects and detections); precision-recall curves,
mean over classes and per class, one curve per IoU threshold; the confusion matrix over the classes plus background
(`evaluation.confusion`, IoU 0.5, score >= `score_threshold`); the TIDE error decomposition (`evaluation.tide`); each
cascade stage's metrics next to the ensemble's; galleries of the highest-scoring false positives and of the largest
missed objects, as drawn crops linking to the whole drawn image (when the images are at hand). Mask results get the
metrics, per-class table, curves and TIDE errors for "segm" too; the confusion matrix and galleries are of boxes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from pycocotools.coco import COCO

from cascade_rcnn.errors import ImageReadError
from cascade_rcnn.evaluation.coco import (
    _METRIC_SETTINGS,
    METRIC_NAMES,
    EvalResult,
    _plot_curve,
    check_segm_ground_truth,
    contiguous_category_ids,
    has_segmentation_results,
)
from cascade_rcnn.evaluation.confusion import DEFAULT_SCORE_THRESHOLD, ConfusionMatrix, confusion_matrix
from cascade_rcnn.evaluation.tide import (
    ERROR_DESCRIPTIONS,
    ERROR_TYPES,
    ErrorAnalysis,
    ErrorCase,
    analyze_errors,
    require_tidecv,
)

# Columns of the per-class table after the counts, and of the stage table.
CLASS_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
GALLERY_SIZE = 24
_CROP_SIDE = 192  # pixels, the longer side of a gallery crop
_LINKED_IMAGE_SIDE = 1280  # pixels, the longer side of a drawn image a crop links to


# ---------------------------------------------------------------------------------------------------------------------
# Page pieces shared with `data preview` (evaluation.preview)
# ---------------------------------------------------------------------------------------------------------------------


PAGE_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 0 16px 48px; color: #222; }
h1 { font-size: 22px; margin: 20px 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 16px 0 6px; }
nav a { margin-right: 12px; } .muted { color: #666; } .note { background: #fff4d6; padding: 8px 12px; margin: 8px 0; }
table { border-collapse: collapse; margin: 6px 0; } th, td { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; } table.sortable th:after { content: " \\2195"; color: #aaa; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; } figure img { display: block; }
figcaption { font-size: 12px; color: #444; max-width: 220px; } img.plot { max-width: 100%; }
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var descending = th.getAttribute("data-order") !== "desc";
      table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("data-order"); });
      th.setAttribute("data-order", descending ? "desc" : "asc");
      function key(row) {
        var cell = row.cells[column], value = cell.getAttribute("data-value");
        return value === null ? cell.textContent : parseFloat(value);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x === "number" && typeof y === "number") {
          if (isNaN(x) || x < 0) return 1;  // undefined values ("-") last either way
          if (isNaN(y) || y < 0) return -1;
          return descending ? y - x : x - y;
        }
        return descending ? String(y).localeCompare(String(x)) : String(x).localeCompare(String(y));
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def html_page(title: str, body: str) -> str:
    """A whole page: inline style and the table-sorting script, nothing loaded from elsewhere."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n{body}\n<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def save_figure(figure: Any, path: Path) -> str:
    """Write a matplotlib `Figure` as a PNG at `path`; returns the PNG as a data URI for the page."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return data_uri(buffer.getvalue(), "image/png")


def jpeg_uri(image: Any, quality: int = 85) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return data_uri(buffer.getvalue(), "image/jpeg")


def fmt(value: float | None) -> str:
    """A metric as the page shows it: 3 decimals, "-" where COCO reports -1 (no ground truth) or it is undefined."""
    return "-" if value is None or math.isnan(value) or value < 0 else f"{value:.3f}"


def number_cell(value: float | None, **attributes: str) -> str:
    """A right-aligned table cell whose sort key (`data-value`) is the exact number; -1 for undefined."""
    exact = -1.0 if value is None or math.isnan(value) else value
    extra = "".join(f' data-{key.replace("_", "-")}="{html.escape(str(v))}"' for key, v in attributes.items())
    return f'<td class="num" data-value="{exact!r}"{extra}>{fmt(value)}</td>'


def count_cell(value: int) -> str:
    return f'<td class="num" data-value="{value}">{value}</td>'


def safe_name(text: str) -> str:
    """A file-name-safe form of a class name (letters, digits, - and _)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "class"


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    gt: COCO
    detections: list[dict[str, Any]]
    image_ids: list[int]
    out_dir: Path
    plots_dir: Path
    notes: list[str]


def write_report(
    gt: COCO,
    detections: Sequence[dict[str, Any]],
    results: Sequence[EvalResult],
    out_dir: str | Path,
    *,
    images_dir: str | Path | None = None,
    stage_results: Sequence[tuple[str, EvalResult]] = (),
    image_ids: Iterable[int] | None = None,
    annotations_name: str = "",
    detections_name: str = "",
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    gallery_size: int = GALLERY_SIZE,
) -> Path:
    """Write `report.html`, `report.json` and `report/*.png` into `out_dir`; returns the path of `report.html`.

    Args:
        gt: the annotations the results were scored against.
        detections: the COCO results that `results` scored (already validated by `evaluate_coco`).
        results: `evaluate_coco`'s results, "bbox" first, then "segm" for mask results.
        images_dir: the folder of the annotation file's images: the galleries are drawn from it (None: listed only).
        stage_results: (name, result) of each cascade stage's own output, in order ("stage 1", ...).
        image_ids: the images that were scored (default: all of the annotation file's).
        annotations_name, detections_name: what the page calls the inputs (file paths).
        score_threshold: the confusion matrix's (and the linked drawn images') score threshold.
        gallery_size: crops per gallery.
    """
    require_tidecv()  # before any work: a missing extra is one line, not a half-written report
    started = time.perf_counter()
    out_dir = Path(out_dir)
    ids = sorted(gt.imgs) if image_ids is None else sorted(set(image_ids))
    wanted = set(ids)
    ctx = _Context(gt=gt, detections=[det for det in detections if det["image_id"] in wanted], image_ids=ids,
                   out_dir=out_dir, plots_dir=out_dir / "report", notes=[])  # fmt: skip
    ctx.plots_dir.mkdir(parents=True, exist_ok=True)
    objects = [ann for ann in gt.dataset["annotations"] if ann["image_id"] in wanted and not ann.get("iscrowd", 0)]
    if not ctx.detections:
        ctx.notes.append("The detections hold no detection for these images: every object counts as missed, "
                         "and every metric is 0 (or - where there is no ground truth).")  # fmt: skip
    if not objects:
        ctx.notes.append("The annotations hold no object for these images: every detection is a false positive, "
                         "and AP is undefined (-).")  # fmt: skip
    by_type = {result.iou_type: result for result in results}
    if "segm" not in by_type and has_segmentation_results(ctx.detections):
        reason = check_segm_ground_truth(gt, annotations_name or "the annotation file")
        ctx.notes.append(f"Masks were not scored: {reason}." if reason else "Masks were not scored.")

    analyses = {iou_type: analyze_errors(gt, ctx.detections, iou_type=iou_type, image_ids=ids) for iou_type in by_type}
    confusion = confusion_matrix(gt, ctx.detections, score_threshold=score_threshold, image_ids=ids)
    galleries = _collect_galleries(ctx, analyses["bbox"], gallery_size)

    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    sections.append(("metrics", "COCO metrics", _metrics_section(results)))
    if stage_results:
        sections.append(("stages", "Cascade stages", _stages_section(ctx, stage_results, by_type["bbox"])))
    json_types: dict[str, Any] = {}
    for result in results:
        rows = _per_class_rows(ctx, result)
        curves_html, curves_json = _pr_section(ctx, result, rows)
        suffix = "" if result.iou_type == "bbox" else f" ({result.iou_type})"
        sections.append((f"classes-{result.iou_type}", f"Per-class AP{suffix}", _class_table(result, rows)))
        sections.append((f"pr-{result.iou_type}", f"Precision-recall curves{suffix}", curves_html))
        json_types[result.iou_type] = {"metrics": result.metrics, "per_class": rows, "pr_curves": curves_json,
                                       "tide": analyses[result.iou_type].to_json()}  # fmt: skip
    sections.append(("confusion", "Confusion matrix", _confusion_section(ctx, confusion)))
    for iou_type, analysis in analyses.items():
        suffix = "" if iou_type == "bbox" else f" ({iou_type})"
        sections.append((f"tide-{iou_type}", f"TIDE errors{suffix}", _tide_section(ctx, analysis)))
    sections.append(("galleries", "False positives and missed objects", _gallery_section(ctx, galleries, images_dir,
                                                                                           score_threshold)))

    title = "Detection report"
    header = (f"<h1>{title}</h1>\n<p class=\"muted\">annotations <code>{html.escape(annotations_name)}</code>"
              f" &middot; detections <code>{html.escape(detections_name)}</code> &middot; {len(ids)} images, "
              f"{len(objects)} objects, <span id=\"num-detections\">{len(ctx.detections)}</span> detections &middot; "
              f"written {time.strftime('%Y-%m-%d %H:%M')}</p>\n")  # fmt: skip
    notes = "".join(f'<p class="note">{html.escape(note)}</p>\n' for note in ctx.notes)
    nav = "<nav>" + "".join(f'<a href="#{anchor}">{html.escape(name)}</a>' for anchor, name, _ in sections) + "</nav>"
    body = header + notes + nav + "".join(f'\n<section id="{anchor}">\n<h2>{html.escape(name)}</h2>\n{content}\n'
                                          "</section>" for anchor, name, content in sections)  # fmt: skip
    report_path = out_dir / "report.html"
    report_path.write_text(html_page(title, body), encoding="utf-8")

    report_json = {
        "annotations": annotations_name, "detections": detections_name, "num_images": len(ids),
        "num_objects": len(objects), "num_detections": len(ctx.detections), "notes": ctx.notes,
        "iou_types": json_types, "stages": [{"name": name, "metrics": r.metrics} for name, r in stage_results],
        "confusion_matrix": confusion.to_json(),
        "galleries": {kind: [item.to_json() for item in items] for kind, items in galleries.items()},
        "plots": sorted(str(path.relative_to(out_dir)) for path in ctx.plots_dir.rglob("*.png")),
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    (out_dir / "report.json").write_text(json.dumps(report_json, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return report_path


# --- metrics and stages -----------------------------------------------------------------------------------------------


def _metrics_section(results: Sequence[EvalResult]) -> str:
    head = "".join(f'<th class="num">{r.iou_type}</th>' for r in results)
    rows = []
    for name in METRIC_NAMES:
        iou, area, max_dets = _METRIC_SETTINGS[name]
        cells = "".join(number_cell(r.metrics[name], metric=name, iou_type=r.iou_type) for r in results)
        rows.append(f"<tr><th>{name}</th><td>{iou}</td><td>{area}</td><td class=\"num\">{max_dets}</td>{cells}</tr>")
    return (f'<table id="metrics"><thead><tr><th>metric</th><th>IoU</th><th>area</th><th class="num">max dets</th>'
            f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>\n"
            '<p class="muted">pycocotools COCOeval, the numbers of metrics.json; - : no ground truth in that range.'
            "</p>")


def _stages_section(ctx: _Context, stage_results: Sequence[tuple[str, EvalResult]], ensemble: EvalResult) -> str:
    from matplotlib.figure import Figure

    rows = [*stage_results, ("ensemble", ensemble)]
    head = "".join(f'<th class="num">{name}</th>' for name in CLASS_METRICS)
    body = "".join(f"<tr><th>{html.escape(name)}</th>" + "".join(number_cell(r.metrics[m], metric=m, stage=name)
                                                                  for m in CLASS_METRICS) + "</tr>"
                   for name, r in rows)  # fmt: skip
    figure = Figure(figsize=(6, 3.5))
    ax = figure.add_subplot()
    for metric in ("AP", "AP50", "AP75"):
        ax.plot([name for name, _ in rows], [max(r.metrics[metric], 0.0) for _, r in rows], marker="o", label=metric)
    ax.set_ylim(0.0, 1.02)
    ax.set_ylabel("box AP")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("each stage's own detections, and the ensemble (mean of the stages' scores)")
    uri = save_figure(figure, ctx.plots_dir / "stages.png")
    return (f'<table id="stages"><thead><tr><th>output</th>{head}</tr></thead><tbody>{body}</tbody></table>\n'
            f'<img class="plot" src="{uri}" alt="AP per cascade stage">')


# --- per class --------------------------------------------------------------------------------------------------------


def _per_class_rows(ctx: _Context, result: EvalResult) -> list[dict[str, Any]]:
    """One dict per category (sorted id order): name, id, objects, detections, and CLASS_METRICS from the precision
    array, reduced as `evaluate_coco` reduces it for `per_class` (mean of the defined entries, 100 detections)."""
    precision = result.precision  # (T, R, K, A, M)
    t50 = int(np.argmin(np.abs(result.iou_thresholds - 0.5)))
    t75 = int(np.argmin(np.abs(result.iou_thresholds - 0.75)))
    cat_ids = contiguous_category_ids(ctx.gt)
    wanted = set(ctx.image_ids)
    objects = {cat_id: 0 for cat_id in cat_ids}
    for ann in ctx.gt.dataset["annotations"]:
        if ann["image_id"] in wanted and not ann.get("iscrowd", 0):
            objects[ann["category_id"]] += 1
    dets = {cat_id: 0 for cat_id in cat_ids}
    for det in ctx.detections:
        dets[det["category_id"]] += 1

    def mean(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(defined.mean()) if defined.size else -1.0

    rows = []
    for k, (name, cat_id) in enumerate(zip(result.per_class, cat_ids, strict=True)):
        row: dict[str, Any] = {"name": name, "category_id": cat_id, "objects": objects[cat_id],
                               "detections": dets[cat_id]}  # fmt: skip
        row["AP"] = mean(precision[:, :, k, 0, -1])
        row["AP50"] = mean(precision[t50, :, k, 0, -1])
        row["AP75"] = mean(precision[t75, :, k, 0, -1])
        for area, metric in ((1, "APs"), (2, "APm"), (3, "APl")):
            row[metric] = mean(precision[:, :, k, area, -1])
        rows.append(row)
    return rows


def _class_table(result: EvalResult, rows: list[dict[str, Any]]) -> str:
    head = "".join(f'<th class="num">{m}</th>' for m in CLASS_METRICS)
    body = []
    for row in rows:
        cells = "".join(number_cell(row[m], metric=m) for m in CLASS_METRICS)
        body.append(f'<tr data-class="{html.escape(row["name"])}"><td>{html.escape(row["name"])}</td>'
                    f"{count_cell(row['category_id'])}{count_cell(row['objects'])}{count_cell(row['detections'])}"
                    f"{cells}</tr>")  # fmt: skip
    return (f'<table class="sortable per-class" data-iou-type="{result.iou_type}"><thead><tr><th>class</th>'
            f'<th class="num">id</th><th class="num">objects</th><th class="num">detections</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>\n"
            '<p class="muted">Click a column to sort. AP over IoU 0.50:0.95 unless named; - : no ground truth.</p>')


def _pr_section(ctx: _Context, result: EvalResult, rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The mean curves (one per IoU threshold) and one plot per class; the curves themselves for the JSON."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    suffix = "" if result.iou_type == "bbox" else f"_{result.iou_type}"
    recall = result.recall_thresholds
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(result.iou_thresholds)))
    kind = "box" if result.iou_type == "bbox" else "mask"

    def plot(curves: np.ndarray, title: str, size: tuple[float, float], path: Path, legend: str = "x-small") -> str:
        figure = Figure(figsize=size)
        ax = figure.add_subplot()
        for t, iou in enumerate(result.iou_thresholds):
            curve = curves[t]
            defined = curve[curve > -1]
            ap = float(defined.mean()) if defined.size else -1.0
            _plot_curve(ax, recall, curve, f"IoU {iou:.2f}  AP {fmt(ap)}", legend_outside=True)
            ax.lines[-1].set_color(colors[t])
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=legend)
        ax.set_title(title, fontsize="medium")
        return save_figure(figure, path)

    mean_curves = np.stack([result.pr_curve(t) for t in range(len(result.iou_thresholds))])
    mean_uri = plot(mean_curves, f"{kind} precision-recall, mean over classes", (8, 5),
                    ctx.plots_dir / f"pr_mean{suffix}.png")  # fmt: skip
    figures = []
    per_class_json = {}
    for k, row in enumerate(rows):
        curves = result.precision[:, :, k, 0, -1]  # (T, R)
        per_class_json[row["name"]] = np.round(curves, 4).tolist()
        uri = plot(curves, f"{row['name']}: AP {fmt(row['AP'])}", (3.4, 2.3),
                   ctx.plots_dir / f"pr_by_class{suffix}" / f"{row['category_id']}_{safe_name(row['name'])}.png",
                   legend="xx-small")  # fmt: skip
        figures.append(f'<figure><img class="plot" src="{uri}" alt="precision-recall of {html.escape(row["name"])}">'
                       f"</figure>")  # fmt: skip
    content = (f'<img class="plot" src="{mean_uri}" alt="mean precision-recall per IoU threshold">\n'
               f'<h3>Per class</h3>\n<p class="muted">Area all, 100 detections per image; - : no ground truth.</p>\n'
               f'<div class="grid">{"".join(figures)}</div>')  # fmt: skip
    curves_json = {"recall": np.round(recall, 4).tolist(), "iou_thresholds": np.round(result.iou_thresholds,
                   4).tolist(), "mean": np.round(mean_curves, 4).tolist(), "per_class": per_class_json}  # fmt: skip
    return content, curves_json


# --- confusion matrix and TIDE ---------------------------------------------------------------------------------------


def _confusion_section(ctx: _Context, confusion: ConfusionMatrix) -> str:
    uri = _confusion_png(ctx, confusion)
    k = len(confusion.class_names)
    matrix = confusion.matrix
    right = int(np.trace(matrix[:k, :k]))
    confused = int(matrix[:k, :k].sum()) - right
    pairs = "".join(f"<tr><td>{html.escape(g)}</td><td>{html.escape(p)}</td>{count_cell(n)}</tr>"
                    for g, p, n in confusion.most_confused())  # fmt: skip
    pairs_table = (f'<h3>Most confused classes</h3><table id="confused"><thead><tr><th>ground truth</th>'
                   f'<th>predicted as</th><th class="num">count</th></tr></thead><tbody>{pairs}</tbody></table>'
                   if pairs else '<p class="muted">No object was matched by a detection of another class.</p>')
    return (f"<p>Box IoU &ge; {confusion.iou_threshold:g}, detections scoring &ge; "
            f'<b id="confusion-score-threshold">{confusion.score_threshold:g}</b>; rows are the ground truth, '
            "columns the prediction; the last row counts detections that matched no object (false positives), the "
            "last column objects no detection matched (missed). A detection first takes an object of its own class "
            "(as COCO matches), then one of another class.</p>\n"
            f'<table id="confusion-totals"><tbody><tr><th>right class</th>{count_cell(right)}</tr>'
            f"<tr><th>other class</th>{count_cell(confused)}</tr>"
            f"<tr><th>missed</th>{count_cell(int(matrix[:k, k].sum()))}</tr>"
            f"<tr><th>false positives</th>{count_cell(int(matrix[k, :k].sum()))}</tr></tbody></table>\n"
            f'<img class="plot" src="{uri}" alt="confusion matrix">\n{pairs_table}')  # fmt: skip


def _confusion_png(ctx: _Context, confusion: ConfusionMatrix) -> str:
    path = ctx.plots_dir / "confusion_matrix.png"
    confusion.plot(path)
    return data_uri(path.read_bytes(), "image/png")


def _tide_section(ctx: _Context, analysis: ErrorAnalysis) -> str:
    from matplotlib.figure import Figure

    if analysis.note:
        return f'<p class="note">No error analysis: {html.escape(analysis.note)}.</p>'
    rows = "".join(f'<tr data-error="{kind}"><th>{kind}</th>{count_cell(analysis.counts[kind])}'
                   f"{number_cell(analysis.dap[kind], error=kind)}<td>{html.escape(ERROR_DESCRIPTIONS[kind])}</td></tr>"
                   for kind in ERROR_TYPES)  # fmt: skip
    special = "".join(f"<tr><th>{name.replace('_', ' ')}</th>{number_cell(value)}</tr>"
                      for name, value in analysis.special.items())  # fmt: skip
    figure = Figure(figsize=(6, 3))
    ax = figure.add_subplot()
    values = [0.0 if math.isnan(analysis.dap[kind]) else analysis.dap[kind] for kind in ERROR_TYPES]
    ax.barh(list(ERROR_TYPES)[::-1], values[::-1], color="#c44e52")
    ax.set_xlabel(f"dAP@{analysis.fg_iou:g} (AP gained by fixing only that error type)")
    ax.set_title(f"TIDE errors, {analysis.iou_type}: AP@{analysis.fg_iou:g} {fmt(analysis.ap)}", fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    uri = save_figure(figure, ctx.plots_dir / f"tide_{analysis.iou_type}.png")
    present = [kind for kind in ERROR_TYPES if analysis.counts[kind]]
    named = ", ".join(present) if present else "none"
    return (f'<p>TIDE (Bolya et al., ECCV 2020), computed by the authors\' <code>tidecv</code>: AP@{analysis.fg_iou:g} '
            f'<b data-value="{analysis.ap!r}">{fmt(analysis.ap)}</b> (its own 101-point AP; classes with detections '
            f"but no objects count as 0). Foreground IoU {analysis.fg_iou:g}, background IoU {analysis.bg_iou:g}. "
            f'Error types found: <span class="errors-found">{named}</span>.</p>\n'
            f'<table class="tide" data-iou-type="{analysis.iou_type}"><thead><tr><th>error</th><th class="num">count'
            f'</th><th class="num">dAP</th><th>definition</th></tr></thead><tbody>{rows}</tbody></table>\n'
            f'<img class="plot" src="{uri}" alt="TIDE dAP per error type">\n'
            f'<h3>Special errors</h3><table><thead><tr><th>oracle</th><th class="num">dAP</th></tr></thead>'
            f"<tbody>{special}</tbody></table>"
            '<p class="muted">false positive: every false positive scored 0; false negative: every unmatched object '
            "removed. dAP is each oracle applied alone; - : undefined (the oracle leaves nothing to score).</p>")


# --- galleries -------------------------------------------------------------------------------------------------------


@dataclass
class _GalleryItem:
    case: ErrorCase
    box_xywh: list[float]  # the detection's box, or the missed object's
    category_id: int
    file_name: str
    other_category_id: int | None = None  # the object a cls / loc / dupe detection is about

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.case.kind, "image_id": self.case.image_id, "file_name": self.file_name,
                "detection": self.case.detection, "annotation_id": self.case.annotation_id, "score": self.case.score,
                "bbox": self.box_xywh, "category_id": self.category_id,
                "object_category_id": self.other_category_id}  # fmt: skip


def _collect_galleries(ctx: _Context, analysis: ErrorAnalysis, size: int) -> dict[str, list[_GalleryItem]]:
    """The highest-scoring false positives (of every error type) and the largest missed objects."""
    false_positives = sorted((c for c in analysis.cases if c.detection is not None), key=lambda c: -(c.score or 0.0))
    missed = [c for c in analysis.cases if c.kind == "miss"]
    missed.sort(key=lambda c: -float(ctx.gt.anns[c.annotation_id].get("area", 0.0)))
    galleries: dict[str, list[_GalleryItem]] = {"false_positives": [], "missed": []}
    for case in false_positives[:size]:
        det = ctx.detections[case.detection]  # the list the analysis was given
        target = ctx.gt.anns.get(case.annotation_id) if case.annotation_id is not None else None
        galleries["false_positives"].append(_GalleryItem(
            case, [float(v) for v in det["bbox"]], int(det["category_id"]), _file_name(ctx, case.image_id),
            None if target is None else int(target["category_id"])))  # fmt: skip
    for case in missed[:size]:
        ann = ctx.gt.anns[case.annotation_id]
        galleries["missed"].append(_GalleryItem(case, [float(v) for v in ann["bbox"]], int(ann["category_id"]),
                                                _file_name(ctx, case.image_id)))  # fmt: skip
    return galleries


def _file_name(ctx: _Context, image_id: int) -> str:
    return str(ctx.gt.imgs[image_id].get("file_name", ""))


def _gallery_section(
    ctx: _Context, galleries: dict[str, list[_GalleryItem]], images_dir: str | Path | None, score_threshold: float
) -> str:
    cat_ids = contiguous_category_ids(ctx.gt)
    names = [str(ctx.gt.cats[cat_id].get("name", cat_id)) for cat_id in cat_ids]
    label_of = {cat_id: i for i, cat_id in enumerate(cat_ids)}
    titles = {"false_positives": "Highest-scoring false positives", "missed": "Largest missed objects"}
    if images_dir is None:
        parts = ['<p class="note">The galleries need the images: give <code>--images DIR</code> to see these as '
                 "drawn crops.</p>"]  # fmt: skip
        for kind, items in galleries.items():
            rows = "".join(f"<tr><td>{item.case.kind}</td><td>{html.escape(names[label_of[item.category_id]])}</td>"
                           f"{number_cell(item.case.score)}{count_cell(item.case.image_id)}"
                           f"<td>{html.escape(item.file_name)}</td><td>{_box_text(item.box_xywh)}</td></tr>"
                           for item in items)  # fmt: skip
            parts.append(f"<h3>{titles[kind]}</h3><table class=\"sortable gallery\" data-kind=\"{kind}\"><thead><tr>"
                         '<th>error</th><th>class</th><th class="num">score</th><th class="num">image id</th>'
                         f"<th>file</th><th>box x, y, w, h</th></tr></thead><tbody>{rows}</tbody></table>")
        return "\n".join(parts)

    images_dir = Path(images_dir)
    linked: dict[int, str | None] = {}  # image id -> href of its drawn copy (None: unreadable)
    parts = [f'<p class="muted">Crops drawn with the ground truth (class name) and the detection (name and score); '
             f"click one for the whole image with every object and every detection scoring &ge; {score_threshold:g}."
             "</p>"]  # fmt: skip
    for kind, items in galleries.items():
        figures = []
        for item in items:
            image_id = item.case.image_id
            try:
                pixels = _load(images_dir, item.file_name)
            except ImageReadError as error:
                if image_id not in linked:
                    ctx.notes.append(f"Gallery: image id {image_id} left out ({error}).")
                linked[image_id] = None
                continue
            if image_id not in linked:
                linked[image_id] = _write_linked_image(ctx, pixels, image_id, names, label_of, score_threshold)
            crop = _draw_crop(ctx, pixels, item, names, label_of)
            caption = _caption(item, names, label_of)
            figures.append(f'<figure class="crop" data-kind="{item.case.kind}"><a href="{linked[image_id]}">'
                           f'<img src="{jpeg_uri(crop)}" alt="{html.escape(caption)}"></a>'
                           f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
        empty = '<p class="muted">None.</p>' if not items else ""
        parts.append(f'<h3>{titles[kind]}</h3>{empty}<div class="grid gallery" data-kind="{kind}">'
                     f"{''.join(figures)}</div>")  # fmt: skip
    return "\n".join(parts)


def _box_text(box_xywh: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in box_xywh)


def _load(images_dir: Path, file_name: str) -> np.ndarray:
    from cascade_rcnn.data.image_io import load_image

    if not file_name:
        raise ImageReadError("the annotation file gives no file name")
    return load_image(images_dir / file_name)


def _caption(item: _GalleryItem, names: list[str], label_of: dict[int, int]) -> str:
    name = names[label_of[item.category_id]]
    where = f"image {item.case.image_id}"
    if item.case.kind == "miss":
        _, _, w, h = item.box_xywh
        return f"missed: {name}, {w:.0f}x{h:.0f} px, {where}"
    other = None if item.other_category_id is None else names[label_of[item.other_category_id]]
    about = {"cls": f", the object is a {other}", "loc": f", IoU < 0.5 with the {other}",
             "dupe": f", the {other} was already found"}.get(item.case.kind, "")  # fmt: skip
    return f"{item.case.kind}: {name} {item.case.score:.2f}{about}, {where}"


def _xyxy(boxes_xywh: Sequence[Sequence[float]]) -> np.ndarray:
    boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _draw_crop(ctx: _Context, pixels: np.ndarray, item: _GalleryItem, names: list[str],
               label_of: dict[int, int]) -> Any:  # fmt: skip
    """The region around the item's box (half its size again on each side, at least 16 px), scaled so its longer
    side is `_CROP_SIDE`, with the image's objects in it drawn (a missed object: that object only) and the detection
    on top."""
    from PIL import Image

    from cascade_rcnn.evaluation.visualize import draw_detections

    height, width = pixels.shape[:2]
    x1, y1, x2, y2 = _xyxy([item.box_xywh])[0]
    mx, my = max(0.5 * (x2 - x1), 16.0), max(0.5 * (y2 - y1), 16.0)
    left, top = int(max(0, math.floor(x1 - mx))), int(max(0, math.floor(y1 - my)))
    right, bottom = int(min(width, math.ceil(x2 + mx))), int(min(height, math.ceil(y2 + my)))
    if right - left < 2 or bottom - top < 2:  # a box outside the image: show the whole image
        left, top, right, bottom = 0, 0, width, height
    scale = _CROP_SIDE / max(right - left, bottom - top)
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    crop = Image.fromarray(pixels[top:bottom, left:right]).resize(size, Image.Resampling.BILINEAR)
    offset = np.array([left, top, left, top], np.float64)

    def to_crop(boxes: np.ndarray) -> np.ndarray:
        return (boxes - offset) * scale

    if item.case.kind == "miss":
        anns = [ctx.gt.anns[item.case.annotation_id]]
    else:
        anns = [ann for ann in ctx.gt.imgToAnns.get(item.case.image_id, [])]
    boxes = _xyxy([ann["bbox"] for ann in anns])
    inside = (boxes[:, 2] > left) & (boxes[:, 0] < right) & (boxes[:, 3] > top) & (boxes[:, 1] < bottom)
    labels = np.array([label_of[ann["category_id"]] for ann in anns], np.int64)
    crop = draw_detections(crop, to_crop(boxes[inside]), None, labels[inside], names)
    if item.case.kind != "miss":
        crop = draw_detections(crop, to_crop(_xyxy([item.box_xywh])), [item.case.score],
                               [label_of[item.category_id]], names)  # fmt: skip
    return crop


def _write_linked_image(ctx: _Context, pixels: np.ndarray, image_id: int, names: list[str],
                        label_of: dict[int, int], score_threshold: float) -> str:  # fmt: skip
    """Draw the image's objects and its detections scoring >= `score_threshold` on it, write it (longer side at most
    `_LINKED_IMAGE_SIDE`) to report/images/<id>.jpg, and return its link relative to report.html."""
    from PIL import Image

    from cascade_rcnn.evaluation.visualize import draw_detections

    anns = ctx.gt.imgToAnns.get(image_id, [])
    drawn = draw_detections(pixels, _xyxy([a["bbox"] for a in anns]), None,
                            [label_of[a["category_id"]] for a in anns], names)  # fmt: skip
    dets = [det for det in ctx.detections if det["image_id"] == image_id and det["score"] >= score_threshold]
    drawn = draw_detections(drawn, _xyxy([d["bbox"] for d in dets]), [d["score"] for d in dets],
                            [label_of[d["category_id"]] for d in dets], names)  # fmt: skip
    scale = _LINKED_IMAGE_SIDE / max(drawn.size)
    if scale < 1.0:
        drawn = drawn.resize((max(1, round(drawn.width * scale)), max(1, round(drawn.height * scale))),
                             Image.Resampling.LANCZOS)  # fmt: skip
    path = ctx.plots_dir / "images" / f"{image_id}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn.save(path, format="JPEG", quality=88)
    return quote(path.relative_to(ctx.out_dir).as_posix())
