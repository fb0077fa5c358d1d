"""Training-time data pipeline: keep-ratio resize, horizontal flip, multi-scale, a torch Dataset and batch samplers.

Where resizing happens. The detector's own input transform resizes (and normalises and pads to a multiple of 32)
every image and maps its detections back to the original frame, so `DetectionTorchDataset` by default does *not*
resize (``resize=False``): it returns the decoded image at its original size with boxes in that frame, flipped in
training. ``resize=True`` moves the keep-ratio resize into the data loader (worker processes) for a trainer that
wants it there; the model's transform then finds the image already at scale. Either way the dataset never normalises
or pads.

Flip order. mmdetection resizes, then flips the resized image: x1' = W - x2, x2' = W - x1 with W the resized width
(no -1). With ``resize=True`` the dataset does exactly that, bit for bit (OpenCV's bilinear arithmetic, mmcv's sizes;
checked against mmdetection's recorded training inputs). With ``resize=False`` the flip comes first, at the original
size: boxes then differ from mmdetection's by float rounding only ((W - x) * s = W' - x * s), and OpenCV's resize is
mirror-symmetric up to its fixed-point rounding (1 level at about 1e-4 of the pixels, measured on COCO images).

Masks. With ``with_masks=True`` the targets also carry instance masks, rasterised at the decoded image's size and
then resized and flipped with the image: nearest-neighbour, as mmcv rescales masks (`resize_masks`).

Determinism. Every random choice takes an explicit `random.Random`. The dataset derives one per sample from
``(seed, epoch, index)``, so a sample's augmentation does not depend on worker count, worker scheduling or where a
resumed run starts. The batch samplers are a pure function of ``(seed, epoch)`` and can start at any batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from cascade_rcnn.data.dataset import DetectionDataset
from cascade_rcnn.data.image_io import load_image
from cascade_rcnn.data.masks import record_masks
from cascade_rcnn.errors import DatasetError
from cascade_rcnn.modeling.transform import resize_bilinear_cv2, resize_masks


def keep_ratio_scale(height: int, width: int, short: int, long: int) -> float:
    """Factor fitting an image into (short, long): short side to `short` unless the long side would pass `long`."""
    return min(short / min(height, width), long / max(height, width))


def resize_keep_ratio(
    image: torch.Tensor, boxes: torch.Tensor, short: int, long: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize a (3, H, W) image (values 0..255) and its boxes, keeping the aspect ratio, to fit (short, long), as
    mmdetection's `Resize(keep_ratio=True)`.

    The output size is ``int(H * s + 0.5), int(W * s + 0.5)`` with ``s = keep_ratio_scale(...)`` (mmcv `imrescale`),
    the pixels OpenCV's bilinear resize of the 8-bit image (`resize_bilinear_cv2`: float32, integer-valued), and the
    boxes are scaled by the exact per-axis factors ``W'/W`` and ``H'/H``, then clipped to the resized image.

    Returns:
        (image (3, H', W'), boxes (N, 4) in the resized frame, scale_factor (2,) float32 ``[W'/W, H'/H]``).
    """
    height, width = image.shape[-2:]
    scale = keep_ratio_scale(height, width, short, long)
    new_height, new_width = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    if (new_height, new_width) == (height, width):
        resized = image.float()
    else:
        resized = resize_bilinear_cv2(image, (new_height, new_width))
    scale_factor = torch.tensor([new_width / width, new_height / height], dtype=torch.float32)
    boxes = boxes * scale_factor.repeat(2)
    limits = torch.tensor([new_width, new_height], dtype=boxes.dtype).repeat(2)
    return resized, torch.minimum(boxes.clamp(min=0), limits), scale_factor


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror a (C, H, W) image and its (N, 4) xyxy boxes left-right: x -> W - x, so x1' = W - x2, x2' = W - x1 with W
    the image's width (pixel edges, no -1: mmdetection's `HorizontalBoxes.flip_`)."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


def choose_short_side(rng: random.Random, scale: tuple[int, int], short_sides: Sequence[int] | None) -> int:
    """The short side for one training sample: one of `short_sides` at random (multi-scale), else ``scale[0]``."""
    return rng.choice(list(short_sides)) if short_sides else scale[0]


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of one sample in one epoch; independent of workers and of where a resumed run starts."""
    # A str seed is hashed with SHA-512 by random.Random, reproducibly across processes (unlike hash() of a tuple).
    return random.Random(f"{seed}:{epoch}:{index}")


class DetectionTorchDataset(Dataset):
    """A `DetectionDataset` as a torch Dataset of ``(image, target)`` pairs for training or evaluation.

    Item ``i`` is:

    - image: (3, H, W) float32 RGB in 0..255 (not normalised), at the original size, or at the keep-ratio
      `scale` when ``resize=True``;
    - target: ``boxes`` (N, 4) float32 xyxy in that image's frame, ``labels`` (N,) int64 in 0..C-1, ``iscrowd``
      (N,) bool, ``image_id`` int64 scalar, ``orig_size`` (2,) int64 ``[H, W]`` of the decoded image, and
      ``scale_factor`` (2,) float32 ``[sx, sy]`` from the original to the returned frame (ones without resize);
      with ``with_masks=True`` also ``masks`` (N, H, W) uint8 0/1, one per box in the returned image's frame (all
      zeros for a box without a segmentation).

    In training (``train=True``) the image is flipped left-right with probability `flip_prob` (after the resize, when
    the dataset resizes; see the module docstring), and with
    `multiscale_short_sides` each sample draws its short side from that list (only meaningful with ``resize=True``).
    Call `set_epoch` at the start of each epoch so augmentation differs between epochs.

    Raises (from __getitem__):
        ImageReadError: the image cannot be decoded (the message names the file).
        DatasetError: the decoded image's size differs from the record's (its boxes would be misplaced).
        ValueError: (with_masks) a record's segmentation is malformed; the loaders never let one through.
    """

    def __init__(
        self,
        dataset: DetectionDataset,
        train: bool,
        scale: tuple[int, int] = (800, 1333),
        flip_prob: float = 0.5,
        multiscale_short_sides: Sequence[int] | None = None,
        resize: bool = False,
        seed: int = 0,
        with_masks: bool = False,
    ) -> None:
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.dataset = dataset
        self.train = train
        self.scale = (int(scale[0]), int(scale[1]))
        self.flip_prob = flip_prob
        self.multiscale_short_sides = tuple(multiscale_short_sides) if multiscale_short_sides else None
        self.resize = resize
        self.seed = seed
        self.with_masks = with_masks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch` (DataLoader workers copy this at the start of each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = self.dataset.records[index]
        path = self.dataset.image_root / record.file_name
        array = load_image(path)
        height, width = array.shape[:2]
        if record.width is not None and record.height is not None and (width, height) != (record.width, record.height):
            raise DatasetError(
                f"{path}: image id {record.image_id} decodes to {width}x{height} but the annotations say "
                f"{record.width}x{record.height}; its boxes would be misplaced"
            )
        image = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32)
        boxes = torch.from_numpy(record.boxes.copy())
        masks = torch.from_numpy(record_masks(record, height, width)) if self.with_masks else None
        rng = sample_rng(self.seed, self.epoch, index)
        scale_factor = torch.ones(2, dtype=torch.float32)
        if self.resize:
            short = choose_short_side(rng, self.scale, self.multiscale_short_sides) if self.train else self.scale[0]
            image, boxes, scale_factor = resize_keep_ratio(image, boxes, short, self.scale[1])
            masks = resize_masks(masks, image.shape[-2:]) if masks is not None else None
        if self.train and rng.random() < self.flip_prob:
            image, boxes = hflip(image, boxes)
            masks = masks.flip(-1) if masks is not None else None
        target = {
            "boxes": boxes,
            "labels": torch.from_numpy(record.labels.copy()),
            "iscrowd": torch.from_numpy(record.iscrowd.copy()),
            "image_id": torch.tensor(record.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "scale_factor": scale_factor,
        }
        if masks is not None:
            target["masks"] = masks
        return image, target


def collate_fn(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Keep a batch as per-image lists: images differ in size, and the model pads them itself."""
    return [image for image, _ in batch], [target for _, target in batch]


def aspect_ratio_groups(dataset: DetectionDataset) -> list[int]:
    """Group id of each record: 0 for landscape or square (w >= h), 1 for portrait.

    Records of unknown size go to group 0 (every built-in parser fills sizes in).
    """
    return [
        0 if record.width is None or record.height is None or record.width >= record.height else 1
        for record in dataset.records
    ]


class AspectRatioGroupedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices in which all images share an orientation (w >= h, or w < h).

    Grouping keeps padding small: a landscape and a portrait image padded to a common canvas waste half of it.

    Order. Each epoch shuffles all indices with a generator seeded by ``(seed, epoch)`` (or keeps them in order with
    ``shuffle=False``), walks them, and emits a group's batch as soon as it has `batch_size` indices; the leftover
    partial batches come last, group 0 first, unless `drop_last`. The batch list is thus a pure function of
    ``(indices, groups, batch_size, seed, epoch)``.

    Distributed use. With ``world_size > 1`` the epoch's batch list (the same on every rank) is dealt round-robin:
    rank r takes batches r, r + world_size, ... Every rank must step the same number of times, so the list is padded
    by repeating its first batches (or cut, with `drop_last`) to a multiple of `world_size`. Global step k then
    trains on batches ``k * world_size ... k * world_size + world_size - 1`` together.

    Resuming. `start_index` (here, or through `set_epoch`) is the number of this rank's batches of the current epoch
    already consumed; iteration continues with the next one, so a run resumed mid-epoch sees exactly the batches an
    uninterrupted run would. It applies to one epoch only: the next `set_epoch` starts at 0 unless told otherwise.
    """

    def __init__(
        self,
        group_ids: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        start_index: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.group_ids = [int(g) for g in group_ids]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.start_index = 0
        self.set_epoch(epoch, start_index)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the order of `epoch`, skipping its first `start_index` batches of this rank."""
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.epoch = epoch
        self.start_index = start_index

    def epoch_batches(self) -> list[list[int]]:
        """All batches of this rank for the current epoch, from the first (ignores `start_index`)."""
        batches = self._global_batches()
        if self.world_size > 1:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            elif batches and len(batches) % self.world_size:
                padding = self.world_size - len(batches) % self.world_size
                # Repeating whole batches (rather than single indices) keeps every batch within one group.
                batches = batches + [batches[i % len(batches)] for i in range(padding)]
            batches = batches[self.rank :: self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches()[self.start_index :]

    def __len__(self) -> int:
        """Number of batches this iteration yields (after `start_index`)."""
        return max(0, len(self.epoch_batches()) - self.start_index)

    def _global_batches(self) -> list[list[int]]:
        order = list(range(len(self.group_ids)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(len(order), generator=generator).tolist()
        buckets: dict[int, list[int]] = {}
        batches = []
        for index in order:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket[:])
                bucket.clear()
        if not self.drop_last:
            batches.extend(bucket[:] for _, bucket in sorted(buckets.items()) if bucket)
        return batches


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct (seed, epoch) pairs give distinct generator seeds for any realistic epoch count (< 2**20).
    return ((int(seed) << 20) + int(epoch)) & (2**63 - 1)
