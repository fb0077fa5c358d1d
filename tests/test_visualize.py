"""draw_detections: same size out, boxes on the edges in the class colour, readable labels, inputs untouched."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rcnn.evaluation.visualize import _relative_luminance, class_color, draw_detections, text_color_for

GRAY = (128, 128, 128)


def _gray(width: int = 200, height: int = 150) -> np.ndarray:
    return np.full((height, width, 3), GRAY, dtype=np.uint8)


def test_output_size_equals_input_and_box_edges_take_the_class_colour() -> None:
    image = _gray(200, 150)
    out = draw_detections(image, torch.tensor([[40.0, 60.0, 120.0, 130.0]]), torch.tensor([0.87]),
                          torch.tensor([2]), ["person", "car", "dog"])  # fmt: skip
    assert out.size == (200, 150) and out.mode == "RGB"
    pixels = np.asarray(out)
    color = class_color(2)
    for x, y in [(40, 90), (120, 90), (80, 130)]:  # left, right, bottom edge
        assert tuple(pixels[y, x]) == color, (x, y)
    assert tuple(pixels[95, 80]) == GRAY  # inside the box
    assert tuple(pixels[5, 190]) == GRAY and tuple(pixels[145, 5]) == GRAY  # far away
    assert not np.array_equal(pixels, image)


def test_label_tag_sits_above_the_box_with_contrasting_text() -> None:
    out = np.asarray(draw_detections(_gray(300, 200), [[50, 100, 250, 190]], [0.5], [0], ["person"]))
    color = class_color(0)
    tag = out[:100, 50:250]  # everything drawn above the box's top edge is the tag
    drawn = np.any(tag != GRAY, axis=-1)
    assert drawn.any()
    tag_pixels = tag[drawn]
    assert (tag_pixels == color).all(axis=-1).mean() > 0.4  # filled background
    text = np.asarray(text_color_for(color))
    # Text pixels: closer to the text colour than to the fill (anti-aliased edges blend the two).
    closer_to_text = np.linalg.norm(tag_pixels - text, axis=-1) < np.linalg.norm(
        tag_pixels - np.asarray(color), axis=-1
    )
    assert closer_to_text.sum() > 20


def test_label_goes_inside_when_box_touches_the_top() -> None:
    out = np.asarray(draw_detections(_gray(200, 150), [[10, 0, 190, 140]], [0.9], [1], ["a", "b"]))
    assert out.shape == (150, 200, 3)
    # The tag is drawn inside the box, just under its top edge.
    assert (out[2:10, 12:30] == class_color(1)).all(axis=-1).any()


def test_score_threshold_and_empty_input_leave_image_unchanged() -> None:
    image = _gray()
    below = draw_detections(image, [[10, 10, 50, 50]], [0.2], [0], ["a"], score_thresh=0.3)
    assert np.array_equal(np.asarray(below), image)
    empty = draw_detections(image, torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long), ["a"])
    assert np.array_equal(np.asarray(empty), image)
    at = draw_detections(image, [[10, 10, 50, 50]], [0.3], [0], ["a"], score_thresh=0.3)
    assert not np.array_equal(np.asarray(at), image)


def test_inputs_are_not_modified() -> None:
    array = _gray()
    array_before = array.copy()
    draw_detections(array, [[10, 10, 50, 50]], [0.9], [0], ["a"])
    assert np.array_equal(array, array_before)
    pil = Image.fromarray(_gray())
    draw_detections(pil, [[10, 10, 50, 50]], [0.9], [0], ["a"])
    assert np.array_equal(np.asarray(pil), _gray())


def test_any_mode_and_grayscale_array_become_rgb() -> None:
    for image in (
        Image.new("L", (64, 48), 100),
        Image.new("RGBA", (64, 48), (0, 0, 0, 0)),
        np.zeros((48, 64), np.uint8),
    ):
        out = draw_detections(image, [[5, 5, 40, 40]], [0.9], [0], ["a"])
        assert out.mode == "RGB" and out.size == (64, 48)


def test_boxes_partly_outside_and_unknown_labels_are_drawn_without_error() -> None:
    out = draw_detections(_gray(100, 80), [[-20, -10, 150, 30], [90, 70, 140, 120]], [0.9, 0.8], [0, 7], ["a"])
    assert out.size == (100, 80)
    with pytest.raises(ValueError, match="disagree in length"):
        draw_detections(_gray(), [[0, 0, 1, 1]], [0.9, 0.8], [0], ["a"])


def test_line_width_grows_with_image_size() -> None:
    def edge_thickness(size: int) -> int:
        box = [size * 0.25, size * 0.4, size * 0.75, size * 0.9]
        out = np.asarray(draw_detections(_gray(size, size), [box], [0.9], [0], ["a"]))
        row = out[int(size * 0.65)]  # a row through the box's middle: only the two vertical edges are drawn
        return int(np.any(row != GRAY, axis=-1).sum()) // 2

    assert edge_thickness(200) < edge_thickness(1600)


def test_class_colours_distinct_and_text_readable() -> None:
    colors = [class_color(label) for label in range(80)]
    assert len(set(colors)) == 80
    # Labels within a few steps of each other (often co-occurring classes) are far apart in RGB.
    assert min(math.dist(colors[i], colors[j]) for i, j in itertools.combinations(range(80), 2) if j - i < 8) > 60

    def contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
        la, lb = sorted((_relative_luminance(a), _relative_luminance(b)), reverse=True)
        return (la + 0.05) / (lb + 0.05)

    for color in colors:
        assert contrast(color, text_color_for(color)) >= 4.5  # WCAG AA for normal text
    assert text_color_for((255, 255, 0)) == (0, 0, 0)
    assert text_color_for((0, 0, 128)) == (255, 255, 255)
