"""The in-memory form every annotation format is read into, and the checks all parsers share.

A parser (`load_coco`, `load_voc`, `load_yolo`, `load_txt`) reads its whole input, validates every image and box, and
collects every problem as a one-line string naming the file and the id or line, e.g.
``"ann.json: annotation id 7 (image id 3): box has non-positive size (w=0, h=12)"``. Then, by `on_error`:

- ``"raise"`` (the default): any problem raises `DatasetError(message, problems)` listing all of them at once;
- ``"skip"``: bad boxes and images are left out and the returned `DetectionDataset` lists what was left out in its
  `problems` field, so a caller can log it (``cascade-rcnn data check`` prints it).

Problems that leave nothing to load (an unreadable or truncated annotation file, a COCO file without an ``images``
list) raise in both modes.

What is skipped, in ``"skip"`` mode: a bad box drops that box only; a bad image entry (missing file, duplicate id, bad
size) drops the image with all its boxes. An image that had annotations and lost all of them to problems is dropped
too, rather than kept as a negative: its objects are real, and training on it as background would teach the model to
miss them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cascade_rcnn.data.image_io import MAX_IMAGE_PIXELS
from cascade_rcnn.errors import DatasetError

OnError = Literal["raise", "skip"]

# How far (pixels) a box may overshoot the image; it is then clipped to it. By default any box partly outside is
# clipped, as mmdetection does (annotation tools and rounding leave boxes outside: COCO's float boxes, YOLO's
# 6-digit normalised coordinates, boxes drawn past the border); a box with no area inside the image is reported. A
# finite tolerance (`box_tolerance=1.0`) also reports boxes that overshoot by more, for strict dataset checks.
DEFAULT_BOX_TOLERANCE = math.inf


@dataclass
class ImageRecord:
    """One image and its boxes (and, from COCO files with masks, their segmentations).

    Attributes:
        file_name: path of the image relative to the dataset's `image_root` (forward slashes).
        image_id: the image's integer id (COCO's id; for other formats see each parser).
        width, height: image size in pixels as a viewer shows it (EXIF orientation applied); None when unknown.
        boxes: (N, 4) float32, absolute ``x1, y1, x2, y2`` pixels in that orientation; x2 > x1 and y2 > y1.
        labels: (N,) int64 contiguous class indices 0..C-1 into the dataset's `class_names`.
        iscrowd: (N,) bool; True marks a crowd box (COCO crowd, VOC difficult): ignored by COCO evaluation, and in
            training never a ground truth (by default it has no effect at all, as in mmdetection; see
            `rpn.ignore_iof_thresh`).
        segmentations: None when the source has no masks (VOC, YOLO, txt, box-only COCO); otherwise one entry per
            box, in box order: the COCO ``segmentation`` value as read (a list of polygons, or an RLE dict), or None
            for a box without a mask. `cascade_rcnn.data.masks.record_masks` rasterises them.
    """

    file_name: str
    image_id: int
    width: int | None
    height: int | None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    segmentations: list[Any] | None = None

    def __post_init__(self) -> None:
        # Coerce here so every consumer can rely on the dtypes and shapes, whoever built the record.
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        if not len(self.boxes) == len(self.labels) == len(self.iscrowd):
            raise ValueError(
                f"{self.file_name}: boxes, labels and iscrowd differ in length "
                f"({len(self.boxes)}, {len(self.labels)}, {len(self.iscrowd)})"
            )
        if self.segmentations is not None and len(self.segmentations) != len(self.boxes):
            raise ValueError(f"{self.file_name}: {len(self.boxes)} boxes but {len(self.segmentations)} segmentations")


@dataclass
class DetectionDataset:
    """A detection dataset in memory: image records plus the class list.

    Attributes:
        image_root: folder the records' `file_name`s are relative to.
        records: one per image, in a stable order (the order of the source file, or sorted file names).
        class_names: the name of each contiguous label 0..C-1.
        category_ids: the COCO category id of each contiguous label (sorted ascending for COCO input; 1..C for the
            other formats), used when writing COCO JSON or COCO-format detections.
        problems: what the parser left out with ``on_error="skip"``, one line each; empty otherwise.
    """

    image_root: Path
    records: list[ImageRecord]
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.image_root = Path(self.image_root)
        self.class_names = tuple(self.class_names)
        self.category_ids = tuple(int(c) for c in self.category_ids)
        if len(self.class_names) != len(self.category_ids):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.category_ids)} category ids")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        """C, the number of object classes (background not counted)."""
        return len(self.class_names)

    @property
    def has_masks(self) -> bool:
        """True when at least one box has a segmentation (instance-mask training needs this)."""
        return any(s is not None for record in self.records for s in record.segmentations or ())

    def image_path(self, index: int) -> Path:
        """Path of record `index`'s image file: ``image_root / file_name``."""
        return self.image_root / self.records[index].file_name

    def box_counts(self) -> dict[str, tuple[int, int]]:
        """Per class name: (boxes, of which ignore regions)."""
        counts = np.zeros(self.num_classes, np.int64)
        crowd = np.zeros(self.num_classes, np.int64)
        for record in self.records:
            np.add.at(counts, record.labels, 1)
            np.add.at(crowd, record.labels[record.iscrowd], 1)
        return {name: (int(counts[i]), int(crowd[i])) for i, name in enumerate(self.class_names)}

    def mask_counts(self) -> dict[str, int]:
        """Boxes with a mask: ``polygon`` (a list of polygons), ``rle`` (an RLE dict), and of those ``crowd``."""
        counts = {"polygon": 0, "rle": 0, "crowd": 0}
        for record in self.records:
            for segmentation, is_crowd in zip(record.segmentations or (), record.iscrowd.tolist()):
                if segmentation is not None:
                    counts["rle" if isinstance(segmentation, dict) else "polygon"] += 1
                    counts["crowd"] += is_crowd
        return counts


def check_on_error(on_error: str) -> None:
    """Reject an `on_error` value other than "raise" or "skip" (a programming error, hence ValueError)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def finish(dataset: DetectionDataset, problems: list[str], on_error: OnError, source: str) -> DetectionDataset:
    """Raise all `problems` at once (on_error="raise") or attach them to the dataset (on_error="skip")."""
    if problems and on_error == "raise":
        raise DatasetError(
            f"{source}: {len(problems)} problem(s) found; fix them, or load with on_error='skip' to leave the bad "
            "boxes and images out",
            problems,
        )
    dataset.problems = list(problems)
    return dataset


def check_box(
    box: Sequence[float],
    width: int | None,
    height: int | None,
    tolerance: float = DEFAULT_BOX_TOLERANCE,
) -> tuple[np.ndarray | None, str | None]:
    """Validate one ``x1, y1, x2, y2`` pixel box against its image; clip what overshoots it (by at most `tolerance`
    pixels; more is reported).

    Returns:
        (clipped float64 box, None) when valid, or (None, reason) when not. The reason describes the box in words;
        the caller prefixes the location.
    """
    try:
        values = [float(v) for v in box]
    except OverflowError:  # a JSON integer beyond float range (e.g. 10**400)
        values = [math.inf] * 4
    if not all(math.isfinite(v) for v in values):
        return None, f"box has non-finite values {_fmt_box(values)}"
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        return None, f"box has non-positive size (w={_fmt(x2 - x1)}, h={_fmt(y2 - y1)}) {_fmt_box(values)}"
    if width is not None and height is not None:
        if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
            return None, f"box {_fmt_box(values)} is outside the {width}x{height} image"
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            return None, f"box {_fmt_box(values)} is outside the {width}x{height} image (no area inside it)"
    return np.array([x1, y1, x2, y2], np.float64), None


def is_file(path: Path) -> bool:
    """`path.is_file()`, but False for a name the OS refuses: pathlib raises OSError for a name too long (ENAMETOOLONG),
    and file names here come from annotation files."""
    try:
        return path.is_file()
    except OSError:
        return False


def check_image_size(width: int, height: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> str | None:
    """Reason an image size is unusable (non-positive, or above the decoder's pixel limit), or None."""
    if width <= 0 or height <= 0:
        return f"image size {width}x{height} is not positive"
    if max_pixels is not None and width * height > max_pixels:
        # min(): a size read from JSON can be an integer too large to divide as a float.
        megapixels = min(width * height, 10**300) / 1e6
        return (
            f"image is {width}x{height} = {megapixels:.1f} megapixels, above the {max_pixels / 1e6:.1f} "
            "megapixel limit of the image decoder"
        )
    return None


def assign_image_ids(file_names: Sequence[str]) -> list[int]:
    """Integer ids for formats that have none (VOC, YOLO, txt).

    When every file stem is a distinct non-negative integer (COCO-style names such as ``000000000139.jpg``) the ids
    are those integers, so a converted dataset lines up with the original COCO image ids; otherwise they are 1..N in
    the given order.
    """
    stems = [Path(name).stem for name in file_names]
    # isdecimal, not isdigit: '²' is a digit that int() refuses. Under 19 digits: the id must fit an int64.
    if stems and all(stem.isdecimal() and len(stem) < 19 for stem in stems):
        ids = [int(stem) for stem in stems]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(1, len(file_names) + 1))


def make_record(
    file_name: str,
    image_id: int,
    width: int | None,
    height: int | None,
    boxes: list[np.ndarray],
    labels: list[int],
    iscrowd: list[bool],
    segmentations: list[Any] | None = None,
) -> ImageRecord:
    """Build an ImageRecord from per-box Python lists (which may be empty)."""
    return ImageRecord(
        file_name=file_name,
        image_id=int(image_id),
        width=width,
        height=height,
        boxes=np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32),
        labels=np.asarray(labels, np.int64),
        iscrowd=np.asarray(iscrowd, bool),
        segmentations=segmentations,
    )


def read_class_names(names: str | Path | Sequence[str]) -> tuple[str, ...]:
    """Class names from a sequence, a text file with one name per line, or a YAML file with a ``names`` key.

    The YAML form follows Ultralytics' data.yaml: ``names`` is a list, or a mapping from index 0..C-1 to name.
    Blank lines of a text file are ignored (a trailing newline is not a class).

    Raises:
        DatasetError: the file is missing, malformed, or the names are empty or repeated.
    """
    if not isinstance(names, (str, Path)):
        result = tuple(str(n) for n in names)
        source = "class names"
    else:
        path = Path(names)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"{path}: cannot read class names ({error})") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            result = _names_from_yaml(path, text)
        else:
            result = tuple(line.strip() for line in text.splitlines() if line.strip())
    problems = []
    if not result:
        problems.append(f"{source}: no class names")
    seen: set[str] = set()
    for index, name in enumerate(result):
        if not name:
            problems.append(f"{source}: class {index} has an empty name")
        if name in seen:
            problems.append(f"{source}: class name {name!r} appears more than once")
        seen.add(name)
    if problems:
        raise DatasetError(f"{source}: bad class names", problems)
    return result


def _names_from_yaml(path: Path, text: str) -> tuple[str, ...]:
    import yaml  # a declared dependency; imported here because only YOLO data.yaml files need it

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise DatasetError(f"{path}: malformed YAML ({error})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        return tuple(str(n) for n in names)
    if isinstance(names, dict):
        keys = sorted(names) if all(isinstance(k, int) for k in names) else None
        if keys != list(range(len(names))):
            raise DatasetError(f"{path}: 'names' mapping must have the keys 0..{len(names) - 1}")
        return tuple(str(names[k]) for k in keys)
    raise DatasetError(f"{path}: no 'names' list or mapping")


def is_int(value: Any) -> bool:
    """An integer from JSON, not a bool: bool is an int subclass in Python, and true/false in an id field is a wrong
    type, not 1/0."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float from JSON, not a bool (finiteness is the caller's check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def short_repr(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, for quoting a bad value in a one-line problem."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt(value: float) -> str:
    return f"{value:g}"


def _fmt_box(values: Sequence[float]) -> str:
    return "[" + ", ".join(_fmt(v) for v in values) + "]"
