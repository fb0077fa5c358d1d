"""Pascal VOC XML folders: 1-based coordinates, difficult as ignore, class lists, splits, malformed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_rcnn.data import convert_to_coco, load_coco, load_voc, write_coco
from cascade_rcnn.errors import DatasetError


def voc_xml(filename: str | None, objects: list[tuple], size: tuple[int, int] | None = (64, 48)) -> str:
    """objects: (name, xmin, ymin, xmax, ymax[, difficult])."""
    parts = ["<annotation>", "<folder>VOC</folder>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, xmin, ymin, xmax, ymax, *rest in objects:
        difficult = rest[0] if rest else 0
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


def make_voc(
    root: Path, files: dict[str, str], images: list[str], size: tuple[int, int] = (64, 48)
) -> tuple[Path, Path]:
    annotations, jpegs = root / "Annotations", root / "JPEGImages"
    annotations.mkdir(parents=True)
    jpegs.mkdir(parents=True)
    for stem, text in files.items():
        (annotations / f"{stem}.xml").write_text(text)
    for name in images:
        Image.new("RGB", size, (100, 100, 100)).save(jpegs / name)
    return annotations, jpegs


def test_one_based_boxes_difficult_and_sorted_class_names(tmp_path):
    annotations, jpegs = make_voc(
        tmp_path,
        {
            "000005": voc_xml("000005.jpg", [("dog", 1, 1, 64, 48), ("cat", 11, 21, 30, 40, 1)]),
            "000007": voc_xml("000007.jpg", []),
        },
        ["000005.jpg", "000007.jpg"],
    )
    dataset = load_voc(annotations, jpegs)
    assert dataset.class_names == ("cat", "dog")  # collected and sorted
    assert dataset.category_ids == (1, 2)
    assert [r.image_id for r in dataset.records] == [5, 7]  # numeric stems become the ids
    record = dataset.records[0]
    # VOC (1, 1, 64, 48) covers the whole 64x48 image: (0, 0, 64, 48) in 0-based continuous coordinates.
    np.testing.assert_array_equal(record.boxes, [[0, 0, 64, 48], [10, 20, 30, 40]])
    np.testing.assert_array_equal(record.labels, [1, 0])
    np.testing.assert_array_equal(record.iscrowd, [False, True])
    assert (record.width, record.height) == (64, 48)
    assert len(dataset.records[1].boxes) == 0  # negative kept
    assert [r.image_id for r in load_voc(annotations, jpegs, keep_empty=False).records] == [5]


def test_given_class_list_orders_labels_and_unknown_names_are_problems(tmp_path):
    annotations, jpegs = make_voc(
        tmp_path,
        {"a": voc_xml("a.jpg", [("dog", 1, 1, 10, 10), ("zebra", 1, 1, 10, 10)])},
        ["a.jpg"],
    )
    with pytest.raises(DatasetError) as info:
        load_voc(annotations, jpegs, class_names=["dog", "cat"])
    assert info.value.problems == [f"{annotations / 'a.xml'}: object 2 ('zebra'): unknown class 'zebra'"]
    dataset = load_voc(annotations, jpegs, class_names=["person", "dog"], on_error="skip")
    assert dataset.records[0].labels.tolist() == [1]
    assert [r.image_id for r in dataset.records] == [1]  # non-numeric stems: 1..N


def test_split_file_selects_images_and_reports_missing_and_duplicates(tmp_path):
    annotations, jpegs = make_voc(
        tmp_path,
        {"a": voc_xml("a.jpg", [("dog", 1, 1, 10, 10)]), "b": voc_xml("b.jpg", [("dog", 2, 2, 10, 10)])},
        ["a.jpg", "b.jpg"],
    )
    split = tmp_path / "ImageSets" / "Main" / "train.txt"
    split.parent.mkdir(parents=True)
    split.write_text("b\n\nb\nzz\n")
    with pytest.raises(DatasetError) as info:
        load_voc(annotations, jpegs, split_file=split)
    assert info.value.problems == [
        f"{split}: line 3: duplicate image 'b' (first on line 1)",
        f"{split}: line 4: annotation file {annotations / 'zz.xml'} not found",
    ]
    dataset = load_voc(annotations, jpegs, split_file=split, on_error="skip")
    assert [r.file_name for r in dataset.records] == ["b.jpg"]


def test_every_problem_in_a_folder_is_reported(tmp_path):
    annotations, jpegs = make_voc(
        tmp_path,
        {
            "a": voc_xml("a.jpg", [("dog", 1, 1, 10, 10)]),  # good
            "b": "<annotation><filename>b.jpg</filename><object><name>dog</name>",  # truncated XML
            "c": voc_xml("c.jpg", [("dog", 1, 1, 10, 10)]),  # image missing
            "d": voc_xml(
                "d.jpg",
                [
                    ("dog", 10, 10, 5, 20),  # negative width
                    ("dog", "nan", 1, 5, 5),  # NaN
                    ("dog", 1, 1, 200, 20),  # outside the 64x48 image
                    ("dog", "x", 1, 5, 5),  # not a number
                    ("", 1, 1, 5, 5),  # no name
                    ("dog", 1, 1, 5, 5, "maybe"),  # bad difficult flag
                    ("dog", 2, 2, 6, 6),  # good
                ],
            ),
            "e": "<notvoc/>",
            "f": voc_xml("a.jpg", [("dog", 1, 1, 10, 10)]),  # same image as a.xml
        },
        ["a.jpg", "d.jpg"],
    )
    with pytest.raises(DatasetError) as info:
        load_voc(annotations, jpegs, box_tolerance=1.0)  # strict: a box past the border is a problem too
    problems = info.value.problems
    expected = [
        f"{annotations / 'b.xml'}: line 1 column ",
        f"{annotations / 'c.xml'}: image file {jpegs / 'c.jpg'} not found",
        f"{annotations / 'd.xml'}: object 1 ('dog'): box has non-positive size",
        f"{annotations / 'd.xml'}: object 2 ('dog'): box has non-finite values",
        f"{annotations / 'd.xml'}: object 3 ('dog'): box [0, 0, 200, 20] is outside the 64x48 image",
        f"{annotations / 'd.xml'}: object 4 ('dog'): <bndbox> needs numeric",
        f"{annotations / 'd.xml'}: object 5: no <name>",
        f"{annotations / 'd.xml'}: object 6 ('dog'): <difficult> is 'maybe'",
        f"{annotations / 'e.xml'}: root element is <notvoc>",
        f"{annotations / 'f.xml'}: image a.jpg is already annotated by {annotations / 'a.xml'}",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, prefix in zip(problems, expected):
        assert problem.startswith(prefix), (problem, prefix)
    assert "malformed XML" in problems[0]

    dataset = load_voc(annotations, jpegs, on_error="skip", box_tolerance=1.0)
    assert [r.file_name for r in dataset.records] == ["a.jpg", "d.jpg"]
    np.testing.assert_array_equal(dataset.records[1].boxes, [[1, 1, 6, 6]])


def test_missing_or_zero_size_is_read_from_the_image(tmp_path):
    annotations, jpegs = make_voc(
        tmp_path,
        {"a": voc_xml("a.jpg", [("dog", 1, 1, 70, 10)], size=None), "b": voc_xml(None, [], size=(0, 0))},
        ["a.jpg", "b.jpg"],
        size=(80, 30),
    )
    dataset = load_voc(annotations, jpegs)
    assert [(r.file_name, r.width, r.height) for r in dataset.records] == [("a.jpg", 80, 30), ("b.jpg", 80, 30)]


def test_check_sizes_reports_a_wrong_size(tmp_path):
    annotations, jpegs = make_voc(tmp_path, {"a": voc_xml("a.jpg", [], size=(48, 64))}, ["a.jpg"])
    assert len(load_voc(annotations, jpegs)) == 1
    with pytest.raises(DatasetError, match="<size> says 48x64 but the image is 64x48"):
        load_voc(annotations, jpegs, check_sizes=True)


def test_billion_laughs_xml_is_a_reported_problem_not_a_memory_blowup(tmp_path):
    # Each entity expands to ten of the previous one: &lol9; is 10**9 "lol"s (3 GB) from a 1 kB file.
    entities = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    bomb = (
        f'<?xml version="1.0"?><!DOCTYPE lolz [{"".join(entities)}]>'
        "<annotation><filename>&lol9;</filename></annotation>"
    )
    annotations, jpegs = make_voc(tmp_path, {"bomb": bomb}, [])
    with pytest.raises(DatasetError, match=r"bomb.xml: line 1 column \d+: malformed XML"):
        load_voc(annotations, jpegs)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="annotation folder not found"):
        load_voc(tmp_path / "Annotations", tmp_path / "JPEGImages")


def test_convert_to_coco_keeps_boxes_and_difficult(tmp_path):
    annotations, jpegs = make_voc(
        tmp_path, {"a": voc_xml("a.jpg", [("dog", 5, 6, 20, 30), ("cat", 1, 1, 8, 8, 1)])}, ["a.jpg"]
    )
    dataset = load_voc(annotations, jpegs)
    coco = convert_to_coco(dataset)
    assert [a["bbox"] for a in coco["annotations"]] == [[4.0, 5.0, 16.0, 25.0], [0.0, 0.0, 8.0, 8.0]]
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 1]
    again = load_coco(write_coco(dataset, tmp_path / "voc.json"), jpegs)
    np.testing.assert_array_equal(again.records[0].boxes, dataset.records[0].boxes)
    np.testing.assert_array_equal(again.records[0].iscrowd, dataset.records[0].iscrowd)
