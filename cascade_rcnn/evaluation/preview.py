"""`data preview`: look at a dataset's labels before training on them.

`write_preview` writes, into an output folder, `preview.html` (self-contained: plots and thumbnails embedded; the
whole drawn images the thumbnails link to lie beside it in `preview/images/`), `preview.json` with the same numbers,
and the plots as PNG files in `preview/`:

- a gallery of images, evenly spread over the dataset, with their ground truth drawn (boxes, class names, and
  instance masks where the dataset has them) by `evaluation.visualize.draw_detections`;
- per-class counts (boxes, crowd / ignore boxes, images with the class) as a sortable table and a bar chart;
- box-size histograms: sqrt(area) with COCO's small / medium / large limits (32 and 96 pixels), width and height, and
  aspect ratio (log2 of width / height);
- the problems the loader left out (`on_error="skip"`), one line each.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from cascade_rcnn.data.dataset import DetectionDataset
from cascade_rcnn.errors import ImageReadError
from cascade_rcnn.evaluation.report import count_cell, html_page, jpeg_uri, safe_name, save_figure

MAX_IMAGES = 48
_THUMB_SIDE = 320  # pixels, the longer side of a gallery thumbnail
_LINKED_IMAGE_SIDE = 1280
# COCO's area limits (pixels squared): small < 32^2 <= medium < 96^2 <= large.
_COCO_SIZES = (32.0, 96.0)


def write_preview(dataset: DetectionDataset, out_dir: str | Path, *, max_images: int = MAX_IMAGES,
                  source: str = "") -> Path:  # fmt: skip
    """Write `preview.html`, `preview.json` and `preview/*.png` into `out_dir`; returns the path of `preview.html`.

    Args:
        dataset: any loaded dataset (`cascade_rcnn.data.load_dataset`); its `problems` are listed on the page.
        max_images: images in the gallery, taken evenly over the dataset's order (all when it has fewer).
        source: what the page calls the dataset (e.g. the annotation path).
    """
    out_dir = Path(out_dir)
    files_dir = out_dir / "preview"
    files_dir.mkdir(parents=True, exist_ok=True)
    names = list(dataset.class_names)
    counts = _class_counts(dataset)
    sizes = _box_sizes(dataset)
    notes: list[str] = []

    gallery = _gallery(dataset, out_dir, files_dir, max_images, notes)
    counts_uri = _counts_plot(names, counts, files_dir / "class_counts.png")
    sizes_uri, histograms = _size_plots(sizes, files_dir / "box_sizes.png")

    num_boxes = int(sum(row["boxes"] for row in counts))
    negatives = sum(1 for record in dataset.records if len(record.boxes) == 0)
    rows = "".join(f'<tr data-class="{html.escape(row["name"])}"><td>{html.escape(row["name"])}</td>'
                   f"{count_cell(row['category_id'])}{count_cell(row['boxes'])}{count_cell(row['crowd'])}"
                   f"{count_cell(row['images'])}</tr>" for row in counts)  # fmt: skip
    small, medium, large = (int(v) for v in histograms["coco_sizes"])
    problems = "".join(f"<li>{html.escape(problem)}</li>" for problem in dataset.problems)
    body = (f"<h1>Dataset preview</h1>\n<p class=\"muted\"><code>{html.escape(source)}</code> &middot; "
            f'<span id="num-images">{len(dataset)}</span> images ({negatives} without boxes) &middot; '
            f'<span id="num-boxes">{num_boxes}</span> boxes &middot; {len(names)} classes</p>\n'
            + "".join(f'<p class="note">{html.escape(note)}</p>\n' for note in notes)
            + ('<nav><a href="#classes">Classes</a><a href="#sizes">Box sizes</a><a href="#gallery">Gallery</a>'
               '<a href="#problems">Problems</a></nav>\n')
            + f'<section id="classes"><h2>Classes</h2><table class="sortable" id="class-counts"><thead><tr>'
            '<th>class</th><th class="num">id</th><th class="num">boxes</th><th class="num">crowd / ignore</th>'
            f'<th class="num">images</th></tr></thead><tbody>{rows}</tbody></table>\n'
            f'<img class="plot" src="{counts_uri}" alt="boxes per class"></section>\n'
            f'<section id="sizes"><h2>Box sizes</h2><p>COCO size ranges: {small} small (&lt; 32&sup2; px), {medium} '
            f'medium, {large} large (&ge; 96&sup2; px).</p>\n<img class="plot" src="{sizes_uri}" alt="box sizes">'
            "</section>\n"
            f'<section id="gallery"><h2>Gallery</h2><p class="muted">{len(gallery)} of {len(dataset)} images, evenly '
            "spread; click one for the whole image.</p>\n<div class=\"grid\">"
            + "".join(item["html"] for item in gallery) + "</div></section>\n"
            + '<section id="problems"><h2>Problems</h2>'
            + (f"<ul>{problems}</ul>" if problems else '<p class="muted">None: every box and image loaded.</p>')
            + "</section>")  # fmt: skip
    path = out_dir / "preview.html"
    path.write_text(html_page("Dataset preview", body), encoding="utf-8")
    summary = {"source": source, "num_images": len(dataset), "images_without_boxes": negatives,
               "num_boxes": num_boxes, "classes": counts, "box_sizes": histograms, "problems": dataset.problems,
               "notes": notes, "gallery": [{k: v for k, v in item.items() if k != "html"} for item in gallery],
               "plots": sorted(str(p.relative_to(out_dir)) for p in files_dir.glob("*.png"))}  # fmt: skip
    (out_dir / "preview.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return path


def _class_counts(dataset: DetectionDataset) -> list[dict[str, Any]]:
    boxes = np.zeros(dataset.num_classes, np.int64)
    crowd = np.zeros(dataset.num_classes, np.int64)
    images = np.zeros(dataset.num_classes, np.int64)
    for record in dataset.records:
        np.add.at(boxes, record.labels, 1)
        np.add.at(crowd, record.labels[record.iscrowd], 1)
        images[np.unique(record.labels)] += 1
    pairs = enumerate(zip(dataset.class_names, dataset.category_ids, strict=True))
    return [{"name": name, "category_id": cat_id, "boxes": int(boxes[i]), "crowd": int(crowd[i]),
             "images": int(images[i])} for i, (name, cat_id) in pairs]  # fmt: skip


def _box_sizes(dataset: DetectionDataset) -> np.ndarray:
    """(N, 2) width and height of every box, in pixels."""
    sizes = [record.boxes[:, 2:] - record.boxes[:, :2] for record in dataset.records]
    return np.concatenate(sizes).astype(np.float64) if sizes else np.zeros((0, 2))


def _counts_plot(names: list[str], counts: list[dict[str, Any]], path: Path) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(5.0, 0.22 * len(names) + 2.0), 3.6))
    ax = figure.add_subplot()
    ax.bar(range(len(names)), [row["boxes"] for row in counts], color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8 if len(names) <= 40 else 6)
    ax.set_ylabel("boxes")
    ax.set_title("boxes per class")
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(figure, path)


def _size_plots(sizes: np.ndarray, path: Path) -> tuple[str, dict[str, Any]]:
    """Four histograms on one figure; returns its data URI and the histograms (bin edges and counts)."""
    from matplotlib.figure import Figure

    width, height = sizes[:, 0], sizes[:, 1]
    side = np.sqrt(width * height)
    aspect = np.log2(np.maximum(width, 1e-6) / np.maximum(height, 1e-6))
    coco_sizes = np.histogram(side, bins=[0.0, *_COCO_SIZES, np.inf])[0]
    top = max(float(max(side.max(), width.max(), height.max())) if len(side) else 1.0, 1.0)
    pixel_bins = np.geomspace(1.0, top * 1.05 + 1.0, 31)
    histograms: dict[str, Any] = {"coco_sizes": coco_sizes.tolist()}
    figure = Figure(figsize=(11, 6.5))
    axes = figure.subplots(2, 2)
    for ax, (key, values, bins, label) in zip(axes.flat, (
        ("sqrt_area", side, pixel_bins, "sqrt(area), pixels"),
        ("width", width, pixel_bins, "width, pixels"),
        ("height", height, pixel_bins, "height, pixels"),
        ("log2_aspect", aspect, np.linspace(-4.0, 4.0, 33), "log2(width / height)"),
    ), strict=True):  # fmt: skip
        counts, edges = np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins)
        histograms[key] = {"edges": np.round(edges, 3).tolist(), "counts": counts.tolist()}
        ax.stairs(counts, edges, fill=True, color="#55a868")
        if key != "log2_aspect":
            ax.set_xscale("log")
        if key == "sqrt_area":
            for limit in _COCO_SIZES:
                ax.axvline(limit, color="#c44e52", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("boxes")
        ax.grid(True, alpha=0.3)
    figure.suptitle(f"box sizes ({len(sizes)} boxes; dashed: COCO's small / medium / large limits)")
    figure.tight_layout()
    return save_figure(figure, path), histograms


def _gallery(dataset: DetectionDataset, out_dir: Path, files_dir: Path, max_images: int,
             notes: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    from PIL import Image

    from cascade_rcnn.data.image_io import load_image
    from cascade_rcnn.evaluation.visualize import draw_detections

    if not len(dataset) or max_images < 1:
        return []
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(max_images, len(dataset))).round().astype(int))
    names = list(dataset.class_names)
    items = []
    for index in picks.tolist():
        record = dataset.records[index]
        try:
            pixels = load_image(dataset.image_path(index))
        except ImageReadError as error:
            notes.append(f"Gallery: {error}")
            continue
        masks = _masks(record, pixels.shape[0], pixels.shape[1], notes)
        drawn = draw_detections(pixels, record.boxes, None, record.labels, names, masks=masks)
        linked = _fit(drawn, _LINKED_IMAGE_SIDE)
        path = files_dir / "images" / f"{record.image_id}_{safe_name(Path(record.file_name).stem)}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        linked.save(path, format="JPEG", quality=88)
        thumb = _fit(drawn, _THUMB_SIDE, Image.Resampling.BILINEAR)
        caption = f"{record.file_name} ({len(record.boxes)} boxes)"
        href = quote(path.relative_to(out_dir).as_posix())
        items.append({"image_id": record.image_id, "file_name": record.file_name, "boxes": len(record.boxes),
                      "drawn": str(path.relative_to(out_dir)),
                      "html": f'<figure><a href="{href}"><img src="{jpeg_uri(thumb)}" alt="{html.escape(caption)}">'
                              f"</a><figcaption>{html.escape(caption)}</figcaption></figure>"})  # fmt: skip
    return items


def _masks(record: Any, height: int, width: int, notes: list[str]) -> np.ndarray | None:
    """The record's instance masks (N, H, W) bool when it has segmentations, else None (boxes only)."""
    if not record.segmentations or all(s is None for s in record.segmentations):
        return None
    from cascade_rcnn.data.masks import record_masks

    try:
        return record_masks(record, height, width).astype(bool)
    except (ValueError, TypeError) as error:  # a mask the loader let through but cannot be drawn: boxes only
        notes.append(f"Gallery: {record.file_name}: masks not drawn ({error})")
        return None


def _fit(image: Any, side: int, resample: Any = None) -> Any:
    from PIL import Image

    scale = side / max(image.size)
    if scale >= 1.0:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample or Image.Resampling.LANCZOS)
