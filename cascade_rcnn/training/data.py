"""The trainer's view of the data: the training set with per-image sampling seeds, its batches, and the val set.

Parsing, validation, augmentation and the batch sampler are `cascade_rcnn.data`'s; this module only wires them up.
The one addition is `SeededDetectionDataset`: it gives each image a `sample_seed` from (seed, epoch, dataset index),
which the RPN and the cascade heads use to seed that image's anchor and RoI sampling
(`cascade_rcnn.modeling.matcher.sampling_generator`). An image's samples then depend neither on the other images of its batch
nor on the process it is trained in, which makes a distributed step equal to the single-process step on the combined
batch, and resumed runs equal to uninterrupted ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cascade_rcnn.config import PRESETS
from cascade_rcnn.data import DetectionDataset, convert_to_coco, load_dataset
from cascade_rcnn.data.transforms import (
    AspectRatioGroupedBatchSampler,
    DetectionTorchDataset,
    aspect_ratio_groups,
    collate_fn,
)
from cascade_rcnn.errors import ConfigError, DatasetError
from cascade_rcnn.training.config import DataConfig


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 48-bit seed for the sampling of dataset image `index` in `epoch` (stable across processes and platforms)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=6).digest()
    return int.from_bytes(digest, "little")


class SeededDetectionDataset(Dataset):
    """A `DetectionTorchDataset` whose targets also carry `sample_seed` (int64 scalar), see the module docstring."""

    def __init__(self, dataset: DetectionTorchDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, target = self.dataset[index]
        target["sample_seed"] = torch.tensor(sample_seed(self.seed, self.epoch, index), dtype=torch.int64)
        return image, target


def load_split(cfg: DataConfig, split: str) -> DetectionDataset:
    """The "train" or "val" DetectionDataset that `cfg` names."""
    images = getattr(cfg, f"{split}_images")
    annotations = getattr(cfg, f"{split}_annotations")
    if not images or not annotations:
        raise ConfigError(f"data.{split}_images and data.{split}_annotations must both be set")
    split_file = getattr(cfg, f"{split}_split") or None
    return load_dataset(
        cfg.format,
        images,
        annotations,
        names=cfg.names or None,
        split=split_file,
        on_error=cfg.on_error,
        keep_empty=cfg.keep_empty if split == "train" else True,
    )


def report_problems(dataset: DetectionDataset, split: str) -> str | None:
    """A one-paragraph report of what a skip-mode load left out, or None."""
    if not dataset.problems:
        return None
    shown = "\n".join(f"  - {p}" for p in dataset.problems[:20])
    more = f"\n  ... and {len(dataset.problems) - 20} more" if len(dataset.problems) > 20 else ""
    return f"{split}: {len(dataset.problems)} problems, left out (data.on_error = 'skip'):\n{shown}{more}"


def require_masks(dataset: DetectionDataset, cfg: DataConfig, preset: str) -> None:
    """Stop a model with mask heads (`preset`) before training starts when the training set has no masks.

    Raises:
        ConfigError: one line naming the preset, the annotations and a box-only alternative.
    """
    if dataset.has_masks:
        return
    why = "no annotation has a 'segmentation'" if cfg.format == "coco" else "VOC / YOLO / txt data are box-only"
    box_preset = preset.replace("cascade_mask_rcnn", "cascade_rcnn")
    if box_preset != preset and box_preset in PRESETS:
        model, fix = f"the preset {preset}", f"use a box preset such as {box_preset}"
    else:  # a box preset given mask heads by a [model] override
        model, fix = f"model.mask.heads (preset {preset})", "set model.mask.heads = 'none'"
    raise ConfigError(f"{model} needs instance masks, but {cfg.train_annotations} has none ({why}); {fix}")


def build_train_dataset(
    dataset: DetectionDataset, cfg: DataConfig, seed: int, with_masks: bool = False
) -> SeededDetectionDataset:
    """The shuffled, flipped training set; `with_masks` adds the instance masks to the targets (mask heads)."""
    if len(dataset) == 0:
        raise DatasetError("the training set has no images")
    # No resize here: the model's own transform resizes (and multi-scale passes its short side to the model).
    torch_dataset = DetectionTorchDataset(
        dataset, train=True, flip_prob=cfg.flip_prob, resize=False, seed=seed, with_masks=with_masks
    )
    return SeededDetectionDataset(torch_dataset, seed)


def build_batch_sampler(
    dataset: DetectionDataset, batch_size: int, seed: int, rank: int, world_size: int
) -> AspectRatioGroupedBatchSampler:
    """Shuffled, orientation-grouped batches of one process; every process steps the same number of times."""
    return AspectRatioGroupedBatchSampler(
        aspect_ratio_groups(dataset), batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size
    )


def build_loader(
    dataset: SeededDetectionDataset,
    sampler: AspectRatioGroupedBatchSampler,
    num_workers: int,
    generator: torch.Generator,
) -> DataLoader:
    """The loader of one epoch (made anew each epoch, after `set_epoch`, so that workers copy the epoch's state)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=False,
        worker_init_fn=ignore_interrupts if num_workers > 0 else None,
    )


def ignore_interrupts(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which finishes its step and writes a checkpoint first (a
    worker ended by SIGINT would make the loader fail before that)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class ValSet:
    """The validation images and their COCO ground truth (a pycocotools COCO object)."""

    dataset: DetectionDataset
    gt: Any
    category_ids: tuple[int, ...]


def build_val_set(cfg: DataConfig) -> ValSet:
    """Load the val split; its COCO ground truth is the annotation file itself for COCO input (crowd flags and areas
    as annotated), and `convert_to_coco` of the loaded set for the other formats."""
    from pycocotools.coco import COCO

    from cascade_rcnn.evaluation.coco import load_coco_gt

    dataset = load_split(cfg, "val")
    if cfg.format == "coco":
        gt = load_coco_gt(Path(cfg.val_annotations))
    else:
        gt = COCO()
        gt.dataset = convert_to_coco(dataset)
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
    return ValSet(dataset, gt, dataset.category_ids)
