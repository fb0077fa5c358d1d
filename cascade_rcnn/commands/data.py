"""`cascade-rcnn data check|convert`: validate a dataset before a long run, or write it as COCO JSON.

    cascade-rcnn data check --format coco --images DIR --annotations FILE
    cascade-rcnn data check --format yolo --images DIR --annotations LABEL_DIR --names names.txt
    cascade-rcnn data convert --format voc --images JPEGImages --annotations Annotations --output out.json

`check` prints the number of images, boxes per class, how many boxes have instance masks (COCO files with
segmentations) and every problem, and exits 1 when there are problems (0 when the dataset is clean). `convert`
refuses a dataset with problems unless `--skip-bad` is given, in which case the bad boxes and images are left out and
listed (a bad mask drops its box too); segmentations are written back.
"""

from __future__ import annotations

import argparse
import sys

from cascade_rcnn.data import FORMATS, load_dataset, load_image, write_coco
from cascade_rcnn.data.dataset import DetectionDataset
from cascade_rcnn.errors import ImageReadError

HELP = "Check a detection dataset (COCO, VOC, YOLO, txt) for problems, or convert it to COCO JSON."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate a dataset and print a report; exit 1 when it has problems")
    _add_dataset_arguments(check)
    check.add_argument(
        "--decode",
        action="store_true",
        help="also decode every image (slow; finds truncated and corrupt files that a header read cannot)",
    )
    convert = actions.add_parser("convert", help="write a dataset as COCO instances JSON")
    _add_dataset_arguments(convert)
    convert.add_argument("--output", required=True, help="the COCO JSON file to write")
    convert.add_argument(
        "--skip-bad", action="store_true", help="leave bad boxes and images out (and list them) instead of refusing"
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        return _check(args)
    return _convert(args)


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="annotation format")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument(
        "--annotations",
        required=True,
        help="COCO JSON file, VOC Annotations folder, YOLO label folder, or txt file",
    )
    parser.add_argument("--names", help="class names file (one per line, or a YOLO data.yaml); yolo and txt need it")
    parser.add_argument("--split", help="VOC ImageSets/Main/<split>.txt listing the images to use")


def _load(args: argparse.Namespace, on_error: str, strict_sizes: bool) -> DetectionDataset:
    options = {"on_error": on_error}
    if strict_sizes and args.format in ("coco", "voc"):
        options["check_sizes"] = True  # the other formats read every header anyway
    return load_dataset(args.format, args.images, args.annotations, names=args.names, split=args.split, **options)


def _check(args: argparse.Namespace) -> int:
    dataset = _load(args, on_error="skip", strict_sizes=True)
    problems = list(dataset.problems)
    if args.decode:
        for index, record in enumerate(dataset.records):
            try:
                load_image(dataset.image_path(index))
            except ImageReadError as error:
                problems.append(f"image id {record.image_id}: {error}")
    print(format_report(dataset, problems))
    return 1 if problems else 0


def _convert(args: argparse.Namespace) -> int:
    dataset = _load(args, on_error="skip" if args.skip_bad else "raise", strict_sizes=False)
    path = write_coco(dataset, args.output)
    for problem in dataset.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    num_boxes = sum(len(record.boxes) for record in dataset.records)
    kinds = dataset.mask_counts()
    masks = f" ({kinds['polygon'] + kinds['rle']} with masks)" if dataset.has_masks else ""
    print(f"wrote {path}: {len(dataset)} images, {num_boxes} boxes{masks}, {dataset.num_classes} classes")
    return 0


def format_report(dataset: DetectionDataset, problems: list[str]) -> str:
    """The text `data check` prints: totals (with masks, when the dataset has any), a per-class table, then every
    problem."""
    counts = dataset.box_counts()
    num_boxes = sum(total for total, _ in counts.values())
    num_ignore = sum(ignore for _, ignore in counts.values())
    negatives = sum(1 for record in dataset.records if len(record.boxes) == 0)
    lines = [
        f"images: {len(dataset)} usable ({negatives} without boxes)",
        f"boxes: {num_boxes} ({num_ignore} crowd/ignore regions)",
        f"classes: {dataset.num_classes}",
    ]
    if dataset.has_masks:
        kinds = dataset.mask_counts()
        lines.insert(
            2,
            f"masks: {kinds['polygon'] + kinds['rle']} of {num_boxes} boxes ({kinds['polygon']} polygons, "
            f"{kinds['rle']} RLE; {kinds['crowd']} crowd)",
        )
    if counts:
        width = max(len(name) for name in counts)
        lines.append(f"  {'class':<{width}}  {'id':>5}  {'boxes':>7}  {'ignore':>6}")
        for (name, (total, ignore)), category_id in zip(counts.items(), dataset.category_ids):
            lines.append(f"  {name:<{width}}  {category_id:>5}  {total:>7}  {ignore:>6}")
    if problems:
        lines.append(f"problems: {len(problems)} (the bad boxes/images are not counted above)")
        lines.extend(f"  - {problem}" for problem in problems)
    else:
        lines.append("problems: none")
    return "\n".join(lines)
