"""`cascade-rcnn predict`: run a detector over image files, folders and globs; write COCO results and drawn pictures.

Writes `OUT/detections.json` (COCO results format: `image_id`, `file_name`, `category_id`, `category_name`, `bbox` as
`[x, y, w, h]`, `score`, and for a mask model `segmentation`, the instance mask as COCO compressed RLE) and
`OUT/images/<name>` with the boxes (and masks) drawn. `--save-masks` also writes `OUT/masks/<stem>.png`, an instance-id
image per input (see `MASKS_HELP`). An input that cannot be read is reported by name on stderr and skipped; the rest
are still processed, and the exit code is 1. `--tile SIZE` runs sliced inference on large images (a progress bar per
image) and `--tta` test-time augmentation, both box-only (`cascade_rcnn.inference`); `--max-megapixels` raises the
decoding limit for very large inputs.

Under `torchrun --nproc-per-node N -m cascade_rcnn predict ...` the images are shared out over the N processes (one
model each, `cuda:LOCAL_RANK` or the CPU) and the files are the ones a single process writes
(`cascade_rcnn.inference.sharding`). Each image's results are recorded in `OUT/partial` as they come; `--resume` goes
on with a killed run, running only the images not yet recorded (`cascade_rcnn.inference.resume`). Video files, camera
indices and stream URLs write a drawn video and per-frame JSON lines instead (`cascade_rcnn.inference.video`).
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from cascade_rcnn.commands import add_backend_argument, add_bf16_argument, backend_device, positive_int
from cascade_rcnn.config import COCO_CLASSES
from cascade_rcnn.data.image_io import load_image
from cascade_rcnn.errors import ConfigError, ImageReadError
from cascade_rcnn.evaluation.coco import COCO_CATEGORY_IDS, detections_to_coco
from cascade_rcnn.evaluation.visualize import draw_detections
from cascade_rcnn.inference import options as inference_options
from cascade_rcnn.inference import resume, sharding, video
from cascade_rcnn.structures import select_masks

if TYPE_CHECKING:
    from cascade_rcnn.api import Detector

HELP = "Detect objects in images (files, folders, globs); write detections.json and the images with boxes drawn."

# What a folder or glob contributes; a file named explicitly is always tried, whatever its extension.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# Output pictures keep their input's format when Pillow writes it well; anything else (gif: 256 colours) becomes PNG.
_KEPT_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
_MAX_NAME_LENGTH = 150


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="image files, folders (their images, sorted) or globs; or videos, camera indices, stream URLs",
    )  # fmt: skip
    parser.add_argument("--weights", required=True, metavar="W", help="weights file, or a known pretrained name")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument(
        "--score-thresh", type=float, default=0.3, metavar="S", help="keep detections scoring at least this (0.3)"
    )
    parser.add_argument(
        "--classes", metavar="NAMES", help="comma-separated class names to keep, e.g. person,car (default: all)"
    )
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help=BATCH_HELP)
    parser.add_argument(
        "--device", metavar="DEVICE", help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)"
    )
    parser.add_argument("--preset", metavar="NAME", help="model preset (default: from the weights file's metadata)")
    add_bf16_argument(parser)
    add_backend_argument(parser)
    parser.add_argument("--save-masks", action="store_true", help=MASKS_HELP)
    resume.add_arguments(parser)
    inference_options.add_arguments(parser)


MASKS_HELP = (
    "mask models: also write one PNG per image to DIR/masks (named as its picture in DIR/images, with .png), 16-bit "
    "grayscale instance ids: 0 is background, i+1 the i-th of the image's detections in detections.json (the kept "
    "ones, by decreasing score); where masks overlap, the higher-scoring detection's id"
)

BATCH_HELP = "images per forward pass (default: 1 on the CPU, where batches are slower per image; 2 on a GPU)"


def default_batch_size(detector: Any) -> int:
    """1 on the CPU: there a batch of 4 800x1333 images ran at 0.8x the per-image speed of one by one (measured with
    `cascade-rcnn benchmark`: larger maps, page-faulted afresh, while one image already keeps the cores busy); 2 on a
    GPU."""
    device = getattr(detector, "device", None)
    return 2 if device is not None and torch.device(device).type == "cuda" else 1


def load_for_backend(args: argparse.Namespace, device: str) -> Any:
    """The detector `args` ask for: `--weights` on the torch backend (`--bf16`, `--preset`), or an exported graph (or
    weights exported on the fly) run by ONNX Runtime or OpenVINO (`--backend`)."""
    backend = getattr(args, "backend", "torch")
    if backend == "torch":
        return load_detector(args.weights, device, args.preset, bf16=args.bf16)
    if args.bf16:
        raise ConfigError(f"--bf16 applies to the torch backend ({backend} runs the graph as it was exported)")
    from cascade_rcnn.deploy.backends import load_backend

    return load_backend(args.weights, backend, device=device, preset=args.preset)


def resolve_device(device: str | None) -> str:
    """The device to run on: `device` as given, else cuda when available, else cpu. A device that does not exist here
    is a `ConfigError` naming it (torch would fail later with a traceback)."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device!r}: this machine has {torch.cuda.device_count()} usable CUDA device(s)")
    return device


def make_output_dir(path: Path) -> Path:
    """Create the output folder `path` (and its parents); a path that cannot be a folder is a one-line error."""
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path}: exists and is not a folder; cannot write the output there")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # also a name too long for the file system: pathlib raises even from exists()
        raise ConfigError(f"{path}: cannot create the output folder ({error.strerror or error})") from None
    return path


def load_detector(weights: str, device: str | None, preset: str | None, bf16: bool = False) -> Detector:
    """Load the detector. Imported here, not at module level, so `cascade-rcnn --help` and the model-free
    `eval --detections` work without building the model code (and tests can replace this function)."""
    from cascade_rcnn.api import Detector

    return Detector.from_weights(weights, device=resolve_device(device), preset=preset, bf16=bf16)


def model_has_masks(detector: Any) -> bool:
    """Whether the model predicts instance masks (its config's `has_masks`); False for detectors without a config."""
    config = getattr(detector, "config", None)
    return bool(config is not None and getattr(config, "has_masks", False))


def coco_wh_plus_one(detector: Any) -> bool:
    """Whether the model writes COCO boxes with w = x2 - x1 + 1 (its config's `postprocess.coco_wh_plus_one`: the
    seed's MindSpore convention); False for detectors without a config."""
    config = getattr(detector, "config", None)
    return bool(config is not None and config.postprocess.coco_wh_plus_one)


def predict_batch(detector: Any, images: list[np.ndarray], batch_size: int, **kwargs: Any) -> list[Any]:
    """`detector.predict` on a list, always returning a list (the API returns a bare result for a single input)."""
    outputs = detector.predict(images, batch_size=batch_size, **kwargs)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and output names
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputImage:
    path: Path
    image_id: int
    output_name: str  # base name under OUT/images, unique, sanitised
    mask_name: str  # base name under OUT/masks (--save-masks): output_name's stem + .png, unique as well


def images_in(folder: Path) -> list[Path]:
    """The image files (`IMAGE_EXTENSIONS`) directly in `folder`, in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders and globs into image paths, in the order given (folder contents and glob matches
    sorted); the same file reached twice is kept once. Returns `(paths, problems)`, one problem per input that
    names nothing readable."""
    paths: list[Path] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        try:
            path.exists()
        except OSError as error:  # a name the file system refuses (too long): pathlib raises instead of saying False
            problems.append(f"{item[:80]}...: {error.strerror}")
            continue
        if path.is_dir():
            found = images_in(path)
            if not found:
                problems.append(f"{item}: folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif path.exists():
            found = [path]
        elif any(c in item for c in "*?["):
            found = [
                Path(m) for m in sorted(glob.glob(item, recursive=True))
                if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_EXTENSIONS
            ]  # fmt: skip
            if not found:
                problems.append(f"{item}: pattern matched no images")
        else:
            found = []
            problems.append(f"{item}: no such file or folder")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    return paths, problems


def assign_image_ids(paths: Sequence[Path]) -> list[int]:
    """COCO image ids: the integer in the file stem when it is all digits (`000000000139.jpg` -> 139), otherwise a
    running index (1-based position); a number already taken goes to the next free one, so ids stay unique."""
    ids: list[int | None] = []
    taken: set[int] = set()
    for path in paths:
        stem = path.stem
        number = int(stem) if stem.isascii() and stem.isdigit() else None
        if number is not None and number not in taken:
            taken.add(number)
            ids.append(number)
        else:
            ids.append(None)
    result = []
    for position, image_id in enumerate(ids, start=1):
        if image_id is None:
            image_id = position
            while image_id in taken:
                image_id += 1
            taken.add(image_id)
        result.append(image_id)
    return result


def safe_output_name(name: str, taken: set[str]) -> str:
    """A file name for `name` that stays inside the output folder: only the base name (after `/` or `\\`), letters,
    digits, `_ - .` kept and the rest replaced by `_`, no leading dot (so never `..` or hidden), at most 150 characters,
    and `_1`, `_2`... appended when `taken` (lower-cased names, updated here) already has it."""
    base = PurePosixPath(name.replace("\\", "/")).name
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    stem = re.sub(r"[^\w.-]+", "_", stem).lstrip(".") or "image"
    suffix = "." + suffix.lower() if suffix else ""
    if suffix not in _KEPT_EXTENSIONS:
        suffix = ".png"
    stem = stem[:_MAX_NAME_LENGTH]
    candidate, n = stem + suffix, 0
    while candidate.lower() in taken:  # lower-case: two names differing in case collide on macOS/Windows disks
        n += 1
        candidate = f"{stem}_{n}{suffix}"
    taken.add(candidate.lower())
    return candidate


def plan_inputs(paths: Sequence[Path]) -> list[InputImage]:
    """Image id, output name and mask file name of each path. The mask name is the output name with `.png` for its
    extension, and `_1`, `_2`... only where two outputs differ by extension alone (`a.jpg`, `a.png`)."""
    taken: set[str] = set()
    taken_masks: set[str] = set()
    planned = []
    for path, image_id in zip(paths, assign_image_ids(paths), strict=True):
        output_name = safe_output_name(path.name, taken)
        mask_name = safe_output_name(PurePosixPath(output_name).stem + ".png", taken_masks)
        planned.append(InputImage(path, image_id, output_name, mask_name))
    return planned


def instance_id_image(masks: torch.Tensor | np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W) bool masks -> (H, W) uint16 instance ids: 0 background, i + 1 where mask i is set; where masks
    overlap the lowest index wins (the highest score: detections come sorted by decreasing score), as the drawing
    puts the highest-scoring mask on top. uint16, not uint8: `postprocess.detections_per_image` may exceed 255."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks, dtype=bool)
    if masks.shape[1:] != (height, width):
        raise ValueError(f"masks of shape {masks.shape} for a {width}x{height} image")
    if len(masks) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(masks)} masks do not fit 16-bit instance ids")
    ids = np.zeros((height, width), np.uint16)
    for i in range(len(masks) - 1, -1, -1):  # lowest index last: it wins where masks overlap
        ids[masks[i]] = i + 1
    return ids


def parse_class_filter(text: str | None, class_names: Sequence[str]) -> set[int] | None:
    """Labels named in `--classes` (case-insensitive); None keeps every class. Unknown names are a `ConfigError`."""
    if text is None:
        return None
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    index = {name.lower(): label for label, name in enumerate(class_names)}
    unknown = [name for name in wanted if name.lower() not in index]
    if unknown or not wanted:
        shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
        raise ConfigError(f"--classes: unknown class name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"the model's classes are: {shown}")  # fmt: skip
    return {index[name.lower()] for name in wanted}


def category_ids_for(class_names: Sequence[str]) -> list[int]:
    """COCO category id of each label: the real COCO ids (1..90 with gaps) for a COCO-80 model, so the file can be
    scored against COCO annotations directly; otherwise label + 1."""
    if tuple(class_names) == COCO_CLASSES:
        return list(COCO_CATEGORY_IDS)
    return list(range(1, len(class_names) + 1))


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if video.wants_video(args.inputs):
        return video.run(args)
    # torchrun's process group (nothing to join in one process) and this process's device.
    shards = sharding.join(resolve_device(backend_device(args)))
    paths, problems = collect_inputs(args.inputs)
    for problem in problems if shards.is_main else []:
        print(f"skipped {problem}", file=sys.stderr)
    planned = plan_inputs(paths)

    out_dir: Path = args.out
    images_dir = make_output_dir(make_output_dir(out_dir) / "images")  # before the model loads: fail at once
    save_masks = getattr(args, "save_masks", False)
    tile, tta = inference_options.tile_config(args, args.batch_size), inference_options.tta_config(args)
    inference_options.check_backend(args, tile, tta)
    max_pixels = inference_options.max_pixels(args)
    # Tiling and TTA go image by image (`--batch-size`: slices or views per pass): one large image in memory at a time.
    augment = {"tile": tile, "tta": tta, "progress": True} if tile is not None or tta is not None else {}

    detector = load_for_backend(args, shards.device)
    inference_options.check_detector(detector, tile)
    if save_masks and not model_has_masks(detector):
        raise ConfigError(f"--save-masks: the model of {args.weights} has no mask head (a box-only Cascade R-CNN); "
                          "run without --save-masks, or with a Cascade Mask R-CNN's weights")  # fmt: skip
    masks_dir = make_output_dir(out_dir / "masks") if save_masks else None
    batch_size = args.batch_size or default_batch_size(detector)
    class_names = tuple(detector.class_names)
    keep_labels = parse_class_filter(args.classes, class_names)
    category_ids = category_ids_for(class_names)
    with sharding.ImageRun(out_dir / "detections.json", [str(item.path) for item in planned], shards=shards,
                           command="predict", settings=resume.run_settings(args), resume=args.resume) as run:
        progress, counts = run, run.counts  # messages above the bar; counts summed over the processes
        counts["failed"] += len(problems) if shards.is_main else 0
        for chunk in run.chunks(1 if augment else batch_size):
            loaded: list[tuple[int, InputImage, np.ndarray]] = []
            for index in chunk:
                item = planned[index]
                try:
                    loaded.append((index, item, load_image(item.path, max_pixels=max_pixels)))
                except ImageReadError as error:
                    progress.write(f"skipped {error}")
                    counts["failed"] += 1
            if loaded:
                outputs = predict_batch(
                    detector, [image for _, _, image in loaded], batch_size, score_thresh=args.score_thresh, **augment
                )
                for (index, item, image), det in zip(loaded, outputs, strict=True):
                    boxes, scores, labels, masks = _filtered(det, args.score_thresh, keep_labels)
                    results = detections_to_coco(item.image_id, boxes, scores, labels, category_ids,
                                                 wh_plus_one=coco_wh_plus_one(detector), masks=masks)  # fmt: skip
                    records = [
                        {"image_id": r["image_id"], "file_name": item.path.name, "category_id": r["category_id"],
                         "category_name": class_names[label], "bbox": r["bbox"], "score": r["score"],
                         **({"segmentation": r["segmentation"]} if "segmentation" in r else {})}
                        for r, label in zip(results, labels.tolist(), strict=True)
                    ]  # fmt: skip
                    item_failed = False
                    try:
                        drawn = draw_detections(image, boxes, scores, labels, class_names, masks=masks)
                        drawn.save(images_dir / item.output_name)
                        counts["images"] += 1
                    except (OSError, ValueError) as error:
                        progress.write(f"skipped {item.path}: cannot write {item.output_name} ({error})")
                        item_failed = True
                    if masks_dir is not None:
                        try:
                            ids = instance_id_image(_or_empty(masks, image), *image.shape[:2])
                            Image.fromarray(ids).save(masks_dir / item.mask_name)
                            counts["masks"] += 1
                        except (OSError, ValueError) as error:
                            progress.write(f"{item.path}: cannot write masks/{item.mask_name} ({error})")
                            item_failed = True
                    counts["failed"] += item_failed
                    run.add(index, records, complete=not item_failed)  # after its files: a kill redoes the image

    failed = run.counts["failed"]
    if not shards.is_main:
        return 0  # rank 0 reports the run, failures included, and its exit code is the run's
    masks_note = f", {run.counts['masks']} mask images" if masks_dir is not None else ""
    resumed = f" (and {run.resumed} images of the interrupted run)" if run.resumed else ""
    print(f"{run.counts['images']} images{masks_note}{resumed} and {run.written.get('results', 0)} detections written "
          f"to {out_dir}")  # fmt: skip
    if failed:
        left = " (run again with --resume to try only those)" if (out_dir / resume.PARTIAL_DIR).is_dir() else ""
        print(f"{failed} input(s) failed; see the messages above{left}", file=sys.stderr)
        return 1
    return 0


def _filtered(
    det: Any, score_thresh: float, keep_labels: set[int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The detection's boxes, scores, labels and masks (None for a box-only model) with score >= `score_thresh` and,
    when given, label in `keep_labels`: a dropped detection takes its mask with it."""
    boxes = torch.as_tensor(det.boxes).detach().cpu().reshape(-1, 4)
    scores = torch.as_tensor(det.scores).detach().cpu().reshape(-1)
    labels = torch.as_tensor(det.labels).detach().cpu().reshape(-1).long()
    masks = getattr(det, "masks", None)
    keep = scores >= score_thresh
    if keep_labels is not None:
        keep &= torch.isin(labels, torch.tensor(sorted(keep_labels), dtype=torch.long))
    kept_masks = None if masks is None else select_masks(torch.as_tensor(masks).detach().cpu(), keep)
    return boxes[keep], scores[keep], labels[keep], kept_masks


def _or_empty(masks: torch.Tensor | None, image: np.ndarray) -> torch.Tensor:
    """`masks`, or no masks at the image's size (a detector that returned none for this image)."""
    return masks if masks is not None else torch.zeros((0, *image.shape[:2]), dtype=torch.bool)
