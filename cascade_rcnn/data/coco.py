"""COCO instances JSON: reading into a `DetectionDataset` and writing any dataset back as COCO JSON.

The file is parsed with `json` and validated entry by entry here rather than handed straight to
`pycocotools.coco.COCO`: pycocotools builds its index with no checks (a missing key is a bare KeyError on the first bad
entry, a duplicate id silently overwrites the earlier one), while a user needs every problem listed at once. The
output of `convert_to_coco` is plain COCO and loads in pycocotools (a test checks it).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cascade_rcnn.data.dataset import (
    DEFAULT_BOX_TOLERANCE,
    DetectionDataset,
    ImageRecord,
    OnError,
    check_box,
    check_image_size,
    check_on_error,
    finish,
    is_file,
    is_int,
    is_number,
    make_record,
    short_repr,
)
from cascade_rcnn.data.image_io import MAX_IMAGE_PIXELS, image_size
from cascade_rcnn.data.masks import check_segmentation, has_segmentation, segmentation_area
from cascade_rcnn.errors import CascadeRCNNError, DatasetError, ImageReadError


def load_coco(
    annotation_file: str | Path,
    image_root: str | Path,
    *,
    keep_empty: bool = True,
    on_error: OnError = "raise",
    check_files: bool = True,
    check_sizes: bool = False,
    box_tolerance: float = DEFAULT_BOX_TOLERANCE,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> DetectionDataset:
    """Read a COCO instances JSON file, validating every image, category and annotation first.

    Categories are mapped to contiguous labels 0..C-1 in ascending id order (COCO's 1..90 with gaps become 0..79), and
    `category_ids` keeps the original id of each label. Crowd annotations (``iscrowd: 1``, or mmdetection's
    ``ignore: 1``) are kept with ``iscrowd=True``: never ground truth in training (see `rpn.ignore_iof_thresh`). Boxes are converted from
    COCO's ``x, y, w, h`` to ``x1, y1, x2 = x + w, y2 = y + h``.

    Segmentations (polygons or RLE, see `cascade_rcnn.data.masks`) are kept as read in each record's `segmentations`
    when any annotation has one, and checked against the image size: a malformed polygon or RLE is a problem, and so
    is a non-crowd annotation without a segmentation in a file whose other annotations have them. A file with no
    segmentation anywhere (``[]`` or absent) is box-only: its records' `segmentations` are None.

    Args:
        annotation_file: the instances JSON.
        image_root: the folder that the images' ``file_name``s are relative to.
        keep_empty: keep images without any annotation as negatives (True, the default: they teach the detector what
            is not an object). False drops every image without a non-crowd box.
        on_error: "raise" (every problem in one `DatasetError`) or "skip" (leave bad entries out, list them in the
            returned dataset's `problems`); see `cascade_rcnn.data.dataset`.
        check_files: report images whose file does not exist under `image_root`.
        check_sizes: also read each image header and report a width/height differing from the JSON (catches EXIF
            rotation and wrong files; costs one header read per image).
        box_tolerance: pixels a box may overshoot the image before it is reported (default: any; boxes partly
            outside are clipped to it, as mmdetection does).
        max_pixels: report images above this size (they would be refused when decoded); None: no limit.

    Raises:
        DatasetError: with every problem found (on_error="raise"), or when the file cannot be read at all.
    """
    check_on_error(on_error)
    annotation_file = Path(annotation_file)
    image_root = Path(image_root)
    source = str(annotation_file)
    data = _read_json(annotation_file)

    problems: list[str] = []
    fatal = []
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: top level is a {type(data).__name__}, expected a JSON object")
    for key in ("images", "categories"):
        if key not in data:
            fatal.append(f"{source}: no '{key}' list")
        elif not isinstance(data[key], list):
            fatal.append(f"{source}: '{key}' is a {type(data[key]).__name__}, expected a list")
    annotations = data.get("annotations", [])  # image-info files (test sets) have none: all images are negatives
    if not isinstance(annotations, list):
        fatal.append(f"{source}: 'annotations' is a {type(annotations).__name__}, expected a list")
    if fatal:
        raise DatasetError(f"{source}: not a COCO instances file", fatal)

    # Categories: contiguous labels by ascending id.
    category_names: dict[int, str] = {}
    for index, category in enumerate(data["categories"]):
        where = f"{source}: categories[{index}]"
        if not isinstance(category, dict):
            problems.append(f"{where}: is a {type(category).__name__}, expected an object")
            continue
        cat_id, name = category.get("id"), category.get("name")
        if not is_int(cat_id):
            problems.append(f"{where}: 'id' is {cat_id!r}, expected an integer")
            continue
        where = f"{source}: category id {cat_id}"
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: 'name' is {name!r}, expected a non-empty string")
            continue
        if cat_id in category_names:
            problems.append(f"{where}: duplicate category id (names {category_names[cat_id]!r} and {name!r})")
            continue
        category_names[cat_id] = name
    category_ids = tuple(sorted(category_names))
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids)}

    # Images: ids unique, files present, sizes sane. A duplicated id makes its annotations ambiguous, so every entry
    # with that id is rejected, not just the later ones.
    id_counts = Counter(img.get("id") for img in data["images"] if isinstance(img, dict) and is_int(img.get("id")))
    images: dict[int, dict[str, Any]] = {}
    order: list[int] = []
    reported_duplicates: set[int] = set()
    for index, image in enumerate(data["images"]):
        where = f"{source}: images[{index}]"
        if not isinstance(image, dict):
            problems.append(f"{where}: is a {type(image).__name__}, expected an object")
            continue
        image_id = image.get("id")
        if not is_int(image_id):
            problems.append(f"{where}: 'id' is {image_id!r}, expected an integer")
            continue
        if not -(2**63) <= image_id < 2**63:  # it becomes an int64 tensor in training
            problems.append(f"{where}: 'id' {short_repr(image_id)} does not fit in a 64-bit integer")
            continue
        file_name = image.get("file_name")
        where = f"{source}: image id {image_id}" + (f" ({file_name})" if isinstance(file_name, str) else "")
        if id_counts[image_id] > 1:
            if image_id not in reported_duplicates:
                problems.append(f"{where}: duplicate image id ({id_counts[image_id]} entries)")
                reported_duplicates.add(image_id)
            continue
        image_problem = _check_image_entry(image, image_root, check_files, check_sizes, max_pixels)
        if image_problem:
            problems.append(f"{where}: {image_problem}")
            continue
        images[image_id] = image
        order.append(image_id)

    # Annotations.
    boxes: dict[int, list[np.ndarray]] = defaultdict(list)
    labels: dict[int, list[int]] = defaultdict(list)
    crowd: dict[int, list[bool]] = defaultdict(list)
    segmentations: dict[int, list[Any]] = defaultdict(list)
    # Masks are all or nothing. Box-only files (exporters write "segmentation": [] everywhere) load as before; in a
    # file with masks, a non-crowd object without one is a problem: mask training would take it for background.
    # A non-empty list or dict shows the intent; other types are reported below, not taken for it.
    file_has_masks = any(
        isinstance(ann, dict) and isinstance(ann.get("segmentation"), (list, dict)) and ann["segmentation"]
        for ann in annotations
    )
    annotated: set[int] = set()  # images with at least one annotation in the file, valid or not
    known_image_ids = set(id_counts)
    seen_annotation_ids: set[int] = set()
    for index, ann in enumerate(annotations):
        where = f"{source}: annotations[{index}]"
        if not isinstance(ann, dict):
            problems.append(f"{where}: is a {type(ann).__name__}, expected an object")
            continue
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        if is_int(ann_id):
            where = f"{source}: annotation id {ann_id}"
        if is_int(image_id):
            where += f" (image id {image_id})"
            annotated.add(image_id)
        if not is_int(ann_id):
            problems.append(f"{where}: 'id' is {ann_id!r}, expected an integer")
            continue
        if ann_id in seen_annotation_ids:
            problems.append(f"{where}: duplicate annotation id")
            continue
        seen_annotation_ids.add(ann_id)
        if not is_int(image_id):
            problems.append(f"{where}: 'image_id' is {image_id!r}, expected an integer")
            continue
        if image_id not in known_image_ids:
            problems.append(f"{where}: refers to an image id that is not in 'images'")
            continue
        category_id = ann.get("category_id")
        if not is_int(category_id):
            problems.append(f"{where}: 'category_id' is {category_id!r}, expected an integer")
            continue
        if category_id not in label_of:
            problems.append(f"{where}: unknown category id {category_id}")
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            problems.append(f"{where}: 'bbox' is {short_repr(bbox)}, expected [x, y, width, height] numbers")
            continue
        is_crowd = ann.get("iscrowd", 0)
        ignore = ann.get("ignore", 0)
        if is_crowd not in (0, 1) or ignore not in (0, 1):  # also admits True/False
            problems.append(f"{where}: 'iscrowd'/'ignore' is {is_crowd!r}/{ignore!r}, expected 0 or 1")
            continue
        if image_id not in images:
            continue  # the image itself was rejected above and already reported
        image = images[image_id]
        x, y, w, h = bbox  # not float() here: check_box turns an out-of-range JSON integer into a problem
        try:
            corners = (x, y, x + w, y + h)
        except OverflowError:  # an integer beyond float range plus a float: as non-finite as it gets
            corners = (float("inf"),) * 4
        box, reason = check_box(corners, image["width"], image["height"], box_tolerance)
        if box is None:
            problems.append(f"{where}: {reason} (COCO bbox {short_repr(bbox)})")
            continue
        segmentation = ann.get("segmentation")
        reason = check_segmentation(segmentation, image["height"], image["width"])
        if reason is None and file_has_masks and not has_segmentation(segmentation) and not (is_crowd or ignore):
            reason = "has no 'segmentation' but the file's other annotations have masks"
        if reason:
            problems.append(f"{where}: {reason}")
            continue
        boxes[image_id].append(box)
        labels[image_id].append(label_of[category_id])
        crowd[image_id].append(bool(is_crowd) or bool(ignore))
        segmentations[image_id].append(segmentation if has_segmentation(segmentation) else None)

    records: list[ImageRecord] = []
    for image_id in order:
        image = images[image_id]
        if image_id in annotated and not boxes[image_id]:
            continue  # every annotation of this image was bad: not a true negative (reported above)
        if not keep_empty and not any(not c for c in crowd[image_id]):
            continue
        records.append(
            make_record(
                image["file_name"], image_id, image["width"], image["height"],
                boxes[image_id], labels[image_id], crowd[image_id],
                segmentations[image_id] if file_has_masks else None,
            )
        )  # fmt: skip
    dataset = DetectionDataset(
        image_root=image_root,
        records=records,
        class_names=tuple(category_names[c] for c in category_ids),
        category_ids=category_ids,
    )
    return finish(dataset, problems, on_error, source)


def convert_to_coco(dataset: DetectionDataset) -> dict[str, Any]:
    """A COCO instances dict (``images``, ``annotations``, ``categories``) of any `DetectionDataset`.

    Boxes are written as ``[x1, y1, x2 - x1, y2 - y1]``, ``segmentation`` as the record has it (``[]`` for a box
    without one), ``area`` is the mask's pixel count where there is a segmentation (COCO's meaning, which its
    evaluation uses for the small/medium/large ranges) and the box area otherwise, and ``iscrowd`` carries the ignore
    flag. Category ids are the dataset's `category_ids`; annotation ids run 1..N.
    Images of unknown size have it read from the image header. The dict is JSON-serialisable as is.
    """
    images, annotations = [], []
    for record in dataset.records:
        width, height = record.width, record.height
        if width is None or height is None:
            try:
                width, height = image_size(dataset.image_root / record.file_name)
            except ImageReadError as error:
                raise DatasetError(
                    f"cannot write COCO JSON: size of image id {record.image_id} unknown ({error})"
                ) from None
        images.append({"id": int(record.image_id), "file_name": record.file_name, "width": width, "height": height})
        segmentations = record.segmentations or [None] * len(record.boxes)
        for box, label, is_crowd, segmentation in zip(
            record.boxes.tolist(), record.labels.tolist(), record.iscrowd.tolist(), segmentations
        ):
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(record.image_id),
                    "category_id": dataset.category_ids[label],
                    "bbox": [x1, y1, w, h],
                    "area": segmentation_area(segmentation, height, width) if segmentation is not None else w * h,
                    "iscrowd": int(is_crowd),
                    "segmentation": segmentation if segmentation is not None else [],
                }
            )
    categories = [
        {"id": cat_id, "name": name, "supercategory": ""}
        for cat_id, name in zip(dataset.category_ids, dataset.class_names)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(dataset: DetectionDataset, path: str | Path) -> Path:
    """Write `convert_to_coco(dataset)` to `path` (via a temporary file and rename, so no half-written JSON)."""
    path = Path(path)
    text = json.dumps(convert_to_coco(dataset), allow_nan=False)
    temporary = path.with_name(path.name + ".tmp")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as error:  # mkdir's word for "a file is in the way"
            raise NotADirectoryError(error.errno, f"{error.filename} is a file, not a folder") from None
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    except OSError as error:  # a folder at `path`, a file where a folder should be, a full disk, a name too long
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise CascadeRCNNError(f"{path}: cannot write the COCO JSON ({error.strerror or error})") from None
    return path


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such annotation file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read annotation file ({error})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path}: line {error.lineno} column {error.colno}: invalid JSON ({error.msg}); is the file truncated?"
        ) from None
    except RecursionError:
        raise DatasetError(f"{path}: invalid JSON (nested too deeply)") from None


def _check_image_entry(
    image: dict[str, Any], image_root: Path, check_files: bool, check_sizes: bool, max_pixels: int | None
) -> str | None:
    """Reason an `images` entry is unusable, or None."""
    file_name, width, height = image.get("file_name"), image.get("width"), image.get("height")
    if not isinstance(file_name, str) or not file_name:
        return f"'file_name' is {file_name!r}, expected a non-empty string"
    if not (is_int(width) and is_int(height)):
        return f"'width'/'height' are {width!r}/{height!r}, expected integers"
    size_problem = check_image_size(width, height, max_pixels)
    if size_problem:
        return size_problem
    path = image_root / file_name
    if check_files and not is_file(path):
        return f"image file {path} not found"
    if check_sizes:
        try:
            actual = image_size(path)
        except ImageReadError as error:
            return str(error)
        if actual != (width, height):
            return f"the JSON says {width}x{height} but the image is {actual[0]}x{actual[1]} (after EXIF orientation)"
    return None


__all__ = ["convert_to_coco", "load_coco", "write_coco"]
