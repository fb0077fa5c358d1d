"""The seed's own txt format (MindSpore Cascade R-CNN ``anno_parser``): one image per line,

    <file_name> x1,y1,x2,y2,label,iscrowd x1,y1,x2,y2,label,iscrowd ...

fields separated by single spaces (so file names cannot contain spaces), boxes in absolute ``xyxy`` pixels. The seed
writes integers; floats are accepted too. Labels follow the seed's convention of a background class at 0, so object
labels start at 1 (`label_base=1`); pass `label_base=0` for files that count classes from 0. The seed's placeholder
box for an image without objects, ``0,0,0,0,0,1``, is read as "no box" (a negative). Class names are given separately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

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

# The seed writes this box for an image without annotations (label 0 = background, flagged crowd so it is ignored).
_SEED_EMPTY_PLACEHOLDER = (0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def load_txt(
    annotation_file: str | Path,
    image_root: str | Path,
    class_names: str | Path | Sequence[str],
    *,
    label_base: int = 1,
    keep_empty: bool = True,
    on_error: OnError = "raise",
    box_tolerance: float = DEFAULT_BOX_TOLERANCE,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> DetectionDataset:
    """Read a seed-format txt annotation file, validating every line and box first.

    Args:
        annotation_file: the txt file.
        image_root: the folder the file names are relative to.
        class_names: the object classes in label order (background not included): a sequence or a names file.
        label_base: the file's label of the first class (1 in the seed's convention, 0 = background).
        keep_empty: keep images without boxes as negatives (default); False drops images without a non-crowd box.
        on_error, box_tolerance, max_pixels: as in `load_coco`.

    Image sizes are read from the image headers. Image ids are the stems' integers when all stems are distinct
    integers, else 1..N in line order. Category ids are 1..C.

    Raises:
        DatasetError: every problem found (on_error="raise"), or the file cannot be read.
    """
    check_on_error(on_error)
    annotation_file, image_root = Path(annotation_file), Path(image_root)
    names = read_class_names(class_names)
    try:
        lines = annotation_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{annotation_file}: no such annotation file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{annotation_file}: cannot read annotation file ({error})") from None

    problems: list[str] = []
    entries = []  # (file_name, image_id, width, height, boxes, labels, crowd)
    first_line: dict[str, int] = {}
    # Ids from every listed image, before any is skipped, so an image keeps its id whether or not others are bad.
    listed = list(dict.fromkeys(line.split()[0] for line in lines if line.strip()))
    id_of = dict(zip(listed, assign_image_ids(listed)))
    for line_number, line in enumerate(lines, 1):
        tokens = line.strip().split()
        if not tokens:
            continue
        file_name = tokens[0]
        where = f"{annotation_file}: line {line_number} ({file_name})"
        if file_name in first_line:
            problems.append(f"{where}: duplicate image (first on line {first_line[file_name]})")
            continue
        first_line[file_name] = line_number
        image_path = image_root / file_name
        try:
            width, height = image_size(image_path)
        except ImageReadError as error:
            problems.append(f"{where}: {error}")
            continue
        size_problem = check_image_size(width, height, max_pixels)
        if size_problem:
            problems.append(f"{where}: {size_problem}")
            continue
        boxes, labels, crowd = [], [], []
        had_boxes = False
        for box_number, token in enumerate(tokens[1:], 1):
            box_where = f"{where}: box {box_number}"
            parts = token.split(",")
            try:
                values: tuple[float, ...] | None = tuple(float(v) for v in parts)
            except ValueError:
                values = None
            if values == _SEED_EMPTY_PLACEHOLDER:
                continue
            had_boxes = True
            if values is None:
                problems.append(f"{box_where}: {token!r} is not 6 comma-separated numbers x1,y1,x2,y2,label,iscrowd")
                continue
            if len(values) != 6:
                problems.append(
                    f"{box_where}: {token!r} has {len(values)} fields, expected 6 (x1,y1,x2,y2,label,iscrowd)"
                )
                continue
            label, is_crowd = values[4], values[5]
            if not (math.isfinite(label) and label.is_integer()):
                problems.append(f"{box_where}: label {parts[4]!r} is not an integer")
                continue
            if not 0 <= label - label_base < len(names):
                problems.append(
                    f"{box_where}: unknown label {int(label)} (classes are {label_base}..{label_base + len(names) - 1})"
                )
                continue
            if is_crowd not in (0.0, 1.0):
                problems.append(f"{box_where}: iscrowd {parts[5]!r} is not 0 or 1")
                continue
            box, reason = check_box(values[:4], width, height, box_tolerance)
            if box is None:
                problems.append(f"{box_where}: {reason}")
                continue
            boxes.append(box)
            labels.append(int(label) - label_base)
            crowd.append(is_crowd == 1.0)
        if had_boxes and not boxes:
            continue  # every box was bad: not a true negative (reported)
        if not keep_empty and all(crowd):
            continue
        entries.append((file_name, id_of[file_name], width, height, boxes, labels, crowd))

    records: list[ImageRecord] = [make_record(*entry) for entry in entries]
    dataset = DetectionDataset(
        image_root=image_root, records=records, class_names=names, category_ids=tuple(range(1, len(names) + 1))
    )
    return finish(dataset, problems, on_error, str(annotation_file))
