"""YOLO txt folders (Ultralytics layout): one ``<stem>.txt`` per image, lines ``cls cx cy w h`` normalised to 0..1.

The label folder mirrors the image folder: ``images/a/b.jpg`` is labelled by ``labels/a/b.txt``. An image without a
label file, or with an empty one, is a negative. Segment lines (``cls x1 y1 x2 y2 x3 y3 ...``, an Ultralytics
segmentation label) are read as the tight box of their polygon. Normalised coordinates are relative to the image as
a viewer shows it (EXIF orientation applied), as Ultralytics writes them; the size comes from the image header only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cascade_rcnn.data.dataset import (
    DEFAULT_BOX_TOLERANCE,
    DetectionDataset,
    ImageRecord,
    OnError,
    assign_image_ids,
    check_box,
    check_image_size,
    check_on_error,
    finish,
    make_record,
    read_class_names,
)
from cascade_rcnn.data.image_io import MAX_IMAGE_PIXELS, image_size
from cascade_rcnn.errors import DatasetError, ImageReadError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


def load_yolo(
    image_dir: str | Path,
    label_dir: str | Path,
    names: str | Path | Sequence[str],
    *,
    keep_empty: bool = True,
    on_error: OnError = "raise",
    box_tolerance: float = DEFAULT_BOX_TOLERANCE,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> DetectionDataset:
    """Read a YOLO-format dataset, validating every label line first.

    Args:
        image_dir: folder of images (searched recursively; suffixes in `IMAGE_SUFFIXES`).
        label_dir: folder of ``.txt`` label files mirroring `image_dir` (may be the same folder).
        names: class names in index order: a sequence, a text file with one name per line, or a data.yaml with a
            ``names`` list or {index: name} mapping.
        keep_empty: keep images without boxes as negatives (default); False drops them.
        on_error, box_tolerance, max_pixels: as in `load_coco`.

    Image ids are the stems' integers when all stems are distinct integers (COCO file names), else 1..N in sorted
    file-name order. Labels are the YOLO class indices; category ids are 1..C.

    Raises:
        DatasetError: every problem found (on_error="raise"), or a folder / the names cannot be read.
    """
    check_on_error(on_error)
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for folder, what in ((image_dir, "image"), (label_dir, "label")):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: {what} folder not found")
    class_names = read_class_names(names)
    problems: list[str] = []

    image_paths = sorted(
        (p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(image_dir).as_posix(),
    )
    file_names = [p.relative_to(image_dir).as_posix() for p in image_paths]
    expected_labels = {(label_dir / name).with_suffix(".txt") for name in file_names}
    for label_path in sorted(label_dir.rglob("*.txt")):
        if label_path not in expected_labels:
            problems.append(f"{label_path}: label file has no image in {image_dir}")

    records: list[ImageRecord] = []
    for image_path, file_name, image_id in zip(image_paths, file_names, assign_image_ids(file_names)):
        try:
            width, height = image_size(image_path)
        except ImageReadError as error:
            problems.append(str(error))
            continue
        size_problem = check_image_size(width, height, max_pixels)
        if size_problem:
            problems.append(f"{image_path}: {size_problem}")
            continue
        label_path = (label_dir / file_name).with_suffix(".txt")
        boxes, labels, had_lines = _read_label_file(
            label_path, width, height, len(class_names), box_tolerance, problems
        )
        if had_lines and not boxes:
            continue  # every line was bad: not a true negative (reported)
        if not boxes and not keep_empty:
            continue
        records.append(make_record(file_name, image_id, width, height, boxes, labels, [False] * len(boxes)))

    dataset = DetectionDataset(
        image_root=image_dir,
        records=records,
        class_names=class_names,
        category_ids=tuple(range(1, len(class_names) + 1)),
    )
    return finish(dataset, problems, on_error, str(label_dir))


def _read_label_file(
    path: Path, width: int, height: int, num_classes: int, box_tolerance: float, problems: list[str]
) -> tuple[list[np.ndarray], list[int], bool]:
    """Boxes and labels of one label file (absent: none); appends its problems. Returns (boxes, labels, had_lines)."""
    if not path.is_file():
        return [], [], False
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"{path}: cannot read label file ({error})")
        return [], [], True
    boxes, labels = [], []
    had_lines = False
    for line_number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        had_lines = True
        where = f"{path}: line {line_number}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            problems.append(
                f"{where}: expected 5 fields 'cls cx cy w h' (or a polygon 'cls x1 y1 x2 y2 x3 y3 ...'), "
                f"got {len(fields)}: {line.strip()[:80]!r}"
            )
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.append(f"{where}: not all fields are numbers: {line.strip()[:80]!r}")
            continue
        cls = values[0]
        if not (math.isfinite(cls) and cls.is_integer()):
            problems.append(f"{where}: class {fields[0]!r} is not an integer")
            continue
        if not 0 <= cls < num_classes:
            problems.append(f"{where}: unknown class {int(cls)} (the names list has {num_classes} classes)")
            continue
        if len(fields) == 5:
            cx, cy, w, h = values[1:]
            normalised = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        else:
            xs, ys = values[1::2], values[2::2]
            normalised = (min(xs), min(ys), max(xs), max(ys))
        pixels = (normalised[0] * width, normalised[1] * height, normalised[2] * width, normalised[3] * height)
        box, reason = check_box(pixels, width, height, box_tolerance)
        if box is None:
            problems.append(f"{where}: {reason} (normalised {' '.join(fields[1:5])})")
            continue
        boxes.append(box)
        labels.append(int(cls))
    return boxes, labels, had_lines
