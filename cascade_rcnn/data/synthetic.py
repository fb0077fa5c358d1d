"""A deterministic synthetic detection dataset: coloured shapes on textured backgrounds, written as PNG + COCO JSON.

It is the data of the project's demo, so it is made to be learnable by a small detector in minutes on a CPU:

- four classes told apart by shape, never by colour (every class takes every colour): circle, square, triangle
  (pointing up, down, left or right) and cross;
- 1-4 objects per image, 16-96 px on a side (a little non-square), never overlapping (a 4 px gap), so every box is
  the object's full visible extent;
- backgrounds of three textures (smooth noise, gradient, stripes) in muted colours whose channels stay in 45..210,
  while every object colour has a channel <= 20 or >= 235: an object pixel can never equal a background pixel;
- objects drawn without anti-aliasing, and each box computed from the pixels actually drawn (``x2 = last column + 1``),
  so boxes are exactly tight;
- the demo's set (`make_shapes_dataset`) carries each object's exact mask, the pixels drawn, as its COCO
  ``segmentation`` (pycocotools' compressed RLE), for Cascade Mask R-CNN (`cascade-rcnn demo --masks`).

The same arguments give byte-identical files (numpy's PCG64 stream, Pillow's deterministic PNG encoder).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# Saturated object colours; each has a channel <= 20 or >= 235, outside the background's 45..210 range.
_OBJECT_COLOURS = np.array(
    [
        (230, 25, 35), (20, 170, 40), (30, 60, 235), (250, 220, 20), (240, 240, 240), (15, 15, 15),
        (235, 20, 200), (20, 220, 235), (250, 130, 10), (120, 20, 200),
    ],
    dtype=np.uint8,
)  # fmt: skip
_BACKGROUND_RANGE = (45, 210)
_GAP = 4  # pixels kept free between objects


@dataclass
class SyntheticSample:
    """One rendered image.

    Attributes:
        image: (H, W, 3) uint8 RGB, the background with the objects drawn on it.
        background: (H, W, 3) uint8, the background alone (for tests of box tightness).
        boxes: (N, 4) float32 xyxy pixels, tight around each object's drawn pixels.
        labels: (N,) int64 indices into `CLASS_NAMES`.
        areas: (N,) int64 drawn pixels of each object (COCO's ``area``).
        segmentations: each object's drawn pixels as a COCO compressed RLE ``{"size": [H, W], "counts": str}``
            (`render_sample(with_masks=True)`), else empty.
    """

    image: np.ndarray
    background: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    segmentations: list[dict] = field(default_factory=list)


def make_shapes_dataset(
    out_dir: str | Path,
    num_train: int = 200,
    num_val: int = 50,
    image_size: tuple[int, int] = (256, 256),
    seed: int = 0,
) -> dict[str, Path]:
    """Write the shapes dataset under `out_dir`: ``train/*.png``, ``val/*.png``, ``train.json``, ``val.json``.

    Image ids run 1..N per split, file names are ``<id:06d>.png``, category ids are 1..4 in `CLASS_NAMES` order.

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        num_train, num_val: number of images of each split.
        image_size: (width, height) of every image; at least 112 px each, so a 96 px object fits with margins.
        seed: the random seed; the two splits use independent streams derived from it.

    Returns:
        Paths ``root``, ``train_images``, ``train_annotations``, ``val_images``, ``val_annotations``.
    """
    width, height = image_size
    if min(width, height) < 112:
        raise ValueError(f"image_size must be at least 112x112, got {width}x{height}")
    root = Path(out_dir)
    paths = {"root": root}
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        rng = np.random.default_rng([seed, split_index])
        samples = (render_sample(rng, (width, height), with_masks=True) for _ in range(count))
        paths.update(_write_split(root, split, samples, f"cascade_rcnn synthetic shapes, {split}, seed {seed}"))
    return paths


def make_large_shapes_dataset(
    out_dir: str | Path,
    num_images: int = 8,
    image_size: tuple[int, int] = (4000, 3000),
    num_objects: tuple[int, int] = (30, 60),
    seed: int = 0,
) -> dict[str, Path]:
    """Write a set of large images with small objects under `out_dir`: ``val/*.png`` and ``val.json``, for sliced
    inference. The objects are the demo's shapes at the sizes the demo's model was trained on (16-96 px), drawn by the
    same rules (`render_sample`: every class in every colour, never overlapping, exactly tight boxes), `num_objects`
    (inclusive range) per image, on a background of the same textures at the full image size.

    A model that resizes the whole image to its input size (the demo's: 256 px) sees these objects at 1-6 px; slices of
    about its training image size show them as it was trained. Same layout and ids as `make_shapes_dataset`'s val
    split; the same arguments give byte-identical files.

    Returns:
        Paths ``root``, ``val_images``, ``val_annotations``.
    """
    width, height = image_size
    if min(width, height) < 112:
        raise ValueError(f"image_size must be at least 112x112, got {width}x{height}")
    root = Path(out_dir)
    rng = np.random.default_rng([seed, 2])  # streams 0 and 1 are make_shapes_dataset's splits
    samples = (render_sample(rng, (width, height), num_objects=num_objects, local=True) for _ in range(num_images))
    description = f"cascade_rcnn synthetic large shapes ({width}x{height}, small objects), val, seed {seed}"
    return {"root": root, **_write_split(root, "val", samples, description)}


def _write_split(root: Path, split: str, samples: Iterable[SyntheticSample], description: str) -> dict[str, Path]:
    """Write `samples` as ``root/<split>/<id:06d>.png`` (ids from 1) and ``root/<split>.json`` (COCO)."""
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, sample in enumerate(samples, start=1):
        height, width = sample.image.shape[:2]
        file_name = f"{image_id:06d}.png"
        Image.fromarray(sample.image).save(image_dir / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        masks = sample.segmentations or [[]] * len(sample.labels)  # [] : no mask
        for box, label, area, mask in zip(sample.boxes.tolist(), sample.labels.tolist(), sample.areas.tolist(), masks):
            x1, y1, x2, y2 = (int(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": area,
                    "iscrowd": 0,
                    "segmentation": mask,
                }
            )
    coco = {
        "info": {"description": description},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)],
    }
    annotation_path = root / f"{split}.json"
    annotation_path.write_text(json.dumps(coco, indent=1), encoding="utf-8")
    return {f"{split}_images": image_dir, f"{split}_annotations": annotation_path}


def render_sample(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    num_objects: tuple[int, int] = (1, 4),
    object_size: tuple[int, int] = (16, 96),
    local: bool = False,
    with_masks: bool = False,
) -> SyntheticSample:
    """Render one image with `num_objects` (inclusive range) non-overlapping shapes of side `object_size` (px);
    `with_masks` also encodes each object's drawn pixels (`SyntheticSample.segmentations`; not with `local`).

    `local` draws each shape on a canvas of its own cell rather than of the whole image (the large set: a 4000x3000
    canvas per object would be most of the time); the pixels drawn can differ from the whole-image drawing by
    Pillow's rounding, so the demo's set keeps the whole-image canvas and its files."""
    width, height = image_size
    if with_masks and local:
        raise ValueError("with_masks draws each shape on the whole image's canvas: not with local")
    background = _render_background(rng, width, height)
    image = background.copy()
    wanted = int(rng.integers(num_objects[0], num_objects[1] + 1))
    boxes, labels, areas, segmentations = [], [], [], []
    occupied: list[tuple[int, int, int, int]] = []
    for _ in range(wanted):
        label = int(rng.integers(len(CLASS_NAMES)))
        side = int(rng.integers(object_size[0], object_size[1] + 1))
        # A mild aspect change so that the size of a box says nothing about its class.
        w = side
        h = int(np.clip(round(side * rng.uniform(0.8, 1.25)), object_size[0], object_size[1]))
        placed = None
        for _attempt in range(50):
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            if all(not _overlaps((x0, y0, x0 + w, y0 + h), other, _GAP) for other in occupied):
                placed = (x0, y0)
                break
        if placed is None:
            continue  # no room left; fewer objects in this image
        x0, y0 = placed
        if local:
            cell = (slice(y0, y0 + h), slice(x0, x0 + w))
            mask = _shape_mask(rng, CLASS_NAMES[label], w, h, 0, 0, w, h)
            ys, xs = np.nonzero(mask)
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            image[cell][mask] = _pick_colour(rng, background[cell][mask])
        else:
            mask = _shape_mask(rng, CLASS_NAMES[label], width, height, x0, y0, w, h)
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            image[mask] = _pick_colour(rng, background[mask])
            if with_masks:
                rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
                segmentations.append({"size": [height, width], "counts": rle["counts"].decode("ascii")})
        occupied.append((x0, y0, x0 + w, y0 + h))
        boxes.append(box)
        labels.append(label)
        areas.append(int(mask.sum()))
    return SyntheticSample(
        image=image,
        background=background,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=np.asarray(labels, np.int64),
        areas=np.asarray(areas, np.int64),
        segmentations=segmentations,
    )


def _render_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    low, high = _BACKGROUND_RANGE
    kind = int(rng.integers(3))
    base = rng.uniform(low + 30, high - 30, size=3)
    if kind == 0:  # smooth noise: coarse random grid upsampled, plus fine grain
        coarse = rng.normal(0.0, 18.0, size=(height // 32 + 2, width // 32 + 2, 3))
        smooth = np.stack(
            [
                np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize((width, height), Image.BILINEAR))
                for c in range(3)
            ],
            axis=-1,
        )
        texture = base + smooth + rng.normal(0.0, 4.0, size=(height, width, 3))
    elif kind == 1:  # linear gradient between two muted colours, in a random direction
        other = rng.uniform(low + 30, high - 30, size=3)
        angle = rng.uniform(0.0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        texture = base + (other - base) * t[..., None]
    else:  # stripes of two close colours, at one of four angles
        period = int(rng.integers(8, 25))
        angle = int(rng.integers(4))
        ys, xs = np.mgrid[0:height, 0:width]
        coordinate = (xs, ys, xs + ys, xs - ys)[angle]
        stripe = (coordinate // (period // 2)) % 2
        offset = rng.uniform(-25.0, 25.0, size=3)
        texture = base + offset * stripe[..., None]
    return np.clip(np.rint(texture), low, high).astype(np.uint8)


def _shape_mask(
    rng: np.random.Generator, kind: str, width: int, height: int, x0: int, y0: int, w: int, h: int
) -> np.ndarray:
    """Boolean (H, W) mask of one shape drawn inside the w x h cell at (x0, y0), without anti-aliasing."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + w - 1, y0 + h - 1  # Pillow's shape corners are inclusive pixel coordinates
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif kind == "triangle":
        direction = int(rng.integers(4))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        points = (
            [(cx, y0), (x0, y1), (x1, y1)],  # up
            [(x0, y0), (x1, y0), (cx, y1)],  # down
            [(x0, cy), (x1, y0), (x1, y1)],  # left
            [(x0, y0), (x1, cy), (x0, y1)],  # right
        )[direction]
        draw.polygon(points, fill=255)
    elif kind == "cross":
        thickness = max(4, round(min(w, h) / 3))
        cx, cy = x0 + (w - thickness) // 2, y0 + (h - thickness) // 2
        draw.rectangle((cx, y0, cx + thickness - 1, y1), fill=255)
        draw.rectangle((x0, cy, x1, cy + thickness - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(canvas) > 0


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """An object colour far from the mean background under the object (the farthest of 3 random candidates)."""
    mean = under.reshape(-1, 3).astype(np.float64).mean(axis=0)
    candidates = rng.choice(len(_OBJECT_COLOURS), size=3, replace=False)
    distances = [np.linalg.norm(_OBJECT_COLOURS[c].astype(np.float64) - mean) for c in candidates]
    return _OBJECT_COLOURS[candidates[int(np.argmax(distances))]]


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap
