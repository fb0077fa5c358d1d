"""`cascade-rcnn data check|convert`: report, exit codes, and COCO output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from cascade_rcnn.commands import data as data_command
from cascade_rcnn.data import load_coco
from cascade_rcnn.data.synthetic import make_shapes_dataset
from cascade_rcnn.errors import DatasetError


def run_data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_command.add_arguments(parser)
    return data_command.run(parser.parse_args(argv))


def make_yolo(root: Path, label_text: str) -> tuple[Path, Path, Path]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    Image.new("RGB", (100, 100)).save(images / "a.jpg")
    Image.new("RGB", (100, 100)).save(images / "b.jpg")
    (labels / "a.txt").write_text(label_text)
    (root / "names.txt").write_text("cat\ndog\n")
    return images, labels, root / "names.txt"


def test_check_clean_dataset_prints_counts_and_exits_zero(tmp_path, capsys):
    paths = make_shapes_dataset(tmp_path, num_train=4, num_val=0, seed=0)
    code = run_data(
        ["check", "--format", "coco", "--images", str(paths["train_images"]), "--annotations",
         str(paths["train_annotations"]), "--decode"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "images: 4 usable (0 without boxes)" in out
    assert "problems: none" in out
    total = len(json.loads(paths["train_annotations"].read_text())["annotations"])
    assert f"boxes: {total} (0 crowd/ignore regions)" in out
    for name in ("circle", "square", "triangle", "cross"):
        assert name in out


def test_check_lists_problems_and_exits_one(tmp_path, capsys):
    images, labels, names = make_yolo(tmp_path, "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n7 0.5 0.5 0.1 0.1\n")
    code = run_data(
        ["check", "--format", "yolo", "--images", str(images), "--annotations", str(labels), "--names", str(names)]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "images: 2 usable (1 without boxes)" in out
    assert "problems: 2" in out
    assert f"{labels / 'a.txt'}: line 2: expected 5 fields" in out
    assert f"{labels / 'a.txt'}: line 3: unknown class 7" in out


def test_check_decode_finds_a_truncated_image_that_the_header_hides(tmp_path, capsys):
    paths = make_shapes_dataset(tmp_path, num_train=2, num_val=0, seed=0)
    victim = paths["train_images"] / "000002.png"
    victim.write_bytes(victim.read_bytes()[:-5000])
    argv = ["check", "--format", "coco", "--images", str(paths["train_images"]),
            "--annotations", str(paths["train_annotations"])]  # fmt: skip
    assert run_data(argv) == 0  # the header alone looks fine
    capsys.readouterr()
    assert run_data(argv + ["--decode"]) == 1
    assert f"image id 2: {victim}: cannot read image" in capsys.readouterr().out


def test_convert_writes_coco_json(tmp_path, capsys):
    images, labels, names = make_yolo(tmp_path, "1 0.5 0.5 0.2 0.4\n")
    out = tmp_path / "out.json"
    code = run_data(
        ["convert", "--format", "yolo", "--images", str(images), "--annotations", str(labels),
         "--names", str(names), "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    assert "2 images, 1 boxes, 2 classes" in capsys.readouterr().out
    dataset = load_coco(out, images)
    assert dataset.class_names == ("cat", "dog")
    assert dataset.records[0].boxes.tolist() == [[40.0, 30.0, 60.0, 70.0]]


def test_convert_refuses_problems_unless_told_to_skip(tmp_path, capsys):
    images, labels, names = make_yolo(tmp_path, "1 0.5 0.5 0.2 0.4\n1 nan 0.5 0.2 0.4\n")
    out = tmp_path / "out.json"
    argv = ["convert", "--format", "yolo", "--images", str(images), "--annotations", str(labels),
            "--names", str(names), "--output", str(out)]  # fmt: skip
    with pytest.raises(DatasetError, match="line 2: box has non-finite values"):
        run_data(argv)
    assert not out.exists()
    assert run_data(argv + ["--skip-bad"]) == 0
    assert "skipped:" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["annotations"]) == 1


def test_missing_names_for_yolo_is_a_clear_error(tmp_path):
    images, labels, _ = make_yolo(tmp_path, "")
    with pytest.raises(DatasetError, match="needs class names"):
        run_data(["check", "--format", "yolo", "--images", str(images), "--annotations", str(labels)])


def test_registered_in_the_cli_with_one_line_errors(tmp_path, capsys):
    from cascade_rcnn import cli

    bad = tmp_path / "cut.json"
    bad.write_text('{"images": [')
    code = cli.main(["data", "check", "--format", "coco", "--images", str(tmp_path), "--annotations", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {bad}: line 1 column")
    assert "Traceback" not in err
