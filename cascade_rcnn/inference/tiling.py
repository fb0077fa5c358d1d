"""Sliced (tiled) inference: small objects in large images, found by detecting on overlapping slices.

    image (H, W) -> windows of `size` x `size` px whose neighbours share `int(overlap * size)` px, the last row and
          column flush with the image's edge [+ the whole image, box-reduced towards the model's input size]
          -> each slice through the model's own flow (its resize, detect, per-class NMS), `batch_size` at a time
          -> boxes shifted into image pixels -> merged across slices

A slice is resized by the model's transform like any image, so a slice of about the model's training image size is
seen at its native scale (the demo's 256 px model: `size=256`; a COCO model resizes a 512 px slice to 800 px).

Merge rule: greedy non-maximum merging (SAHI's default `GREEDYNMM`) on intersection over the smaller box (IOS) >=
`match_thresh` (0.5), class by class, between detections of different slices. Why not NMS: an object cut by a slice
border is found whole in one slice and in part in its neighbour; the part lies inside the whole, so its IoU with it is
only its area fraction (NMS at 0.5 keeps both whenever more than half is cut off) while its IOS is 1. Why merge rather
than suppress: an object wider than the overlap is cut in every slice that holds it; its pieces share the overlap
strip (IOS >= 0.5 when the strip is at least half the smaller piece) and their union is the object. As SAHI's
`greedy_nmm` and `GreedyNMMPostprocess`: in decreasing score, each detection not yet taken takes every remaining one
of its class whose IOS with it is >= `match_thresh`; they are folded into it in decreasing score, each only while its
IOS with the box merged so far is still >= `match_thresh` (box: the union; score and class: the best's). Unlike SAHI,
two detections of the same slice are never merged: the model's NMS already decided between them, and IOS would join
an object with a part-detection of its neighbour or with a low-score box around both (the union would then grow past
the object). Two slices' detections can only meet where the slices overlap, so candidate pairs are looked for only
among detections whose boxes share a cell of a grid of `size` px, not among all pairs.

Memory: slices are cut from the 8-bit image and made float32 one batch at a time; the whole-image pass reduces the
8-bit image by an integer box filter (a mean over k x k blocks, k = the largest integer factor that keeps it at least
the model's input size), a band of rows at a time, before the model's own resize. Peak memory beyond the decoded image
is therefore one batch of slices (and one band), whatever the image size; only the list of detections grows with the
image (at most the model's `detections_per_image` per slice).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cascade_rcnn.errors import ConfigError
from cascade_rcnn.structures import Detections

logger = logging.getLogger(__name__)

MAX_OVERLAP = 0.9
# Rows of the 8-bit image the whole-image reduction converts to float32 at a time are chosen to hold about this many
# pixels (x 3 channels x 4 bytes: ~48 MB), so its memory does not grow with the image.
_BAND_PIXELS = 4_000_000

DetectFn = Callable[[list[Tensor]], list[Detections]]


@dataclass(frozen=True)
class TileConfig:
    """Sliced inference settings.

    size: slice side in image pixels (square slices; cut to the image along an axis shorter than it). overlap: the
    fraction of `size` neighbouring slices share, in [0, 0.9]. full_image: also detect on the whole image at the
    model's normal input size (finds objects larger than a slice). batch_size: slices per forward pass.
    match_thresh: the IOS at which detections of different slices are merged (see the module docstring).
    """

    size: int = 512
    overlap: float = 0.2
    full_image: bool = False
    batch_size: int = 4
    match_thresh: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"--tile {self.size!r}: the slice size must be a positive number of pixels")
        if not (math.isfinite(self.overlap) and 0.0 <= self.overlap <= MAX_OVERLAP):
            raise ConfigError(f"--tile-overlap {self.overlap}: must be in [0, {MAX_OVERLAP}] (a fraction of the slice)")
        if self.batch_size < 1:
            raise ConfigError(f"tile batch_size {self.batch_size}: must be at least 1")
        if not 0.0 < self.match_thresh <= 1.0:
            raise ConfigError(f"tile match_thresh {self.match_thresh}: must be in (0, 1]")

    @property
    def step(self) -> int:
        """Pixels between the starts of neighbouring slices (SAHI's: size - int(overlap * size))."""
        return max(1, self.size - int(self.overlap * self.size))

    def check_model(self, largest_stride: int) -> None:
        """A slice must hold at least one cell of the model's coarsest feature map."""
        if self.size < largest_stride:
            raise ConfigError(f"--tile {self.size}: smaller than the model's largest stride ({largest_stride} px); "
                              f"use a slice of at least {largest_stride} px")  # fmt: skip

    def describe(self) -> dict[str, object]:
        """What a metrics file records of this tiling."""
        return {"size": self.size, "overlap": self.overlap, "full_image": self.full_image,
                "merge": f"greedy NMM, IOS >= {self.match_thresh}, per class (SAHI GREEDYNMM)"}  # fmt: skip


def slice_starts(length: int, size: int, step: int) -> list[int]:
    """Start of each slice along an axis of `length` px: 0, step, 2 step ... and a last one flush with the end (one
    slice of the whole axis when it is not longer than `size`)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def slice_windows(height: int, width: int, config: TileConfig) -> list[tuple[int, int, int, int]]:
    """The slices of an (height, width) image as (x0, y0, x1, y1) pixel windows, row by row."""
    ys = slice_starts(height, config.size, config.step)
    xs = slice_starts(width, config.size, config.step)
    return [(x, y, min(x + config.size, width), min(y + config.size, height)) for y in ys for x in xs]


def as_hwc(image: np.ndarray | Tensor) -> Tensor:
    """An image as an (H, W, 3) tensor view without copying its pixels: an (H, W, 3|4) or (H, W) array, or a (3, H, W)
    tensor."""
    if isinstance(image, np.ndarray):
        with warnings.catch_warnings():  # a read-only array (a memory map) is fine: slices are only ever read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            pixels = torch.from_numpy(image)
        if pixels.dim() == 2:
            return pixels[:, :, None].expand(-1, -1, 3)
        if pixels.dim() != 3 or pixels.shape[2] not in (3, 4):
            raise ConfigError(f"expected an (H, W, 3) image array, got shape {tuple(image.shape)}")
        return pixels[:, :, :3]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ConfigError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    return image.permute(1, 2, 0)


def crop(pixels: Tensor, window: tuple[int, int, int, int]) -> Tensor:
    """The (3, h, w) float32 contiguous copy of `pixels` ((H, W, 3), any dtype) inside `window` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = window
    return pixels[y0:y1, x0:x1].permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)


def reduce_image(pixels: Tensor, factor: int) -> Tensor:
    """(H, W, 3) image -> (3, H // factor, W // factor) float32: the mean of each factor x factor block (a box filter,
    Pillow's `Image.reduce`), computed a band of rows at a time; the last H % factor rows and W % factor columns are
    left out. `factor` 1 is a plain float32 copy."""
    h, w = pixels.shape[0] // factor, pixels.shape[1] // factor
    out = torch.empty((3, h, w), dtype=torch.float32)
    rows = max(1, _BAND_PIXELS // max(1, w * factor * factor))
    for start in range(0, h, rows):
        stop = min(h, start + rows)
        band = pixels[start * factor : stop * factor, : w * factor].to(torch.float32)
        out[:, start:stop] = band.reshape(stop - start, factor, w, factor, 3).mean(dim=(1, 3)).permute(2, 0, 1)
    return out


def merge_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    sources: Tensor | None = None,
    match_thresh: float = 0.5,
    cell: float = 512.0,
) -> Detections:
    """Greedy non-maximum merging with intersection over the smaller box (see the module docstring).

    boxes (N, 4) xyxy, scores (N,), labels (N,) -> merged detections sorted by decreasing score. `sources` (N,): the
    slice each detection comes from; detections of the same slice are never merged with each other (the model's NMS
    already decided between them; merging there would only join neighbouring objects); None: any two may merge, as
    SAHI's `GreedyNMMPostprocess`. Candidate pairs are the same-class boxes sharing a cell of a `cell`-px grid (boxes
    larger than a cell are paired with every box), so the work follows the detections' local density, not N^2.
    """
    n = boxes.shape[0]
    if n == 0:
        return Detections(boxes.reshape(0, 4), scores, labels)
    order = scores.argsort(descending=True, stable=True)
    boxes, scores, labels = boxes[order].double(), scores[order], labels[order]
    neighbours = _candidate_pairs(boxes, labels, cell)
    if sources is not None:
        source = sources[order].tolist()
        neighbours = {i: [j for j in js if source[j] != source[i]] for i, js in neighbours.items()}
    box_list = boxes.tolist()
    taken = [False] * n
    kept, merged_boxes = [], []
    for i in range(n):
        if taken[i]:
            continue
        taken[i] = True
        matched = [j for j in neighbours.get(i, ()) if not taken[j] and _ios(box_list[i], box_list[j]) >= match_thresh]
        merged = box_list[i]
        for j in matched:  # ascending index = decreasing score
            taken[j] = True
            if _ios(merged, box_list[j]) >= match_thresh:
                merged = [min(merged[0], box_list[j][0]), min(merged[1], box_list[j][1]),
                          max(merged[2], box_list[j][2]), max(merged[3], box_list[j][3])]  # fmt: skip
        kept.append(i)
        merged_boxes.append(merged)
    index = torch.tensor(kept, dtype=torch.int64)
    out_boxes = torch.tensor(merged_boxes, dtype=torch.float64).to(torch.float32)
    return Detections(out_boxes.reshape(-1, 4), scores[index], labels[index])


def _ios(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection of boxes a and b (xyxy) over the smaller one's area (0 when either is empty)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def _candidate_pairs(boxes: Tensor, labels: Tensor, cell: float) -> dict[int, list[int]]:
    """For each box index, the larger indices of same-class boxes sharing a grid cell with it (ascending)."""
    first = torch.floor(boxes[:, :2] / cell).long()
    last = torch.floor(boxes[:, 2:].clamp_min(boxes[:, :2]) / cell).long()
    span = last - first + 1
    large = (span[:, 0] * span[:, 1]) > 4  # boxes of a slice touch at most 2 x 2 cells; a whole-image box, more
    cells: dict[tuple[int, int, int], list[int]] = {}
    small_index = torch.nonzero(~large).squeeze(1).tolist()
    f, s, lab = first.tolist(), span.tolist(), labels.tolist()
    for i in small_index:
        for dy in range(s[i][1]):
            for dx in range(s[i][0]):
                cells.setdefault((lab[i], f[i][0] + dx, f[i][1] + dy), []).append(i)
    pairs: dict[int, set[int]] = {}
    for members in cells.values():  # members ascending: appended in index order
        for a_pos, a in enumerate(members):
            if a_pos + 1 < len(members):
                pairs.setdefault(a, set()).update(members[a_pos + 1 :])
    for i in torch.nonzero(large).squeeze(1).tolist():
        same = torch.nonzero(labels == labels[i]).squeeze(1).tolist()
        for j in same:
            if j != i:
                pairs.setdefault(min(i, j), set()).add(max(i, j))
    return {i: sorted(js) for i, js in pairs.items()}


def predict_tiled(
    pixels: Tensor,
    config: TileConfig,
    detect: DetectFn,
    *,
    full_image_size: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    name: str = "slices",
) -> Detections:
    """Detections of one (H, W, 3) image (`as_hwc`; any dtype, values 0-255) by sliced inference, in its pixels.

    `detect` runs the model on a list of (3, h, w) float32 images on `device` (`tta.detect_boxes` or `predict_tta`
    bound to a model). An image no larger than a slice on both sides is run whole (the stated fallback). With
    `config.full_image`, the image is also detected whole, box-reduced first by the largest integer factor that keeps
    it at least `full_image_size` (the (h, w) the model resizes it to). `progress` shows a bar over the slices.
    """
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    if height <= config.size and width <= config.size:
        return detect([crop(pixels, (0, 0, width, height)).to(device)])[0].to("cpu")
    windows = slice_windows(height, width, config)
    found = _Collected()
    bar = _progress_bar(len(windows) + int(config.full_image), name) if progress else None
    try:
        for start in range(0, len(windows), config.batch_size):
            chunk = windows[start : start + config.batch_size]
            outputs = detect([crop(pixels, window).to(device) for window in chunk])
            for index, ((x0, y0, _, _), det) in enumerate(zip(chunk, outputs), start=start):
                found.add(det, (x0, y0), index)
            if bar is not None:
                bar.update(len(chunk))
        if config.full_image:
            target_h, target_w = full_image_size if full_image_size is not None else (height, width)
            factor = max(1, min(height // max(target_h, 1), width // max(target_w, 1)))
            det = detect([reduce_image(pixels, factor).to(device)])[0].to("cpu")
            found.add(Detections(det.boxes * factor, det.scores, det.labels), (0, 0), len(windows))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    boxes, scores, labels, sources = found.tensors()
    return merge_detections(boxes, scores, labels, sources=sources, match_thresh=config.match_thresh,
                            cell=float(config.size))  # fmt: skip


class _Collected:
    """The detections of every slice, in image pixels, gathered in arrays that grow by doubling: a few large blocks
    rather than thousands of small tensors kept alive between forward passes (which pin the allocator's heap, so the
    memory of each pass's activations is not reused and the process grows with the number of slices)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.count = 0
        self.boxes = np.empty((capacity, 4), np.float32)
        self.scores = np.empty(capacity, np.float32)
        self.labels = np.empty(capacity, np.int64)
        self.sources = np.empty(capacity, np.int64)

    def add(self, det: Detections, offset: tuple[int, int], source: int) -> None:
        """Append one slice's detections, shifted by its (x0, y0) `offset`; `source`: the slice's index."""
        n = len(det)
        if self.count + n > len(self.scores):
            size = max(2 * len(self.scores), self.count + n)
            for name in ("boxes", "scores", "labels", "sources"):
                old = getattr(self, name)
                grown = np.empty((size, *old.shape[1:]), old.dtype)
                grown[: self.count] = old[: self.count]
                setattr(self, name, grown)
        end = self.count + n
        x0, y0 = offset
        self.boxes[self.count : end] = det.boxes.cpu().numpy() + np.array([x0, y0, x0, y0], np.float32)
        self.scores[self.count : end] = det.scores.cpu().numpy()
        self.labels[self.count : end] = det.labels.cpu().numpy()
        self.sources[self.count : end] = source
        self.count = end

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """boxes (N, 4) float32, scores (N,), labels (N,) int64, sources (N,) int64."""
        n = self.count
        return tuple(torch.from_numpy(a[:n].copy()) for a in (self.boxes, self.scores, self.labels, self.sources))


def _progress_bar(total: int, name: str):  # noqa: ANN202 - a tqdm bar
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="slice", desc=name, file=sys.stderr, leave=False)
