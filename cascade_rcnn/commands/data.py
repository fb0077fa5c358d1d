"""`cascade-rcnn data check|convert|preview|synth`: validate a dataset before a long run, write it as COCO JSON, look
at its labels, or generate the synthetic shapes set.

    cascade-rcnn data check --format coco --images DIR --annotations FILE
    cascade-rcnn data check --format yolo --images DIR --annotations LABEL_DIR --names names.txt
    cascade-rcnn data convert --format voc --images JPEGImages --annotations Annotations --output out.json
    cascade-rcnn data preview --format coco --images DIR --annotations FILE --out DIR   # preview.html
    cascade-rcnn data synth --out DIR                  # the demo's set: train/, val/ (256 px), train.json, val.json
    cascade-rcnn data synth --large --out DIR          # large images (4000x3000) with the demo's small shapes: val/

`check` prints the number of images, boxes per class, how many boxes have instance masks (COCO files with
segmentations) and every problem, and exits 1 when there are problems (0 when the dataset is clean). `convert`
refuses a dataset with problems unless `--skip-bad` is given, in which case the bad boxes and images are left out and
listed (a bad mask drops its box too); segmentations are written back. `preview` writes `preview.html` (a gallery of
images with their ground truth drawn, per-class counts, box-size histograms; `cascade_rcnn.evaluation.preview`),
leaving bad boxes out and listing them. `synth` writes PNG + COCO JSON (`cascade_rcnn.data.synthetic`); `--large`
is the set for sliced inference (`predict --tile`, `eval --tile`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cascade_rcnn.commands import positive_int
from cascade_rcnn.data import FORMATS, load_dataset, load_image, write_coco
from cascade_rcnn.data.dataset import DetectionDataset
from cascade_rcnn.errors import ImageReadError

HELP = "Check a detection dataset (COCO, VOC, YOLO, txt) for problems, convert it to COCO JSON, or generate one."


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
    preview = actions.add_parser("preview", help="write preview.html: labels drawn on images, class counts, box sizes")
    _add_dataset_arguments(preview)
    preview.add_argument("--out", required=True, type=Path, help="output folder (created)")
    preview.add_argument("--max-images", type=positive_int, default=48, help="images in the gallery (48)")
    synth = actions.add_parser("synth", help="write the synthetic shapes set (PNG + COCO JSON)")
    synth.add_argument("--out", required=True, type=Path, help="output folder (created; same-named files overwritten)")
    synth.add_argument("--large", action="store_true",
                       help="large images with small objects (the demo's shapes, 16-96 px) for sliced inference")
    synth.add_argument("--num-images", type=positive_int, default=8, help="--large: images (8)")
    synth.add_argument("--image-size", type=_image_size, default=(4000, 3000), metavar="WxH",
                       help="--large: image width x height (4000x3000)")
    synth.add_argument("--num-train", type=_count, default=200, help="train images of the demo's set (200)")
    synth.add_argument("--num-val", type=_count, default=50, help="val images of the demo's set (50)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (0); the same arguments give the same files")


def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        return _check(args)
    if args.action == "synth":
        return _synth(args)
    if args.action == "preview":
        return _preview(args)
    return _convert(args)


def _synth(args: argparse.Namespace) -> int:
    from cascade_rcnn.data.synthetic import make_large_shapes_dataset, make_shapes_dataset

    if args.large:
        paths = make_large_shapes_dataset(args.out, num_images=args.num_images, image_size=args.image_size,
                                          seed=args.seed)  # fmt: skip
    else:
        paths = make_shapes_dataset(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    for split in ("train", "val"):
        if f"{split}_annotations" in paths:
            coco = json.loads(paths[f"{split}_annotations"].read_text(encoding="utf-8"))
            print(f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes in "
                  f"{paths[f'{split}_images']}, annotations {paths[f'{split}_annotations']}")  # fmt: skip
    return 0


def _preview(args: argparse.Namespace) -> int:
    from cascade_rcnn.commands.predict import make_output_dir
    from cascade_rcnn.evaluation.preview import write_preview

    make_output_dir(args.out)
    dataset = _load(args, on_error="skip", strict_sizes=False)
    path = write_preview(dataset, args.out, max_images=args.max_images, source=str(args.annotations))
    skipped = f" ({len(dataset.problems)} problems, listed there)" if dataset.problems else ""
    print(f"preview of {len(dataset)} images written to {path}{skipped}")
    return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _image_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()) or min(int(width), int(height)) < 112:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT of at least 112x112, e.g. 4000x3000, got {text!r}")
    return int(width), int(height)


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
