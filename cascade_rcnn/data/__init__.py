"""Datasets, image decoding and augmentation.

Annotation formats are read into one in-memory form, `DetectionDataset` (a list of `ImageRecord`s plus class names),
by `load_coco`, `load_voc`, `load_yolo` and `load_txt`, or by `load_dataset(format, ...)`; `convert_to_coco` /
`write_coco` write any of them as COCO JSON; COCO segmentations (instance masks) travel along, and
`cascade_rcnn.data.masks` checks and rasterises them. `cascade_rcnn.data.transforms` (imported separately: it needs
torch) turns a dataset into a torch Dataset with flips and resizing, and groups batches by aspect ratio.
`cascade_rcnn.data.synthetic` makes the demo's shapes dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade_rcnn import lazy_exports
from cascade_rcnn.data.image_io import MAX_IMAGE_PIXELS, image_size, load_image, to_rgb
from cascade_rcnn.errors import DatasetError

if TYPE_CHECKING:
    from cascade_rcnn.data.dataset import DetectionDataset

FORMATS: tuple[str, ...] = ("coco", "voc", "yolo", "txt")

# The annotation readers load when first used: image decoding alone (what `cascade_rcnn.deploy.lean` needs) imports
# neither pycocotools nor the parsers.
__getattr__, __dir__ = lazy_exports(globals(), {
    name: f"cascade_rcnn.data.{module}" for name, module in {
        "convert_to_coco": "coco", "load_coco": "coco", "write_coco": "coco", "DetectionDataset": "dataset",
        "ImageRecord": "dataset", "load_txt": "txt", "load_voc": "voc", "load_yolo": "yolo",
    }.items()
})  # fmt: skip


def load_dataset(
    format: str,
    images: str | Path,
    annotations: str | Path,
    names: str | Path | Sequence[str] | None = None,
    split: str | Path | None = None,
    **options: Any,
) -> DetectionDataset:
    """Load any supported format with one signature (what the CLI and the trainer call).

    Args:
        format: "coco", "voc", "yolo" or "txt".
        images: the image folder.
        annotations: the COCO JSON file, the VOC ``Annotations`` folder, the YOLO label folder or the txt file.
        names: class names (a sequence or a file): required for yolo and txt, optional for voc, unused for coco.
        split: a VOC ``ImageSets/Main/<split>.txt`` file (voc only).
        **options: passed to the parser (`on_error`, `keep_empty`, `box_tolerance`, `max_pixels`, ...).

    Raises:
        DatasetError: an unknown format, missing names, or the dataset's problems.
    """
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; expected one of {', '.join(FORMATS)}")
    if format in ("yolo", "txt") and names is None:
        raise DatasetError(f"the {format} format needs class names (a names file, one name per line)")
    if split is not None and format != "voc":
        raise DatasetError(f"a split file is only used by the voc format, not {format}")
    if names is not None and format == "coco":
        raise DatasetError("the coco format takes its class names from the JSON 'categories'; do not pass names")
    if format == "coco":
        from cascade_rcnn.data.coco import load_coco

        return load_coco(annotations, images, **options)
    if format == "voc":
        from cascade_rcnn.data.voc import load_voc

        return load_voc(annotations, images, split_file=split, class_names=names, **options)
    if format == "yolo":
        from cascade_rcnn.data.yolo import load_yolo

        return load_yolo(images, annotations, names, **options)  # type: ignore[arg-type]
    from cascade_rcnn.data.txt import load_txt

    return load_txt(annotations, images, names, **options)  # type: ignore[arg-type]


__all__ = [
    "FORMATS",
    "MAX_IMAGE_PIXELS",
    "DetectionDataset",
    "ImageRecord",
    "convert_to_coco",
    "image_size",
    "load_coco",
    "load_dataset",
    "load_image",
    "load_txt",
    "load_voc",
    "load_yolo",
    "to_rgb",
    "write_coco",
]
