"""Resize/flip keep boxes on their objects; the torch Dataset is deterministic; batch samplers group, shard, resume."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rcnn.data import DetectionDataset, ImageRecord
from cascade_rcnn.data.transforms import (
    AspectRatioGroupedBatchSampler,
    DetectionTorchDataset,
    aspect_ratio_groups,
    choose_short_side,
    collate_fn,
    hflip,
    keep_ratio_scale,
    resize_keep_ratio,
)
from cascade_rcnn.errors import DatasetError

# (width, height, box) of each test image: a white box on black, so the box can be found again in the pixels.
IMAGES = [(64, 48, (10, 6, 30, 20)), (40, 80, (3, 50, 20, 79)), (50, 50, (0, 0, 12, 50))]


def bright_box(image: torch.Tensor) -> tuple[int, int, int, int]:
    """xyxy extent of pixels above mid-grey in a (3, H, W) image."""
    ys, xs = torch.nonzero(image.mean(0) > 127.5, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture
def dataset(tmp_path: Path) -> DetectionDataset:
    records = []
    for index, (width, height, box) in enumerate(IMAGES):
        pixels = np.zeros((height, width, 3), np.uint8)
        x1, y1, x2, y2 = box
        pixels[y1:y2, x1:x2] = 255
        Image.fromarray(pixels).save(tmp_path / f"{index}.png")
        records.append(ImageRecord(f"{index}.png", index + 1, width, height, [box], [index % 2], [False]))
    return DetectionDataset(tmp_path, records, ("a", "b"), (1, 2))


def test_keep_ratio_scale_fits_short_side_unless_long_side_overflows():
    assert keep_ratio_scale(480, 640, 800, 1333) == pytest.approx(800 / 480)
    assert keep_ratio_scale(100, 1000, 800, 1333) == pytest.approx(1333 / 1000)  # long side binds


def test_resize_scales_boxes_with_the_image():
    image = torch.zeros(3, 30, 40)
    image[:, 6:18, 8:24] = 255.0
    boxes = torch.tensor([[8.0, 6.0, 24.0, 18.0]])
    resized, out_boxes, factor = resize_keep_ratio(image, boxes, 60, 1000)
    assert resized.shape == (3, 60, 80)
    torch.testing.assert_close(factor, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(out_boxes, torch.tensor([[16.0, 12.0, 48.0, 36.0]]))
    assert bright_box(resized) == (16, 12, 48, 36)
    assert boxes.tolist() == [[8.0, 6.0, 24.0, 18.0]]  # input not mutated


def test_resize_uses_exact_per_axis_factors_after_rounding():
    image = torch.zeros(3, 33, 47)
    _, boxes, factor = resize_keep_ratio(image, torch.tensor([[0.0, 0.0, 47.0, 33.0]]), 50, 1000)
    new_w, new_h = round(47 * 50 / 33), 50
    torch.testing.assert_close(factor, torch.tensor([new_w / 47, new_h / 33]))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, float(new_w), float(new_h)]]))


def test_hflip_moves_boxes_with_the_pixels_and_is_an_involution():
    image = torch.zeros(3, 20, 50)
    image[:, 2:9, 5:17] = 255.0
    boxes = torch.tensor([[5.0, 2.0, 17.0, 9.0]])
    flipped, flipped_boxes = hflip(image, boxes)
    assert bright_box(flipped) == tuple(int(v) for v in flipped_boxes[0].tolist()) == (33, 2, 45, 9)
    back, back_boxes = hflip(flipped, flipped_boxes)
    torch.testing.assert_close(back, image)
    torch.testing.assert_close(back_boxes, boxes)


def test_choose_short_side():
    rng = random.Random(0)
    assert choose_short_side(rng, (800, 1333), None) == 800
    picks = {choose_short_side(rng, (800, 1333), (480, 640, 800)) for _ in range(50)}
    assert picks == {480, 640, 800}


def test_eval_item_is_original_size_with_record_boxes(dataset):
    torch_dataset = DetectionTorchDataset(dataset, train=False)
    for index, (width, height, box) in enumerate(IMAGES):
        image, target = torch_dataset[index]
        assert image.dtype == torch.float32 and image.shape == (3, height, width)
        assert float(image.max()) == 255.0
        assert target["boxes"].tolist() == [list(map(float, box))]
        assert bright_box(image) == box
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [index % 2]
        assert target["iscrowd"].dtype == torch.bool
        assert int(target["image_id"]) == index + 1
        assert target["orig_size"].tolist() == [height, width]
        assert target["scale_factor"].tolist() == [1.0, 1.0]


def test_training_flip_keeps_boxes_on_objects_and_is_deterministic(dataset):
    torch_dataset = DetectionTorchDataset(dataset, train=True, flip_prob=0.5, seed=3)
    flips = 0
    for epoch in range(6):
        torch_dataset.set_epoch(epoch)
        for index, (_, _, box) in enumerate(IMAGES):
            image, target = torch_dataset[index]
            again_image, again_target = torch_dataset[index]
            torch.testing.assert_close(image, again_image)
            torch.testing.assert_close(target["boxes"], again_target["boxes"])
            out_box = tuple(int(v) for v in target["boxes"][0].tolist())
            assert bright_box(image) == out_box
            flips += out_box != box
    assert 0 < flips < 18  # both outcomes happen over 6 epochs x 3 images
    assert dataset.records[0].boxes.tolist() == [[10, 6, 30, 20]]  # the record is never modified


def test_resize_option_and_multiscale(dataset):
    torch_dataset = DetectionTorchDataset(
        dataset, train=True, scale=(96, 200), multiscale_short_sides=(64, 96), resize=True, flip_prob=0.0
    )
    shorts = set()
    for epoch in range(8):
        torch_dataset.set_epoch(epoch)
        image, target = torch_dataset[0]  # 64x48 landscape
        short = image.shape[1]
        shorts.add(short)
        assert image.shape[2] == round(64 * short / 48)
        sx, sy = target["scale_factor"].tolist()
        assert target["boxes"][0].tolist() == pytest.approx([10 * sx, 6 * sy, 30 * sx, 20 * sy])
        assert target["orig_size"].tolist() == [48, 64]
    assert shorts == {64, 96}
    evaluation = DetectionTorchDataset(dataset, train=False, scale=(96, 200), resize=True)
    assert evaluation[1][0].shape == (3, 192, 96)  # 40x80 portrait: short side 96, long 192 <= 200


def test_record_size_disagreeing_with_the_image_is_an_error(dataset):
    dataset.records[0].width = 65
    with pytest.raises(DatasetError, match="decodes to 64x48 but the annotations say 65x48"):
        DetectionTorchDataset(dataset, train=False)[0]


def test_collate_keeps_lists(dataset):
    torch_dataset = DetectionTorchDataset(dataset, train=False)
    images, targets = collate_fn([torch_dataset[0], torch_dataset[1]])
    assert [tuple(i.shape) for i in images] == [(3, 48, 64), (3, 80, 40)]
    assert [int(t["image_id"]) for t in targets] == [1, 2]


def test_aspect_ratio_groups(dataset):
    assert aspect_ratio_groups(dataset) == [0, 1, 0]  # 64x48 landscape, 40x80 portrait, 50x50 square


# --- batch samplers -------------------------------------------------------------------------------------------------

GROUPS = [i % 3 == 0 for i in range(23)]  # 8 portrait, 15 landscape


def test_batches_are_grouped_cover_every_index_once_and_depend_only_on_seed_and_epoch():
    sampler = AspectRatioGroupedBatchSampler(GROUPS, batch_size=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert all(len({GROUPS[i] for i in b}) == 1 for b in batches)
    assert all(len(b) == 4 for b in batches[:-2])  # only the two leftover batches may be short
    assert batches == list(AspectRatioGroupedBatchSampler(GROUPS, batch_size=4, seed=1))
    assert batches != list(AspectRatioGroupedBatchSampler(GROUPS, batch_size=4, seed=2))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches


def test_drop_last_and_no_shuffle():
    dropped = list(AspectRatioGroupedBatchSampler(GROUPS, batch_size=4, drop_last=True, seed=1))
    assert all(len(b) == 4 for b in dropped) and len(dropped) == 8 // 4 + 15 // 4
    ordered = list(AspectRatioGroupedBatchSampler(GROUPS, batch_size=4, shuffle=False))
    assert ordered[0] == [1, 2, 4, 5]  # indices in order, landscape ones (not multiples of 3) fill first


def test_start_index_resumes_exactly_where_the_epoch_stopped():
    full = list(AspectRatioGroupedBatchSampler(GROUPS, batch_size=3, seed=7, epoch=4))
    for start in (0, 1, 5, len(full)):
        resumed = AspectRatioGroupedBatchSampler(GROUPS, batch_size=3, seed=7, epoch=4, start_index=start)
        assert list(resumed) == full[start:]
        assert len(resumed) == len(full) - start
    # The offset is for the resumed epoch only.
    resumed.set_epoch(5)
    assert list(resumed) == list(AspectRatioGroupedBatchSampler(GROUPS, batch_size=3, seed=7, epoch=5))


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_ranks_deal_the_global_batch_list(drop_last):
    world = 3
    global_batches = list(AspectRatioGroupedBatchSampler(GROUPS, batch_size=2, seed=0, epoch=2, drop_last=drop_last))
    per_rank = [
        list(AspectRatioGroupedBatchSampler(GROUPS, 2, seed=0, epoch=2, drop_last=drop_last, rank=r, world_size=world))
        for r in range(world)
    ]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank steps the same number of times
    steps = len(per_rank[0])
    dealt = [per_rank[r][k] for k in range(steps) for r in range(world)]
    if drop_last:
        assert dealt == global_batches[: steps * world]
    else:
        assert dealt[: len(global_batches)] == global_batches  # then padding repeats the first batches
        assert dealt[len(global_batches) :] == global_batches[: len(dealt) - len(global_batches)]
        assert {i for b in dealt for i in b} == set(range(23))
    resumed = AspectRatioGroupedBatchSampler(GROUPS, 2, seed=0, epoch=2, drop_last=drop_last, rank=1, world_size=world)
    resumed.set_epoch(2, start_index=2)
    assert list(resumed) == per_rank[1][2:]


def test_sampler_argument_checks():
    with pytest.raises(ValueError):
        AspectRatioGroupedBatchSampler(GROUPS, 0)
    with pytest.raises(ValueError):
        AspectRatioGroupedBatchSampler(GROUPS, 2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        AspectRatioGroupedBatchSampler(GROUPS, 2, start_index=-1)
