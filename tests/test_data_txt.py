"""The seed's txt format: `<file> x1,y1,x2,y2,label,iscrowd ...`, 1-based labels, the empty placeholder, bad lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_rcnn.data import load_coco, load_txt, write_coco
from cascade_rcnn.errors import DatasetError


def make_images(root: Path, names: list[str], size: tuple[int, int] = (64, 48)) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (1, 2, 3)).save(root / name)
    return root


def test_seed_lines_labels_crowd_and_empty_placeholder(tmp_path):
    images = make_images(tmp_path / "img", ["0001.jpg", "0002.jpg", "0003.jpg"])
    ann = tmp_path / "train.txt"
    ann.write_text(
        "0001.jpg 1,2,30,40,1,0 10,10,20,20,2,1\n"
        "0002.jpg 0,0,0,0,0,1\n"  # the seed's placeholder for "no objects"
        "\n"
        "0003.jpg\n"  # no boxes at all: negative too
    )
    dataset = load_txt(ann, images, ["cat", "dog"])
    assert [r.image_id for r in dataset.records] == [1, 2, 3]
    first = dataset.records[0]
    np.testing.assert_array_equal(first.boxes, [[1, 2, 30, 40], [10, 10, 20, 20]])
    np.testing.assert_array_equal(first.labels, [0, 1])  # file labels 1..C (0 is the seed's background)
    np.testing.assert_array_equal(first.iscrowd, [False, True])
    assert (first.width, first.height) == (64, 48)
    assert len(dataset.records[1].boxes) == 0 and len(dataset.records[2].boxes) == 0
    assert dataset.category_ids == (1, 2)
    assert [r.image_id for r in load_txt(ann, images, ["cat", "dog"], keep_empty=False).records] == [1]
    zero_based = load_txt(ann, images, ["cat", "dog", "bird"], label_base=0)
    np.testing.assert_array_equal(zero_based.records[0].labels, [1, 2])


def test_every_problem_is_reported_with_line_and_box(tmp_path):
    images = make_images(tmp_path / "img", ["a.jpg", "b.jpg", "c.jpg"])
    ann = tmp_path / "train.txt"
    ann.write_text(
        "a.jpg 1,1,10,10,1,0 5,5,2,9,1,0 1,1,10,nan,1,0 1,1,10,10,3,0 1,1,100,10,1,0 1,1,10 1,1,a,10,1,0 1,1,5,5,1,2\n"
        "missing.jpg 1,1,10,10,1,0\n"
        "a.jpg 1,1,10,10,1,0\n"
        "b.jpg 1,1,10,10,0,0\n"  # label 0 is the background slot: unknown
        "c.jpg 1,1,5,5,1.5,0\n"
    )
    with pytest.raises(DatasetError) as info:
        load_txt(ann, images, ["cat", "dog"], box_tolerance=1.0)  # strict: overshoot is a problem too
    problems = info.value.problems
    expected = [
        f"{ann}: line 1 (a.jpg): box 2: box has non-positive size",
        f"{ann}: line 1 (a.jpg): box 3: box has non-finite values",
        f"{ann}: line 1 (a.jpg): box 4: unknown label 3 (classes are 1..2)",
        f"{ann}: line 1 (a.jpg): box 5: box [1, 1, 100, 10] is outside the 64x48 image",
        f"{ann}: line 1 (a.jpg): box 6: '1,1,10' has 3 fields, expected 6",
        f"{ann}: line 1 (a.jpg): box 7: '1,1,a,10,1,0' is not 6 comma-separated numbers",
        f"{ann}: line 1 (a.jpg): box 8: iscrowd '2' is not 0 or 1",
        f"{ann}: line 2 (missing.jpg): {images / 'missing.jpg'}: no such file",
        f"{ann}: line 3 (a.jpg): duplicate image (first on line 1)",
        f"{ann}: line 4 (b.jpg): box 1: unknown label 0",
        f"{ann}: line 5 (c.jpg): box 1: label '1.5' is not an integer",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, prefix in zip(problems, expected):
        assert problem.startswith(prefix), (problem, prefix)

    dataset = load_txt(ann, images, ["cat", "dog"], on_error="skip", box_tolerance=1.0)
    # b.jpg and c.jpg lost every box: dropped rather than kept as (false) negatives.
    assert [r.file_name for r in dataset.records] == ["a.jpg"]
    np.testing.assert_array_equal(dataset.records[0].boxes, [[1, 1, 10, 10]])


def test_image_ids_are_stable_when_other_lines_are_bad(tmp_path):
    images = make_images(tmp_path / "img", ["x.jpg", "z.jpg"])
    ann = tmp_path / "t.txt"
    ann.write_text("x.jpg\ny.jpg\nz.jpg\n")  # y.jpg is missing
    dataset = load_txt(ann, images, ["a"], on_error="skip")
    assert [(r.file_name, r.image_id) for r in dataset.records] == [("x.jpg", 1), ("z.jpg", 3)]


def test_unreadable_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="no such annotation file"):
        load_txt(tmp_path / "nope.txt", tmp_path, ["a"])
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="cannot read annotation file"):
        load_txt(tmp_path / "binary.txt", tmp_path, ["a"])


def test_convert_txt_to_coco(tmp_path):
    images = make_images(tmp_path / "img", ["7.jpg"])
    ann = tmp_path / "t.txt"
    ann.write_text("7.jpg 3,4,13,24,2,0\n")
    out = write_coco(load_txt(ann, images, ["cat", "dog"]), tmp_path / "out.json")
    coco = load_coco(out, images)
    assert coco.class_names == ("cat", "dog") and coco.category_ids == (1, 2)
    assert coco.records[0].image_id == 7
    np.testing.assert_array_equal(coco.records[0].boxes, [[3, 4, 13, 24]])
    np.testing.assert_array_equal(coco.records[0].labels, [1])
