"""Mask heads, targets, loss and pasting: invariants on tiny models and hand-made masks (parity with the peers is in
test_mask_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_rcnn.config import get_preset
from cascade_rcnn.modeling.detector import build_model
from cascade_rcnn.modeling.masks import MaskHead, mask_targets, paste_masks
from cascade_rcnn.modeling.transform import resize_masks
from helpers import tiny_config

MMDET = {"mask.heads": "per_stage", "postprocess.rescale": "divide_after_nms"}


def tiny_mask_model(heads: str = "per_stage", seed: int = 0):
    torch.manual_seed(seed)
    rescale = "divide_after_nms" if heads == "per_stage" else "after_nms"
    return build_model(tiny_config(**{"mask.heads": heads, "postprocess.rescale": rescale}))


def rectangle_target(h: int = 100, w: int = 150) -> dict[str, torch.Tensor]:
    masks = torch.zeros((2, h, w), dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    masks[1, 5:25, 100:140] = 1
    return {
        "boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0], [100.0, 5.0, 140.0, 25.0]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
    }


def test_mask_head_shapes_and_layout() -> None:
    head = MaskHead(in_channels=8, conv_dim=16, num_convs=4, num_classes=5)
    assert head(torch.randn(3, 8, 14, 14)).shape == (3, 5, 28, 28)
    # The transposed conv's weight is (in, out, kh, kw), as both peers store it.
    assert head.upsample.weight.shape == (16, 16, 2, 2) and head.logits.weight.shape == (5, 16, 1, 1)


def test_mask_presets_build_the_peers_heads() -> None:
    mmdet = get_preset("cascade_mask_rcnn_r50_fpn")
    d2 = get_preset("cascade_mask_rcnn_r50_fpn_detectron2")
    assert (mmdet.mask.heads, mmdet.postprocess.rescale) == ("per_stage", "divide_after_nms")
    assert (d2.mask.heads, d2.postprocess.rescale) == ("single", "after_nms")
    assert not get_preset("cascade_rcnn_r50_fpn").has_masks
    assert build_model(tiny_config()).mask_heads is None


def test_mask_targets_pool_the_gt_mask_over_each_roi() -> None:
    gt = rectangle_target()["masks"]
    rois = torch.tensor([
        [0.0, 30.0, 20.0, 90.0, 60.0],  # exactly the first mask: all ones
        [0.0, 0.0, 20.0, 60.0, 60.0],  # its left half lies outside the mask
        [0.0, 100.0, 5.0, 140.0, 25.0],  # the second mask
    ])
    targets = mask_targets(rois, torch.tensor([0, 0, 1]), [gt], 28)
    assert targets.shape == (3, 28, 28)
    assert targets[0].eq(1).all() and targets[2].eq(1).all()
    assert targets[1, :, :14].eq(0).all() and targets[1, :, 14:].eq(1).all()


def test_paste_of_a_uniform_map_fills_exactly_the_box() -> None:
    """Cell centres sit half a cell inside the box and the map fades to 0 half a cell outside them: a map of ones
    reaches 0.5 exactly at the box edges, so the pixels whose centres lie in the box are set, no others."""
    probs = torch.ones((2, 28, 28))
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 5.0, 3.0]])
    masks = paste_masks(probs, boxes, (50, 60))
    expected = torch.zeros((2, 50, 60), dtype=torch.bool)
    expected[0, 20:40, 10:30] = True
    expected[1, 0:3, 0:5] = True
    assert masks.equal(expected)
    assert paste_masks(torch.zeros((0, 28, 28)), torch.zeros((0, 4)), (5, 6)).shape == (0, 5, 6)


def grid_sample_paste(probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The peers' CPU paste written with torch's own `grid_sample` (zero padding, align_corners=False), box by box
    over the box + 1 px, >= 0.5: the oracle of `paste_masks_array`."""
    h, w = image_size
    masks = torch.zeros((len(probs), h, w), dtype=torch.bool)
    for i, box in enumerate(boxes):
        x0, y0 = (box[:2].floor() - 1).clamp(min=0).long().tolist()
        x1, y1 = int(min(float(box[2].ceil()) + 1, w)), int(min(float(box[3].ceil()) + 1, h))
        if x1 <= x0 or y1 <= y0:
            continue

        def axis(pixels: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
            grid = ((pixels.float() + 0.5) - start) / (end - start) * 2 - 1
            return torch.where(torch.isinf(grid), torch.zeros_like(grid), grid)

        xs, ys = axis(torch.arange(x0, x1), box[0], box[2]), axis(torch.arange(y0, y1), box[1], box[3])
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=2)
        sampled = torch.nn.functional.grid_sample(probs[i][None, None], grid[None], mode="bilinear",
                                                  padding_mode="zeros", align_corners=False)
        masks[i, y0:y1, x0:x1] = sampled[0, 0] >= 0.5
    return masks


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"),
                    reason="grid_sample's fused multiply-adds are those of torch's AVX2 / AVX-512 kernels")
def test_numpy_paste_is_grid_samples_bit_for_bit() -> None:
    """`paste_masks_array` (numpy, what every backend runs) equals torch's grid_sample paste on every pixel: boxes
    of every size (zero-size, 1e-6, sub-pixel, larger than the image), partly or wholly outside the image, integer
    boxes, 7 / 14 / 28 cells, probabilities tied with the threshold. Dropping the fused multiply-adds of torch's
    kernel (plain float32 products and sums) changes pixels here."""
    from cascade_rcnn.paste import paste_masks_array

    gen = torch.Generator().manual_seed(0)
    compared = 0
    for trial in range(240):
        h, w = torch.randint(5, 160, (2,), generator=gen).tolist()
        xy = torch.rand(20, 2, generator=gen) * torch.tensor([w, h]) * 1.2 - 10
        wh = torch.rand(20, 2, generator=gen) ** 3 * 150
        wh[:3] = 0 if trial % 3 == 0 else wh[:3]
        wh[3:5] = 1e-6 if trial % 5 == 0 else wh[3:5]
        boxes = torch.cat([xy, xy + wh], dim=1)
        boxes = boxes.round() if trial % 7 == 0 else boxes
        size = (7, 14, 28)[trial % 3]
        probs = torch.rand(20, size, size, generator=gen)
        probs = (probs * 4).round() / 4 if trial % 4 == 0 else probs
        mine = paste_masks_array(probs.numpy(), boxes.numpy(), (h, w))
        assert mine.dtype == bool and mine.shape == (20, h, w)
        np.testing.assert_array_equal(mine, grid_sample_paste(probs, boxes, (h, w)).numpy(), err_msg=f"trial {trial}")
        compared += int(mine.sum())
    assert compared > 100_000


def test_paste_of_a_non_finite_box_is_an_empty_mask() -> None:
    from cascade_rcnn.paste import paste_masks_array

    boxes = np.array([[np.nan, 2, 9, 9], [1, 2, np.inf, 9], [-np.inf, 0, 5, 5], [1, 1, 8, 8]], np.float32)
    masks = paste_masks_array(np.ones((4, 28, 28), np.float32), boxes, (12, 12))
    assert not masks[:3].any() and masks[3, 1:8, 1:8].all() and masks[3].sum() == 49


def test_resize_masks_nearest() -> None:
    masks = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8)
    assert resize_masks(masks, (4, 4)).equal(masks.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert resize_masks(masks, (2, 2)) is masks


def test_training_losses_reach_every_mask_head() -> None:
    model = tiny_mask_model().train()
    images = [torch.rand(3, 100, 150) * 255]
    losses = model(images, [rectangle_target()])
    assert {"loss_mask_stage0", "loss_mask_stage1", "loss_mask_stage2"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.mask_heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_single_head_trains_on_the_first_stage_only() -> None:
    model = tiny_mask_model("single").train()
    losses = model([torch.rand(3, 100, 150) * 255], [rectangle_target()])
    assert [k for k in losses if k.startswith("loss_mask")] == ["loss_mask_stage0"]


def test_image_without_objects_gives_a_zero_mask_loss() -> None:
    model = tiny_mask_model().train()
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64),
              "masks": torch.zeros((0, 100, 150), dtype=torch.uint8)}
    losses = model([torch.rand(3, 100, 150) * 255], [target])
    # Ground truth is added as proposals, so only an image without objects has no positives.
    assert all(float(losses[f"loss_mask_stage{s}"].detach()) == 0.0 for s in range(3))
    sum(losses.values()).backward()


def test_mask_model_needs_masks_in_its_targets() -> None:
    model = tiny_mask_model().train()
    target = rectangle_target()
    del target["masks"]
    with pytest.raises(ValueError, match="masks"):
        model([torch.rand(3, 100, 150) * 255], [target])


def test_crowd_rows_do_not_shift_the_masks() -> None:
    """Masks are indexed by target row: a crowd box placed before a gt must not hand its mask to that gt."""
    model = tiny_mask_model().train()
    base = rectangle_target()
    crowded = {
        "boxes": torch.cat([torch.tensor([[0.0, 0.0, 50.0, 50.0]]), base["boxes"]]),
        "labels": torch.cat([torch.tensor([0]), base["labels"]]),
        "iscrowd": torch.tensor([True, False, False]),
        "masks": torch.cat([torch.ones((1, 100, 150), dtype=torch.uint8), base["masks"]]),
    }
    image = torch.rand(3, 100, 150) * 255
    torch.manual_seed(1)
    plain = model([image], [base])
    torch.manual_seed(1)
    with_crowd = model([image], [crowded])
    for stage in range(3):
        key = f"loss_mask_stage{stage}"
        torch.testing.assert_close(plain[key], with_crowd[key])


def test_predicted_masks_are_in_original_pixels_and_batched_equals_single() -> None:
    model = tiny_mask_model().eval()
    # Same size: images padded to another canvas see other features near the border.
    images = [torch.rand(3, 100, 150) * 255, torch.rand(3, 100, 150) * 255]
    batched = model.predict(images)
    for image, det in zip(images, batched):
        assert det.masks.shape == (len(det), *image.shape[-2:]) and det.masks.dtype == torch.bool
        single = model.predict([image])[0]
        # Batched convolutions sum in another order: boxes agree to float rounding, masks up to a boundary pixel.
        torch.testing.assert_close(single.boxes, det.boxes, rtol=0, atol=5e-3)
        assert int((single.masks ^ det.masks).flatten(1).sum(1).max()) <= 4
        # A pasted mask never reaches more than one pixel beyond its box.
        for mask, box in zip(det.masks, det.boxes):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs):
                assert xs.min() >= box[0].floor() - 1 and xs.max() < box[2].ceil() + 1
                assert ys.min() >= box[1].floor() - 1 and ys.max() < box[3].ceil() + 1
    kept = batched[0].filter(float(batched[0].scores.median()))
    assert kept.masks.shape[0] == len(kept)


def test_cli_trains_a_mask_preset_on_coco128_masks(tmp_path) -> None:
    """Real COCO polygons, RLE and crowd masks (coco128 train) through the dataset, the flip, the model's resize and the
    mask loss of every stage, by the `train` command."""
    import json

    from helpers import require_coco128
    from test_training_fixtures import run_cli

    coco128 = require_coco128()
    out = tmp_path / "run"
    done = run_cli(
        "train", "--preset", "cascade_mask_rcnn_r50_fpn",
        "--train-images", str(coco128 / "train2017"),
        "--train-annotations", str(coco128 / "annotations" / "instances_train2017.json"),
        "--output-dir", str(out), "--batch-size", "2", "--max-iters", "2", "--workers", "0", "--progress", "off",
        "--set", "model.transform.min_size=128", "--set", "model.transform.max_size=192",
        "--set", "model.rpn.post_nms_top_n_train=200", "--set", "model.cascade.batch_size_per_image=64",
        "--set", "train.calibration_images=2", "--set", "train.log_interval=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert len(logged) == 2
    for record in logged:
        mask_losses = [record[f"loss_mask_stage{s}"] for s in range(3)]
        assert all(0.0 < value < 100.0 for value in mask_losses), record
