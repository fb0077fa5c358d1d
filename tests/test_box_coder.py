import math

import pytest
import torch

from cascade_rcnn.modeling.box_coder import BoxCoder, clip_boxes


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 500
    wh = torch.rand(n, 2, generator=generator) * 200 + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2), (0.033, 0.033, 0.067, 0.067)])
@pytest.mark.parametrize("plus_one", [False, True])
def test_encode_decode_round_trip(stds, plus_one):
    g = torch.Generator().manual_seed(0)
    proposals, gt = random_boxes(200, g), random_boxes(200, g)
    coder = BoxCoder(stds, scale_clamp=math.log(1000 / 16) * 10, plus_one=plus_one)
    decoded = coder.decode(coder.encode(gt, proposals), proposals)
    torch.testing.assert_close(decoded, gt, atol=1e-3, rtol=1e-5)


def test_known_delta_values():
    coder = BoxCoder((0.1, 0.1, 0.2, 0.2))
    proposal = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[5.0, 0.0, 15.0, 40.0]])
    # centre moves by half a width in x and half a height in y; height doubles.
    expected = torch.tensor([[0.5 / 0.1, 0.5 / 0.1, 0.0, math.log(2) / 0.2]])
    torch.testing.assert_close(coder.encode(gt, proposal), expected)


def test_decode_clamps_scale_and_clips_to_image():
    coder = BoxCoder()
    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    huge = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    out = coder.decode(huge, box)
    w = out[0, 2] - out[0, 0]
    assert torch.isclose(w, torch.tensor(10 * 1000 / 16))  # exp clamped to 1000/16
    clipped = coder.decode(huge, box, max_shape=(30, 40))
    assert clipped.min() >= 0 and clipped[0, 2] <= 40 and clipped[0, 3] <= 30


def test_class_specific_decode_shape():
    coder = BoxCoder()
    deltas = torch.zeros(5, 4 * 3)
    boxes = random_boxes(5, torch.Generator().manual_seed(1))
    out = coder.decode(deltas, boxes)
    assert out.shape == (5, 12)
    for k in range(3):
        torch.testing.assert_close(out[:, 4 * k : 4 * k + 4], boxes)


def test_clip_boxes_per_box_limits_equal_scalar_limits():
    boxes = torch.tensor([[-5.0, -5.0, 700.0, 500.0], [-1.0, 3.0, 50.0, 900.0]])
    per_box = clip_boxes(boxes, torch.tensor([[400.0, 600.0], [800.0, 40.0]]))
    torch.testing.assert_close(per_box[0], clip_boxes(boxes[:1], (400, 600))[0])
    torch.testing.assert_close(per_box[1], clip_boxes(boxes[1:], (800, 40))[0])
