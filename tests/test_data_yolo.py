"""YOLO txt folders: normalised boxes to pixels, negatives, names files, malformed lines, coco128 val vs COCO JSON."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_rcnn.data import load_coco, load_yolo
from cascade_rcnn.errors import DatasetError

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("CASCADE_RCNN_COCO128", REPO_ROOT / ".." / "shared" / "data" / "coco128"))
needs_coco128 = pytest.mark.skipif(
    not (COCO128 / "labels_yolo").is_dir(),
    reason=f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128 to its folder)",
)


def make_yolo(root: Path, labels: dict[str, str | None], size: tuple[int, int] = (200, 100)) -> tuple[Path, Path]:
    """labels: image file name -> label text (None: no label file)."""
    images, label_dir = root / "images", root / "labels"
    for name, text in labels.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (50, 60, 70)).save(images / name)
        if text is not None:
            (label_dir / name).with_suffix(".txt").parent.mkdir(parents=True, exist_ok=True)
            (label_dir / name).with_suffix(".txt").write_text(text)
    label_dir.mkdir(parents=True, exist_ok=True)
    return images, label_dir


def test_normalised_boxes_become_pixels_and_missing_labels_are_negatives(tmp_path):
    images, labels = make_yolo(
        tmp_path,
        {
            "b.jpg": "1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.2 0.2\n",
            "a.png": None,  # no label file: negative
            "sub/c.jpg": "",  # empty label file: negative
            "d.jpg": "1 0.1 0.2 0.3 0.2 0.2 0.6\n",  # a segment line (triangle) -> its tight box
        },
    )
    dataset = load_yolo(images, labels, ["cat", "dog"])
    assert [r.file_name for r in dataset.records] == ["a.png", "b.jpg", "d.jpg", "sub/c.jpg"]
    assert [r.image_id for r in dataset.records] == [1, 2, 3, 4]
    b = dataset.records[1]
    # 200x100 image: cx 0.5 w 0.2 -> x 80..120; cy 0.5 h 0.4 -> y 30..70.
    np.testing.assert_allclose(b.boxes, [[80, 30, 120, 70], [0, 0, 40, 20]], atol=1e-4)
    np.testing.assert_array_equal(b.labels, [1, 0])
    assert not b.iscrowd.any()
    np.testing.assert_allclose(dataset.records[2].boxes, [[20, 20, 60, 60]], atol=1e-4)
    assert len(dataset.records[0].boxes) == 0 and len(dataset.records[3].boxes) == 0
    assert dataset.category_ids == (1, 2)
    assert [r.file_name for r in load_yolo(images, labels, ["cat", "dog"], keep_empty=False).records] == [
        "b.jpg",
        "d.jpg",
    ]


def test_every_malformed_line_is_reported_with_its_line_number(tmp_path):
    images, labels = make_yolo(
        tmp_path,
        {
            "a.jpg": "\n".join(
                [
                    "0 0.5 0.5 0.2 0.2",  # 1 good
                    "0 0.5 0.5 0.2",  # 2 too few fields
                    "x 0.5 0.5 0.2 0.2",  # 3 not a number
                    "5 0.5 0.5 0.2 0.2",  # 4 unknown class
                    "0 nan 0.5 0.2 0.2",  # 5 NaN
                    "0 0.5 0.5 -0.2 0.2",  # 6 negative size
                    "0 1.5 0.5 0.2 0.2",  # 7 outside the image
                    "1.5 0.5 0.5 0.2 0.2",  # 8 fractional class
                    "0 0.5 0.5 0.2 0.2 0.9",  # 9 six fields (a prediction with a score?)
                    "1 0.5 0.5 inf 0.2",  # 10 infinite
                ]
            ),
            "b.jpg": "0 0.5 0.5 0 0.2",  # the only line is bad: image dropped in skip mode
        },
    )
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1")
    with pytest.raises(DatasetError) as info:
        load_yolo(images, labels, ["cat", "dog"])
    problems = info.value.problems
    a, b = labels / "a.txt", labels / "b.txt"
    expected = [
        f"{labels / 'orphan.txt'}: label file has no image",
        f"{a}: line 2: expected 5 fields",
        f"{a}: line 3: not all fields are numbers",
        f"{a}: line 4: unknown class 5 (the names list has 2 classes)",
        f"{a}: line 5: box has non-finite values",
        f"{a}: line 6: box has non-positive size",
        f"{a}: line 7: box [",
        f"{a}: line 8: class '1.5' is not an integer",
        f"{a}: line 9: expected 5 fields",
        f"{a}: line 10: box has non-finite values",
        f"{b}: line 1: box has non-positive size",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, prefix in zip(problems, expected):
        assert problem.startswith(prefix), (problem, prefix)
    assert "outside the 200x100 image" in problems[6]

    dataset = load_yolo(images, labels, ["cat", "dog"], on_error="skip")
    assert dataset.problems == problems
    assert [r.file_name for r in dataset.records] == ["a.jpg"]
    np.testing.assert_allclose(dataset.records[0].boxes, [[80, 40, 120, 60]], atol=1e-4)


def test_unreadable_image_is_a_problem(tmp_path):
    images, labels = make_yolo(tmp_path, {"a.jpg": "0 0.5 0.5 0.2 0.2"})
    (images / "broken.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        load_yolo(images, labels, ["cat"])
    assert info.value.problems == [f"{images / 'broken.jpg'}: empty file (0 bytes)"]


def test_names_from_text_and_yaml_files(tmp_path):
    images, labels = make_yolo(tmp_path, {"a.jpg": "2 0.5 0.5 0.2 0.2"})
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n\n")
    (tmp_path / "list.yaml").write_text("path: x\nnames: [cat, dog, bird]\n")
    (tmp_path / "map.yaml").write_text("names:\n  0: cat\n  1: dog\n  2: bird\n")
    for names in ("names.txt", "list.yaml", "map.yaml"):
        dataset = load_yolo(images, labels, tmp_path / names)
        assert dataset.class_names == ("cat", "dog", "bird"), names
        assert dataset.records[0].labels.tolist() == [2]


@pytest.mark.parametrize(
    ("file_name", "text", "fragment"),
    [
        ("gap.yaml", "names:\n  0: cat\n  2: dog\n", "keys 0..1"),
        ("none.yaml", "nc: 3\n", "no 'names'"),
        ("bad.yaml", "names: [cat\n", "malformed YAML"),
        ("dupe.txt", "cat\ncat\n", "appears more than once"),
        ("empty.txt", "\n", "no class names"),
    ],
)
def test_bad_names_files(tmp_path, file_name, text, fragment):
    images, labels = make_yolo(tmp_path, {"a.jpg": None})
    (tmp_path / file_name).write_text(text)
    with pytest.raises(DatasetError, match=fragment):
        load_yolo(images, labels, tmp_path / file_name)


def test_box_in_exif_rotated_image_uses_the_upright_size(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 200x100, shown 100x200
    Image.new("RGB", (200, 100)).save(images / "r.jpg", exif=exif.tobytes())
    (labels / "r.txt").write_text("0 0.5 0.5 1.0 1.0\n")
    record = load_yolo(images, labels, ["x"]).records[0]
    assert (record.width, record.height) == (100, 200)
    np.testing.assert_allclose(record.boxes, [[0, 0, 100, 200]])


@needs_coco128
def test_coco128_val_yolo_labels_match_the_coco_json():
    yolo = load_yolo(COCO128 / "val2017", COCO128 / "labels_yolo" / "val2017", COCO128 / "labels_yolo" / "names.txt")
    coco = load_coco(COCO128 / "annotations" / "instances_val2017.json", COCO128 / "val2017")
    assert sum(len(r.boxes) for r in yolo.records) == 898
    assert sum(len(r.boxes) for r in coco.records) == 898
    # YOLO index i is the i-th COCO category by ascending id, which is also our contiguous label i.
    assert yolo.class_names == coco.class_names
    by_name = {r.file_name: r for r in coco.records}
    assert set(by_name) == {r.file_name for r in yolo.records}
    worst = 0.0
    for record in yolo.records:
        other = by_name[record.file_name]
        assert record.image_id == other.image_id  # ids come from the numeric file names
        assert (record.width, record.height) == (other.width, other.height)
        # Compare as sets of (label, box): sort both by label then coordinates.
        a = np.column_stack([record.labels, record.boxes])
        b = np.column_stack([other.labels, other.boxes])
        a, b = a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]
        np.testing.assert_array_equal(a[:, 0], b[:, 0])
        worst = max(worst, float(np.abs(a[:, 1:] - b[:, 1:]).max()))
    assert worst < 0.02, worst


@needs_coco128
def test_coco128_train_yolo_labels_have_two_unlabelled_images():
    dataset = load_yolo(
        COCO128 / "train2017", COCO128 / "labels_yolo" / "train2017", COCO128 / "labels_yolo" / "names.txt"
    )
    assert len(dataset) == 128
    assert sorted(r.image_id for r in dataset.records if len(r.boxes) == 0) == [250, 508]
    assert sum(len(r.boxes) for r in dataset.records) == 929  # 939 COCO annotations minus the 10 crowd regions
