"""Pascal VOC XML folders: ``Annotations/*.xml`` plus ``JPEGImages/``, optionally restricted by a split file.

Coordinates: VOC boxes are 1-based inclusive pixel indices (``xmin=1`` is the first pixel column, ``xmax=W`` the last).
In this project's 0-based continuous frame a pixel i spans [i, i+1), so a VOC box becomes
``(xmin - 1, ymin - 1, xmax, ymax)``, as torchvision/mmdetection do it. `difficult` objects are kept as ignore regions
(``iscrowd=True``): VOC evaluation neither rewards nor penalises detections on them.

XML is parsed with the standard library's expat, which (expat >= 2.4.1, bundled since Python 3.10) limits entity
expansion, so a "billion laughs" file fails with a parse error instead of exhausting memory.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cascade_rcnn.data.dataset import (
    DEFAULT_BOX_TOLERANCE,
    DetectionDataset,
    OnError,
    assign_image_ids,
    check_box,
    check_image_size,
    check_on_error,
    is_file,
    finish,
    make_record,
    read_class_names,
)
from cascade_rcnn.data.image_io import MAX_IMAGE_PIXELS, image_size
from cascade_rcnn.errors import DatasetError, ImageReadError


@dataclass
class _ParsedImage:
    """One XML file after parsing, before class names are mapped to labels."""

    file_name: str
    width: int
    height: int
    objects: list[tuple[str, np.ndarray, bool, str]] = field(default_factory=list)  # name, box, difficult, where
    had_objects: bool = False


def load_voc(
    annotation_dir: str | Path,
    image_dir: str | Path,
    *,
    split_file: str | Path | None = None,
    class_names: str | Path | Sequence[str] | None = None,
    keep_empty: bool = True,
    on_error: OnError = "raise",
    check_sizes: bool = False,
    box_tolerance: float = DEFAULT_BOX_TOLERANCE,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> DetectionDataset:
    """Read a Pascal VOC annotation folder, validating every file and object first.

    Args:
        annotation_dir: the ``Annotations`` folder of ``<stem>.xml`` files.
        image_dir: the ``JPEGImages`` folder; each XML's ``<filename>`` (or ``<stem>.jpg`` when absent) is in it.
        split_file: an ``ImageSets/Main/<split>.txt`` listing the stems to load, one per line; None: every XML file.
        class_names: the classes, in label order (a sequence or a names file); an object of another class is a
            problem. None: the names found in the files, sorted.
        keep_empty: keep images without objects as negatives; False drops images without a non-difficult object.
        on_error, box_tolerance, max_pixels: as in `load_coco`.
        check_sizes: also compare each ``<size>`` with the image header (sizes missing or 0 in the XML are always
            read from the header).

    Image ids are the stems' integers when all stems are distinct integers, else 1..N in load order. Category ids are
    1..C.

    Raises:
        DatasetError: every problem found (on_error="raise"), or the folder / split file cannot be read.
    """
    check_on_error(on_error)
    annotation_dir, image_dir = Path(annotation_dir), Path(image_dir)
    source = str(annotation_dir)
    if not annotation_dir.is_dir():
        raise DatasetError(f"{annotation_dir}: annotation folder not found")
    problems: list[str] = []

    if split_file is not None:
        split_path = Path(split_file)
        try:
            lines = split_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"{split_path}: cannot read split file ({error})") from None
        xml_files = []
        seen: dict[str, int] = {}
        for line_number, line in enumerate(lines, 1):
            # VOC's per-class split files have "<stem> <flag>"; the stem is the first field either way.
            stem = line.split()[0] if line.strip() else ""
            if not stem:
                continue
            if stem in seen:
                problems.append(
                    f"{split_path}: line {line_number}: duplicate image {stem!r} (first on line {seen[stem]})"
                )
                continue
            seen[stem] = line_number
            path = annotation_dir / f"{stem}.xml"
            if not is_file(path):
                problems.append(f"{split_path}: line {line_number}: annotation file {path} not found")
                continue
            xml_files.append(path)
    else:
        xml_files = sorted(annotation_dir.glob("*.xml"))

    parsed: list[_ParsedImage] = []
    used_images: dict[str, Path] = {}
    for xml_path in xml_files:
        image, file_problems = _parse_xml(xml_path, image_dir, check_sizes, box_tolerance, max_pixels)
        problems.extend(file_problems)
        if image is None:
            continue
        if image.file_name in used_images:
            first = used_images[image.file_name]
            problems.append(f"{xml_path}: image {image.file_name} is already annotated by {first}")
            continue
        used_images[image.file_name] = xml_path
        parsed.append(image)

    if class_names is None:
        names = tuple(sorted({name for image in parsed for name, *_ in image.objects}))
    else:
        names = read_class_names(class_names)
    label_of = {name: label for label, name in enumerate(names)}

    records = []
    ids = assign_image_ids([image.file_name for image in parsed])
    for image, image_id in zip(parsed, ids):
        boxes, labels, difficult = [], [], []
        for name, box, is_difficult, where in image.objects:
            if name not in label_of:
                problems.append(f"{where}: unknown class {name!r}")
                continue
            boxes.append(box)
            labels.append(label_of[name])
            difficult.append(is_difficult)
        if image.had_objects and not boxes:
            continue  # every object was bad: not a true negative (reported)
        if not keep_empty and all(difficult):
            continue
        records.append(make_record(image.file_name, image_id, image.width, image.height, boxes, labels, difficult))

    dataset = DetectionDataset(
        image_root=image_dir, records=records, class_names=names, category_ids=tuple(range(1, len(names) + 1))
    )
    return finish(dataset, problems, on_error, source)


def _parse_xml(
    xml_path: Path, image_dir: Path, check_sizes: bool, box_tolerance: float, max_pixels: int | None
) -> tuple[_ParsedImage | None, list[str]]:
    """Parse one VOC XML file: (the image, or None when the whole file is unusable; its problems)."""
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as error:
        line, column = error.position
        return None, [f"{xml_path}: line {line} column {column}: malformed XML ({error})"]
    except OSError as error:
        return None, [f"{xml_path}: cannot read ({error})"]
    if root.tag != "annotation":
        return None, [f"{xml_path}: root element is <{root.tag}>, expected <annotation>"]

    file_name = (root.findtext("filename") or "").strip() or f"{xml_path.stem}.jpg"
    image_path = image_dir / file_name
    if not is_file(image_path):
        return None, [f"{xml_path}: image file {image_path} not found"]

    width = _int_text(root.find("size/width"))
    height = _int_text(root.find("size/height"))
    if width is False or height is False:
        return None, [f"{xml_path}: <size> width/height are not integers"]
    if not width or not height or check_sizes:
        # Many VOC-style files (and some of VOC's own) have no <size> or 0x0: the header is the truth.
        try:
            actual = image_size(image_path)
        except ImageReadError as error:
            return None, [f"{xml_path}: {error}"]
        if width and height and actual != (width, height):
            return None, [
                f"{xml_path}: <size> says {width}x{height} but the image is {actual[0]}x{actual[1]} "
                "(after EXIF orientation)"
            ]
        width, height = actual
    assert isinstance(width, int) and isinstance(height, int)
    size_problem = check_image_size(width, height, max_pixels)
    if size_problem:
        return None, [f"{xml_path}: {size_problem}"]

    image = _ParsedImage(file_name=file_name, width=width, height=height)
    problems = []
    for index, obj in enumerate(root.iter("object"), 1):
        image.had_objects = True
        name = (obj.findtext("name") or "").strip()
        where = f"{xml_path}: object {index}" + (f" ({name!r})" if name else "")
        if not name:
            problems.append(f"{where}: no <name>")
            continue
        difficult_text = (obj.findtext("difficult") or "0").strip()
        if difficult_text not in ("0", "1"):
            problems.append(f"{where}: <difficult> is {difficult_text!r}, expected 0 or 1")
            continue
        bndbox = obj.find("bndbox")
        corners = ("xmin", "ymin", "xmax", "ymax")
        values = [_float_text(bndbox.find(tag)) if bndbox is not None else None for tag in corners]
        if any(v is None for v in values):
            problems.append(f"{where}: <bndbox> needs numeric xmin, ymin, xmax, ymax")
            continue
        xmin, ymin, xmax, ymax = values  # type: ignore[misc]
        box, reason = check_box((xmin - 1.0, ymin - 1.0, xmax, ymax), width, height, box_tolerance)
        if box is None:
            problems.append(f"{where}: {reason} (VOC xmin..xmax {xmin:g}..{xmax:g}, ymin..ymax {ymin:g}..{ymax:g})")
            continue
        image.objects.append((name, box, difficult_text == "1", where))
    return image, problems


def _int_text(element: ET.Element | None) -> int | None | bool:
    """The element's integer value; None when absent; False when present but not an integer."""
    if element is None or element.text is None or not element.text.strip():
        return None
    try:
        value = float(element.text)
    except ValueError:
        return False
    return int(value) if value.is_integer() else False


def _float_text(element: ET.Element | None) -> float | None:
    if element is None or element.text is None:
        return None
    try:
        return float(element.text)
    except ValueError:
        return None
