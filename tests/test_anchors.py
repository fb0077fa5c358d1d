import torch

from cascade_rcnn.modeling.anchors import (
    AnchorGenerator,
    base_anchors,
    grid_anchors,
    inside_anchor_flags,
    valid_anchor_flags,
)


def test_base_anchors_hand_computed():
    # stride 4, scale 8 -> side 32; ratio h/w = 0.5 -> w = 32 * sqrt(2), h = 32 / sqrt(2); centred on (0, 0).
    anchors = base_anchors(4, (8.0,), (0.5, 1.0, 2.0), 0.0, False)
    s = 2**0.5
    expected = torch.tensor(
        [
            [-16 * s, -16 / s, 16 * s, 16 / s],
            [-16.0, -16.0, 16.0, 16.0],
            [-16 / s, -16 * s, 16 / s, 16 * s],
        ]
    )
    torch.testing.assert_close(anchors, expected)


def test_legacy_v1_anchors_are_rounded_and_centred_on_pixel_centre():
    anchors = base_anchors(16, (8.0,), (1.0,), 0.0, True)
    # centre (16 - 1) / 2 = 7.5, half extent (128 - 1) / 2 = 63.5 -> [-56, -56, 71, 71]
    torch.testing.assert_close(anchors, torch.tensor([[-56.0, -56.0, 71.0, 71.0]]))


def test_grid_order_is_y_then_x_then_anchor():
    base = base_anchors(8, (8.0,), (0.5, 1.0, 2.0), 0.0, False)
    anchors = grid_anchors(base, 8, (2, 3))
    assert anchors.shape == (2 * 3 * 3, 4)
    # index (y * W + x) * A + a
    y, x, a = 1, 2, 1
    torch.testing.assert_close(anchors[(y * 3 + x) * 3 + a], base[a] + torch.tensor([16.0, 8.0, 16.0, 8.0]))


def test_generator_levels_and_sizes():
    gen = AnchorGenerator()
    sizes = [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3)]
    levels = gen(sizes)
    assert [len(l) for l in levels] == [h * w * 3 for h, w in sizes]
    # The square anchor of each level is 8 x stride wide.
    for stride, level in zip(gen.strides, levels):
        wh = level[1, 2:] - level[1, :2]
        torch.testing.assert_close(wh, torch.tensor([8.0 * stride, 8.0 * stride]))


def test_valid_flags_mark_padding_cells_invalid():
    flags = valid_anchor_flags((4, 4), (32, 16), 8, 3, torch.device("cpu")).view(4, 4, 3)
    assert flags[:, :2].all() and not flags[:, 2:].any()


def test_valid_flags_round_the_image_up_to_whole_cells():
    # An 8-row image on stride 16 still owns the first row of cells; 17 columns own two columns of cells.
    flags = valid_anchor_flags((3, 3), (8, 17), 16, 1, torch.device("cpu")).view(3, 3)
    assert flags.tolist() == [[True, True, False], [False, False, False], [False, False, False]]


def test_inside_flags_are_strict_at_the_right_and_bottom_edges():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 99.0, 49.0],  # inside
            [0.0, 0.0, 100.0, 49.0],  # x2 == w: outside (mmdetection keeps x2 < w only)
            [0.0, 0.0, 99.0, 50.0],  # y2 == h: outside
            [-0.5, 0.0, 10.0, 10.0],  # x1 < 0: outside
            [0.0, -0.5, 10.0, 10.0],  # y1 < 0: outside
        ]
    )
    assert inside_anchor_flags(anchors, (50, 100)).tolist() == [True, False, False, False, False]
    assert inside_anchor_flags(anchors, (50, 100), allowed_border=1.0).tolist() == [True] * 5
    assert inside_anchor_flags(anchors, (50, 100), allowed_border=-1).all()  # negative: every anchor
