"""Instance masks: checking COCO ``segmentation`` values and rasterising them with pycocotools.

A segmentation is COCO's: a list of polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixel coordinates (several polygons
are one object, merged), or an RLE dict ``{"size": [height, width], "counts": ...}`` whose counts are either a list of
run lengths (uncompressed, what COCO uses for crowd regions) or pycocotools' compressed string. An absent or empty
segmentation (None or ``[]``) means "no mask"; whether that is a problem is the dataset's business (see `load_coco`).

Rasterisation is pycocotools' own (`frPyObjects`, `merge`, `decode`, as `COCO.annToMask`), so masks match COCO's
segm evaluation pixel for pixel. Every segmentation is checked before pycocotools sees it: its C code trusts its input
(a polygon point at 1e12 crashes the process, an RLE whose runs sum to less than height * width decodes to
uninitialised memory).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from cascade_rcnn.data.dataset import ImageRecord, is_int, is_number, short_repr


def has_segmentation(segmentation: Any) -> bool:
    """True unless `segmentation` is absent (None or an empty list). Other values are masks, valid or not."""
    return not (segmentation is None or segmentation == [])


def check_segmentation(segmentation: Any, height: int, width: int) -> str | None:
    """What is wrong with a segmentation for a `height` x `width` image, in words, or None when it is usable.

    None and ``[]`` (no mask) are usable. Polygons need at least 3 points (an even count of at least 6 finite numbers)
    and no point farther outside the image than the image's own size (which bounds pycocotools' rasterising work). An
    RLE needs ``size == [height, width]`` and runs that are non-negative and sum to ``height * width``.
    """
    if not has_segmentation(segmentation):
        return None
    if isinstance(segmentation, list):
        return _check_polygons(segmentation, height, width)
    if isinstance(segmentation, dict):
        return _check_rle(segmentation, height, width)
    return f"'segmentation' is a {type(segmentation).__name__}, expected a list of polygons or an RLE object"


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise one segmentation at the image size.

    Returns:
        (height, width) bool, all False for an absent segmentation.

    Raises:
        ValueError: the segmentation fails `check_segmentation` (its reason is the message).
    """
    if not has_segmentation(segmentation):
        return np.zeros((height, width), bool)
    return mask_utils.decode(_to_rle(segmentation, height, width)).astype(bool)


def segmentation_area(segmentation: Any, height: int, width: int) -> float:
    """Pixels inside the rasterised segmentation (pycocotools' `area`; 0 when absent). Raises as
    `segmentation_to_mask`."""
    if not has_segmentation(segmentation):
        return 0.0
    return float(mask_utils.area(_to_rle(segmentation, height, width)))


def record_masks(record: ImageRecord, height: int, width: int) -> np.ndarray:
    """The masks of one image, one per box in box order (crowd rows included).

    Args:
        record: the image; its `segmentations` (None: no masks at all) give one entry per box.
        height, width: the size of the decoded image the masks are drawn for.

    Returns:
        (G, height, width) uint8 0/1, G = len(record.boxes); all zeros for a box without a segmentation.

    Raises:
        ValueError: a segmentation fails `check_segmentation`; the message names the image and the box.
    """
    masks = np.zeros((len(record.boxes), height, width), np.uint8)
    for index, segmentation in enumerate(record.segmentations or ()):
        try:
            masks[index] = segmentation_to_mask(segmentation, height, width)
        except ValueError as error:
            raise ValueError(f"{record.file_name} (image id {record.image_id}): box {index}: {error}") from None
    return masks


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """One RLE of a present segmentation, as `COCO.annToRLE` (checked first: see the module docstring)."""
    reason = check_segmentation(segmentation, height, width)
    if reason:
        raise ValueError(reason)
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _check_polygons(polygons: list, height: int, width: int) -> str | None:
    if all(is_number(v) for v in polygons):
        return "'segmentation' is a flat list of numbers, expected a list of polygons [[x1, y1, x2, y2, ...], ...]"
    for index, polygon in enumerate(polygons):
        where = f"polygon {index}"
        if not isinstance(polygon, list) or not all(is_number(v) for v in polygon):
            return f"{where} is {short_repr(polygon)}, expected a list of numbers [x1, y1, x2, y2, ...]"
        if len(polygon) < 6 or len(polygon) % 2:
            return f"{where} has {len(polygon)} coordinates, expected an even number, at least 6 (3 points)"
        try:
            xs, ys = np.asarray(polygon[0::2], np.float64), np.asarray(polygon[1::2], np.float64)
        except OverflowError:  # a JSON integer beyond float range
            return f"{where} has non-finite coordinates"
        if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
            return f"{where} has non-finite coordinates"
        if xs.min() < -width or xs.max() > 2 * width or ys.min() < -height or ys.max() > 2 * height:
            return f"{where} reaches farther outside the {width}x{height} image than its size"
    return None


def _check_rle(rle: dict, height: int, width: int) -> str | None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
        return f"RLE 'size' is {short_repr(size)}, expected [height, width]"
    if size != [height, width]:
        return f"RLE size {size} differs from the image's [height, width] [{height}, {width}]"
    if isinstance(counts, str):
        runs = _compressed_runs(counts)
        if runs is None:
            return "RLE 'counts' is not a pycocotools compressed string"
    elif isinstance(counts, list) and all(is_int(v) for v in counts):
        runs = counts
    else:
        return f"RLE 'counts' is {short_repr(counts)}, expected a list of run lengths or a compressed string"
    if any(run < 0 for run in runs) or sum(runs) != height * width:
        return f"RLE runs are negative or do not sum to height * width = {height * width}"
    return None


def _compressed_runs(counts: str) -> list[int] | None:
    """The run lengths of a pycocotools compressed RLE string (its `rleFrString`: 5-bit groups offset by 48, a 6th
    continuation bit, sign-extended; each run after the third is stored as its difference to the run two before), or
    None when the string is not one."""
    runs: list[int] = []
    value, shift = 0, 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
        value, shift = 0, 0
    return runs if shift == 0 else None
