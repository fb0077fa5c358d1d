"""The synthetic shapes dataset: byte-identical for a seed, exactly tight boxes, within the promised ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_rcnn.data import load_coco
from cascade_rcnn.data.synthetic import CLASS_NAMES, make_shapes_dataset, render_sample


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    first = make_shapes_dataset(tmp_path / "a", num_train=6, num_val=3, seed=5)
    make_shapes_dataset(tmp_path / "b", num_train=6, num_val=3, seed=5)
    make_shapes_dataset(tmp_path / "c", num_train=6, num_val=3, seed=6)
    a, b, c = all_bytes(tmp_path / "a"), all_bytes(tmp_path / "b"), all_bytes(tmp_path / "c")
    assert len(a) == 6 + 3 + 2
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert set(first) == {"root", "train_images", "train_annotations", "val_images", "val_annotations"}
    # The splits come from independent streams: train is not a prefix of val or vice versa.
    assert a["train/000001.png"] != a["val/000001.png"]


def test_written_dataset_loads_cleanly_and_matches_the_promises(tmp_path):
    paths = make_shapes_dataset(tmp_path, num_train=12, num_val=2, image_size=(256, 192), seed=0)
    dataset = load_coco(paths["train_annotations"], paths["train_images"], check_sizes=True)
    assert dataset.class_names == CLASS_NAMES and dataset.category_ids == (1, 2, 3, 4)
    assert len(dataset) == 12
    for record in dataset.records:
        assert (record.width, record.height) == (256, 192)
        assert 1 <= len(record.boxes) <= 4
        sides = np.concatenate([record.boxes[:, 2] - record.boxes[:, 0], record.boxes[:, 3] - record.boxes[:, 1]])
        assert sides.min() >= 16 and sides.max() <= 96
        assert not record.iscrowd.any()


@pytest.mark.parametrize("seed", range(4))
def test_boxes_are_exactly_tight_around_the_drawn_pixels(seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        sample = render_sample(rng, (256, 256))
        # Object colours can never equal a background pixel, so "differs from the background" is "object pixel".
        drawn = np.any(sample.image != sample.background, axis=-1)
        inside_some_box = np.zeros_like(drawn)
        for box, area in zip(sample.boxes.astype(int), sample.areas):
            x1, y1, x2, y2 = box
            patch = drawn[y1:y2, x1:x2]
            # Tight: the drawn pixels touch all four sides of the box...
            assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
            assert patch.sum() == area
            inside_some_box[y1:y2, x1:x2] = True
        # ...and nothing is drawn outside the boxes.
        assert not (drawn & ~inside_some_box).any()
        # Boxes keep a gap: no two boxes intersect.
        boxes = sample.boxes
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                overlap_w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
                overlap_h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
                assert overlap_w <= 0 or overlap_h <= 0


@pytest.mark.parametrize("seed", range(2))
def test_masks_are_exactly_the_drawn_pixels(seed):
    """Each object's segmentation (compressed RLE) decodes to its own drawn pixels: the masks are disjoint, each one's
    extent is its box, its pixel count its area, and together they are every pixel that differs from the
    background. Encoding them does not change the image (it draws no random numbers)."""
    from pycocotools import mask as mask_utils

    for _ in range(5):
        sample = render_sample(np.random.default_rng(seed), (256, 200), with_masks=True)
        np.testing.assert_array_equal(render_sample(np.random.default_rng(seed), (256, 200)).image, sample.image)
        drawn = np.any(sample.image != sample.background, axis=-1)
        union = np.zeros_like(drawn)
        assert len(sample.segmentations) == len(sample.boxes) > 0
        for rle, box, area in zip(sample.segmentations, sample.boxes.astype(int), sample.areas):
            assert rle["size"] == [200, 256] and isinstance(rle["counts"], str)
            mask = mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool)
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist() and mask.sum() == area
            assert not (mask & union).any()
            union |= mask
        np.testing.assert_array_equal(union, drawn)
        seed += 100
    with pytest.raises(ValueError, match="not with local"):
        render_sample(np.random.default_rng(0), (256, 256), local=True, with_masks=True)


def test_written_masks_load_as_the_dataset_s_instance_masks(tmp_path):
    from cascade_rcnn.data.masks import record_masks

    paths = make_shapes_dataset(tmp_path, num_train=3, num_val=0, seed=1)
    dataset = load_coco(paths["train_annotations"], paths["train_images"])
    for record in dataset.records:
        masks = record_masks(record, 256, 256)
        assert masks.shape == (len(record.boxes), 256, 256) and (masks.sum(axis=(1, 2)) > 0).all()


def test_saved_png_is_the_rendered_image(tmp_path):
    paths = make_shapes_dataset(tmp_path, num_train=1, num_val=0, seed=3)
    expected = render_sample(np.random.default_rng([3, 0]), (256, 256)).image
    np.testing.assert_array_equal(np.asarray(Image.open(paths["train_images"] / "000001.png")), expected)


def test_every_class_is_drawn_in_many_colours(tmp_path):
    # Classes must be told apart by shape: over a few images, each class appears in more than one colour.
    rng = np.random.default_rng(0)
    colours: dict[int, set[tuple[int, ...]]] = {label: set() for label in range(len(CLASS_NAMES))}
    for _ in range(40):
        sample = render_sample(rng, (256, 256))
        drawn = np.any(sample.image != sample.background, axis=-1)
        for box, label in zip(sample.boxes.astype(int), sample.labels):
            x1, y1, x2, y2 = box
            pixels = sample.image[y1:y2, x1:x2][drawn[y1:y2, x1:x2]]
            colours[int(label)].add(tuple(int(v) for v in pixels[0]))
    assert all(len(c) >= 3 for c in colours.values()), colours


def test_too_small_image_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 112"):
        make_shapes_dataset(tmp_path, num_train=1, num_val=1, image_size=(100, 256))
