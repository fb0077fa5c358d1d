import torch

from cascade_rcnn.modeling.matcher import BACKGROUND, IGNORE, Matcher, sample_indices


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


def test_no_gt_means_all_background():
    boxes = torch.rand(5, 4) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert (Matcher(0.5, 0.5)(torch.zeros(0, 4), boxes) == BACKGROUND).all()


def test_crowd_boxes_never_positive_and_ignore_what_they_cover():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 100.0, 100.0]])
    crowd = torch.tensor([False, True])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 100.0, 100.0], [60.0, 60.0, 70.0, 70.0], [300.0, 300.0, 310.0, 310.0]])
    matches = Matcher(0.5, 0.5)(gt, boxes, crowd)
    assert matches.tolist() == [0, IGNORE, IGNORE, BACKGROUND]


def test_sampler_exact_counts():
    matches = torch.cat([torch.zeros(300, dtype=torch.long), torch.full((1000,), BACKGROUND), torch.full((50,), IGNORE)])
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
