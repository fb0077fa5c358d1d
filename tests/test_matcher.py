import logging

import torch
from torchvision.ops import box_iou

from cascade_rcnn.modeling.matcher import (
    BACKGROUND,
    IGNORE,
    Matcher,
    pairwise_iou,
    sample_indices,
    training_gt,
)


def box_with_iou(gt: torch.Tensor, iou: float) -> torch.Tensor:
    """A box sharing gt's left/top/bottom edge whose IoU with gt (10 x 10 at origin) is `iou` (width 10 * iou)."""
    return torch.tensor([0.0, 0.0, 10.0 * iou, 10.0])


def test_thresholds_positive_negative_ignore():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.stack([box_with_iou(gt, v) for v in (0.75, 0.7, 0.69, 0.5, 0.3, 0.29, 0.1)])
    matches = Matcher(0.7, 0.3)(gt, boxes)
    assert matches.tolist() == [0, 0, IGNORE, IGNORE, IGNORE, BACKGROUND, BACKGROUND]


def test_cascade_stage_threshold_has_no_ignore_band():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.stack([box_with_iou(gt, v) for v in (0.6, 0.59)])
    assert Matcher(0.6, 0.6)(gt, boxes).tolist() == [0, BACKGROUND]


def test_low_quality_matches_give_every_gt_its_best_anchor():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    boxes = torch.tensor([[0.0, 0.0, 5.0, 10.0], [100.0, 100.0, 104.0, 110.0], [200.0, 200.0, 210.0, 210.0]])
    # IoUs 0.5 and 0.4: in the ignore band without low-quality matching.
    assert Matcher(0.7, 0.3)(gt, boxes).tolist() == [IGNORE, IGNORE, BACKGROUND]
    # Below the low-quality minimum IoU (0.4 < 0.45) the best anchor is not forced positive.
    assert Matcher(0.7, 0.3, low_quality_min_iou=0.45)(gt, boxes).tolist()[1] == IGNORE
    assert Matcher(0.7, 0.3, low_quality_min_iou=0.3)(gt, boxes).tolist() == [0, 1, BACKGROUND]


def test_low_quality_ties_take_every_best_anchor_and_the_later_gt_wins():
    # Anchors 0 and 1 tie exactly for gt 0's best IoU (0.5): both become its positives.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 5.0, 10.0], [5.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 10.0]])
    assert Matcher(0.7, 0.3, 0.3)(gt, boxes).tolist() == [0, 0, BACKGROUND]
    # The anchor is the best of both gts: the later gt takes it, although its IoU with the earlier one is higher.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 15.0]])
    anchor = torch.tensor([[0.0, 0.0, 10.0, 6.0]])  # IoU 0.6 with gt 0, 0.4 with gt 1
    assert Matcher(0.7, 0.3, 0.3)(gt, anchor).tolist() == [1]
    # Without low-quality matching the anchor's own best gt would have it (as an ignored anchor here).
    assert Matcher(0.7, 0.3)(gt, anchor).tolist() == [IGNORE]


def test_iou_is_mmdetection_bbox_overlaps():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 100
    a = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 50 + 1], dim=1)
    b = a.flip(0) + torch.rand(40, 4, generator=g)
    torch.testing.assert_close(pairwise_iou(a, b), box_iou(a, b), rtol=0, atol=0)
    # Degenerate boxes: 0, not NaN (the union is floored at 1e-6).
    empty = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert pairwise_iou(empty, empty).item() == 0.0


def test_no_gt_means_all_background():
    boxes = torch.rand(5, 4) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert (Matcher(0.5, 0.5)(torch.zeros(0, 4), boxes) == BACKGROUND).all()


def test_crowd_boxes_have_no_effect_by_default_and_ignore_what_they_cover_with_a_threshold():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    crowd = torch.tensor([[50.0, 50.0, 100.0, 100.0]])
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 100.0, 100.0], [60.0, 60.0, 70.0, 70.0], [40.0, 40.0, 60.0, 60.0]]
    )
    plain = Matcher(0.5, 0.5)(gt, boxes)
    assert plain.tolist() == [0, BACKGROUND, BACKGROUND, BACKGROUND]
    assert torch.equal(Matcher(0.5, 0.5)(gt, boxes, crowd), plain)
    # mmdetection's ignore_iof_thr: covered (intersection / box area > 0.5) candidates are ignored; box 3 is 1/4 in.
    assert Matcher(0.5, 0.5, ignore_iof_thresh=0.5)(gt, boxes, crowd).tolist() == [0, IGNORE, IGNORE, BACKGROUND]


def test_training_gt_clips_drops_empty_boxes_and_keeps_crowd_apart(caplog):
    target = {
        "boxes": torch.tensor(
            [
                [-5.0, 10.0, 50.0, 300.0],  # partly outside: clipped to the 100 x 200 (h x w) image
                [20.0, 20.0, 20.0, 40.0],  # zero width: dropped
                [250.0, 10.0, 260.0, 20.0],  # outside: nothing left after clipping, dropped
                [10.0, 10.0, 30.0, 30.0],  # crowd
                [0.0, float("nan"), 5.0, 5.0],  # not a box: dropped
            ]
        ),
        "labels": torch.tensor([1, 2, 3, 4, 5]),
        "iscrowd": torch.tensor([False, False, False, True, False]),
    }
    with caplog.at_level(logging.WARNING, logger="cascade_rcnn.modeling.matcher"):
        boxes, labels, crowd = training_gt(target, (100, 200))
    assert boxes.tolist() == [[0.0, 10.0, 50.0, 100.0]] and labels.tolist() == [1]
    assert crowd.tolist() == [[10.0, 10.0, 30.0, 30.0]]
    assert "dropped 3 ground-truth boxes" in caplog.text
    assert target["boxes"][0].tolist() == [-5.0, 10.0, 50.0, 300.0]  # input not mutated


def test_training_gt_without_iscrowd_and_without_boxes():
    boxes, labels, crowd = training_gt({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}, (8, 8))
    assert boxes.shape == (0, 4) and labels.shape == (0,) and crowd.shape == (0, 4)


def test_sampler_exact_counts():
    matches = torch.cat([torch.zeros(300, dtype=torch.long), torch.full((1000,), BACKGROUND), torch.full((50,), -2)])
    pos, neg = sample_indices(matches, 512, 0.25)
    assert len(pos) == 128 and len(neg) == 384
    assert (matches[pos] >= 0).all() and (matches[neg] == BACKGROUND).all()
    assert len(set(pos.tolist())) == 128 and len(set(neg.tolist())) == 384
    # Few positives: the rest is filled with negatives.
    few = torch.cat([torch.zeros(10, dtype=torch.long), torch.full((1000,), BACKGROUND)])
    pos, neg = sample_indices(few, 256, 0.5)
    assert len(pos) == 10 and len(neg) == 246
    # Not enough of either: take what exists.
    pos, neg = sample_indices(torch.tensor([0, BACKGROUND, IGNORE]), 256, 0.5)
    assert len(pos) == 1 and len(neg) == 1


def test_sampler_takes_a_kind_whole_in_ascending_order_without_drawing():
    matches = torch.randint(-2, 3, (2000,), generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    pos, neg = sample_indices(matches, 10**9, 0.5)
    assert torch.equal(pos, torch.nonzero(matches >= 0).squeeze(1))
    assert torch.equal(neg, torch.nonzero(matches == BACKGROUND).squeeze(1))
    assert torch.equal(torch.get_rng_state(), state)  # mmdetection's RandomSampler draws nothing either
    # Fewer wanted than there are: a random subset, in random order.
    pos, _ = sample_indices(matches, 256, 0.5)
    assert len(pos) == 128 and not torch.equal(pos, pos.sort().values)
