"""COCO instances JSON: label mapping, crowd and negatives, every bad entry reported at once, COCO round trip."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_rcnn.data import convert_to_coco, load_coco, write_coco
from cascade_rcnn.errors import DatasetError

REPO_ROOT = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("CASCADE_RCNN_COCO128", REPO_ROOT / ".." / "shared" / "data" / "coco128"))
needs_coco128 = pytest.mark.skipif(
    not (COCO128 / "annotations").is_dir(),
    reason=f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128 to its folder)",
)


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)


def make_coco(tmp_path: Path, images, annotations, categories=None) -> Path:
    data = {
        "images": images,
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))  # json writes NaN/Infinity literals, as a careless exporter would
    return path


def image_entry(image_id: int, file_name: str, width: int = 64, height: int = 48) -> dict:
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}


def ann(ann_id: int, image_id, category_id, bbox, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_image(tmp_path / "images" / name, 64, 48)
    return tmp_path / "images"


def test_valid_file_labels_sorted_by_category_id_boxes_xyxy_crowd_and_negatives(tmp_path, images_dir):
    path = make_coco(
        tmp_path,
        [image_entry(10, "a.png"), image_entry(11, "b.png"), image_entry(12, "c.png")],
        [
            ann(1, 10, 7, [1.5, 2, 10, 20]),
            ann(2, 10, 3, [0, 0, 64, 48], iscrowd=1),
            ann(3, 12, 3, [5, 5, 4, 4], iscrowd=1),  # image 12: crowd only
        ],
    )
    dataset = load_coco(path, images_dir)
    # Category ids 3 < 7: label 0 is 'cat' (id 3), label 1 is 'dog' (id 7), whatever the order in the file.
    assert dataset.class_names == ("cat", "dog")
    assert dataset.category_ids == (3, 7)
    assert [r.image_id for r in dataset.records] == [10, 11, 12]
    first = dataset.records[0]
    np.testing.assert_array_equal(first.boxes, np.array([[1.5, 2, 11.5, 22], [0, 0, 64, 48]], np.float32))
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64 and first.iscrowd.dtype == bool
    np.testing.assert_array_equal(first.labels, [1, 0])
    np.testing.assert_array_equal(first.iscrowd, [False, True])
    assert len(dataset.records[1].boxes) == 0  # negative kept by default
    assert dataset.problems == []
    assert dataset.box_counts() == {"cat": (2, 2), "dog": (1, 0)}

    strict = load_coco(path, images_dir, keep_empty=False)
    # Without negatives, the crowd-only image goes too: it has nothing to learn as a positive.
    assert [r.image_id for r in strict.records] == [10]


def test_ignore_flag_is_a_crowd_region(tmp_path, images_dir):
    path = make_coco(tmp_path, [image_entry(1, "a.png")], [ann(1, 1, 3, [1, 1, 5, 5], ignore=1)])
    assert load_coco(path, images_dir).records[0].iscrowd.tolist() == [True]


def test_every_problem_is_reported_with_file_and_id(tmp_path, images_dir):
    path = make_coco(
        tmp_path,
        [
            image_entry(1, "a.png"),
            image_entry(2, "b.png"),
            image_entry(2, "c.png"),  # duplicate id 2
            image_entry(3, "missing.png"),  # no such file
            image_entry(4, "d.png", width="64"),  # wrong type
            image_entry(5, "d.png"),
        ],
        [
            ann(1, 1, 3, [1, 1, 10, 10]),  # good
            ann(2, 1, 3, [float("nan"), 1, 10, 10]),  # NaN
            ann(3, 1, 7, [5, 5, -3, 10]),  # negative width
            ann(4, 1, 99, [1, 1, 10, 10]),  # unknown category
            ann(5, 1, 3, [50, 40, 30, 30]),  # outside the 64x48 image
            ann(6, 1, 3, "1,1,10,10"),  # wrong type
            ann(7, 1, 3, [1, 1, 0, 5]),  # zero width
            ann(8, 42, 3, [1, 1, 5, 5]),  # unknown image
            ann(8, 1, 3, [2, 2, 5, 5]),  # duplicate annotation id
            ann(9, "1", 3, [1, 1, 5, 5]),  # image_id of the wrong type
            ann(10, 1, 3, [1, 1, float("inf"), 5]),  # infinite
            ann(11, 5, 3, [1, 1, 0, 0]),  # the only annotation of image 5 is bad
        ],
    )
    with pytest.raises(DatasetError) as info:
        load_coco(path, images_dir, box_tolerance=1.0)  # strict: a box 16 px past the border is a problem too
    problems = info.value.problems
    expected_fragments = [
        "image id 2 (b.png): duplicate image id",
        "image id 3 (missing.png): image file",
        "image id 4 (d.png): 'width'/'height'",
        "annotation id 2 (image id 1): box has non-finite values",
        "annotation id 3 (image id 1): box has non-positive size",
        "annotation id 4 (image id 1): unknown category id 99",
        "annotation id 5 (image id 1): box [50, 40, 80, 70] is outside the 64x48 image",
        "annotation id 6 (image id 1): 'bbox' is '1,1,10,10'",
        "annotation id 7 (image id 1): box has non-positive size (w=0",
        "annotation id 8 (image id 42): refers to an image id that is not in 'images'",
        "annotation id 8 (image id 1): duplicate annotation id",
        "annotation id 9: 'image_id' is '1'",
        "annotation id 10 (image id 1): box has non-finite values",
        "annotation id 11 (image id 5): box has non-positive size",
    ]
    assert len(problems) == len(expected_fragments), "\n".join(problems)
    for fragment in expected_fragments:
        matches = [p for p in problems if fragment in p]
        assert len(matches) == 1, f"{fragment!r} not reported exactly once in:\n" + "\n".join(problems)
        assert matches[0].startswith(str(path))
    assert "14 problem(s)" in str(info.value)

    dataset = load_coco(path, images_dir, on_error="skip", box_tolerance=1.0)
    assert dataset.problems == problems
    # Only image 1 survives: 2 (duplicate), 3 (missing), 4 (bad size) are rejected, 5 lost its only box.
    assert [r.image_id for r in dataset.records] == [1]
    np.testing.assert_array_equal(dataset.records[0].boxes, [[1, 1, 11, 11]])


def test_boxes_slightly_outside_are_clipped_within_tolerance(tmp_path, images_dir):
    path = make_coco(tmp_path, [image_entry(1, "a.png")], [ann(1, 1, 3, [-0.5, 10, 64.4, 38.6])])
    np.testing.assert_allclose(load_coco(path, images_dir).records[0].boxes, [[0, 10, 63.9, 48]], atol=1e-5)
    with pytest.raises(DatasetError, match="outside"):
        load_coco(path, images_dir, box_tolerance=0.1)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"images": [{"id": 1, "file_na', "line 1 column"),
        ("", "invalid JSON"),
        ("[1, 2]", "top level is a list"),
        ('{"annotations": []}', "no 'images' list"),
        ('{"images": {}, "categories": [], "annotations": 5}', "'images' is a dict"),
    ],
)
def test_unreadable_files_raise_even_when_skipping(tmp_path, images_dir, text, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DatasetError) as info:
        load_coco(path, images_dir, on_error="skip")
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_truncated_multiline_json_names_the_line(tmp_path, images_dir):
    full = json.dumps({"images": [image_entry(1, "a.png")], "annotations": [], "categories": []}, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(full[: len(full) // 2])
    with pytest.raises(DatasetError, match=r"line \d+ column \d+: invalid JSON .*truncated"):
        load_coco(path, images_dir)


def test_missing_annotation_file(tmp_path, images_dir):
    with pytest.raises(DatasetError, match="no such annotation file"):
        load_coco(tmp_path / "nope.json", images_dir)


def test_bad_categories_are_reported(tmp_path, images_dir):
    path = make_coco(
        tmp_path,
        [image_entry(1, "a.png")],
        [ann(1, 1, 3, [1, 1, 5, 5])],
        categories=[{"id": 3, "name": "cat"}, {"id": 3, "name": "kitten"}, {"id": True, "name": "x"}, {"name": "y"}],
    )
    with pytest.raises(DatasetError) as info:
        load_coco(path, images_dir)
    text = "\n".join(info.value.problems)
    assert "category id 3: duplicate category id" in text
    assert "categories[2]: 'id' is True" in text
    assert "categories[3]: 'id' is None" in text


def test_check_sizes_catches_a_size_mismatch(tmp_path, images_dir):
    path = make_coco(tmp_path, [image_entry(1, "a.png", width=48, height=64)], [])
    assert len(load_coco(path, images_dir)) == 1  # JSON sizes trusted by default
    with pytest.raises(DatasetError, match="the JSON says 48x64 but the image is 64x48"):
        load_coco(path, images_dir, check_sizes=True)


def test_image_above_the_pixel_limit_is_reported(tmp_path, images_dir):
    path = make_coco(tmp_path, [image_entry(1, "a.png", width=20000, height=20000)], [])
    with pytest.raises(DatasetError, match="megapixel limit"):
        load_coco(path, images_dir)


def test_invalid_on_error_value(tmp_path, images_dir):
    path = make_coco(tmp_path, [], [])
    with pytest.raises(ValueError, match="on_error"):
        load_coco(path, images_dir, on_error="ignore")  # type: ignore[arg-type]


def test_convert_round_trip_and_pycocotools_reads_it(tmp_path, images_dir):
    from pycocotools.coco import COCO

    path = make_coco(
        tmp_path,
        [image_entry(10, "a.png"), image_entry(11, "b.png")],
        [ann(1, 10, 7, [1.25, 2, 10, 20]), ann(2, 10, 3, [0, 0, 64, 48], iscrowd=1), ann(5, 11, 3, [3, 4, 5, 6])],
    )
    dataset = load_coco(path, images_dir)
    out = write_coco(dataset, tmp_path / "out.json")
    again = load_coco(out, images_dir)
    assert again.class_names == dataset.class_names and again.category_ids == dataset.category_ids
    for a, b in zip(dataset.records, again.records, strict=True):
        assert (a.file_name, a.image_id, a.width, a.height) == (b.file_name, b.image_id, b.width, b.height)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.iscrowd, b.iscrowd)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out))
    assert sorted(coco.getCatIds()) == [3, 7]
    assert len(coco.getAnnIds(imgIds=[10])) == 2 and len(coco.getAnnIds(iscrowd=False)) == 2
    assert coco.loadAnns(coco.getAnnIds(imgIds=[11]))[0]["bbox"] == [3.0, 4.0, 5.0, 6.0]
    assert convert_to_coco(dataset)["annotations"][0]["area"] == pytest.approx(200.0)


@needs_coco128
def test_coco128_train_loads_with_ten_crowd_regions():
    dataset = load_coco(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "train2017", check_sizes=True)
    assert len(dataset) == 128  # the 2 images without annotations are kept as negatives
    assert sum(len(r.boxes) == 0 for r in dataset.records) == 2
    assert sum(len(r.boxes) for r in dataset.records) == 939
    assert sum(int(r.iscrowd.sum()) for r in dataset.records) == 10
    assert dataset.num_classes == 80
    assert list(dataset.category_ids) == sorted(dataset.category_ids)
    assert dataset.category_ids[0] == 1 and dataset.category_ids[-1] == 90
    assert dataset.class_names[0] == "person" and dataset.class_names[-1] == "toothbrush"
    raw = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    first = raw["annotations"][0]
    record = next(r for r in dataset.records if r.image_id == first["image_id"])
    x, y, w, h = first["bbox"]
    assert np.any(np.all(np.isclose(record.boxes, [x, y, x + w, y + h]), axis=1))
    assert len(load_coco(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "train2017",
                         keep_empty=False)) == 126  # fmt: skip


def test_boxes_partly_outside_are_clipped_and_boxes_wholly_outside_reported(tmp_path, images_dir):
    """mmdetection's rule by default: a box drawn past the border keeps its part inside the image; a box with no area
    inside is a problem that names it."""
    path = make_coco(tmp_path, [image_entry(1, "a.png")], [ann(1, 1, 3, [50, 40, 30, 30])])
    np.testing.assert_allclose(load_coco(path, images_dir).records[0].boxes, [[50, 40, 64, 48]])
    path = make_coco(tmp_path, [image_entry(1, "a.png")], [ann(1, 1, 3, [70, 50, 30, 30])])
    with pytest.raises(DatasetError, match=r"box \[70, 50, 100, 80\] is outside the 64x48 image \(no area inside"):
        load_coco(path, images_dir)
