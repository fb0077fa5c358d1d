"""Property-based fuzzing (hypothesis) of the annotation readers: COCO, VOC, YOLO, txt, and eval's COCO loader.

`tests/test_data_fuzz.py` mutates one valid file of each format with a seeded byte mutator, and the per-format tests
pin every known problem's message. These tests generate inputs from the formats' structure instead (each field a
plausible value, a wrong type, NaN, infinity, an out-of-range number, a duplicate), and check properties that hold
for every input:

- the reader ends in a `DatasetError` or a dataset, never another exception, within the deadline;
- what it returns is clean: boxes finite, positive, inside their image; labels in range; image ids unique;
- "one report listing every problem": on_error="raise" lists exactly the problems that on_error="skip" leaves out;
- what `cascade_rcnn.evaluation.coco.load_coco_gt` accepts, pycocotools can evaluate.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cascade_rcnn.cli import main
from cascade_rcnn.data import DetectionDataset, load_coco, load_txt, load_voc, load_yolo
from cascade_rcnn.errors import DatasetError
from cascade_rcnn.evaluation.coco import evaluate_coco, load_coco_gt

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)  # fmt: skip
IMAGE_SIZES = {"1.jpg": (64, 48), "2.png": (32, 32), "000123.jpg": (40, 30)}
NAMES = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/ with three small images; the files each example writes go next to it and are overwritten."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    for name, size in IMAGE_SIZES.items():
        Image.new("RGB", size, (40, 80, 120)).save(root / "images" / name)
    return root


# --- strategies -------------------------------------------------------------------------------------------------------
# Each format's generator draws a valid file first, then applies 0-3 random mutations to it (a field set to a wrong
# type, NaN, infinity or an out-of-range number; a field or token deleted or added; an entry or line duplicated), so
# that both clean loads and every kind of problem are common.

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=8)  # fmt: skip
special_values = st.one_of(
    json_values,
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -(10**400), 2**63, -1, 0, 0.5, "1", True, [], {},
                     "x" * 300 + ".jpg", "../1.jpg", "1.jpg\x00.png"]),
    st.lists(st.one_of(st.floats(-10, 80), st.sampled_from([math.nan, math.inf, 10**400])), max_size=5),
)


def mutate_document(draw: st.DrawFn, document: dict[str, Any]) -> None:
    """One random edit of a COCO-shaped document, in place."""
    key = draw(st.sampled_from(["images", "annotations", "annotations", "categories", "top"]))
    if key == "top":
        document[draw(st.sampled_from(["images", "annotations", "categories"]))] = draw(json_values)
        return
    entries = document[key]
    if not isinstance(entries, list) or not entries:
        return
    index = draw(st.integers(0, len(entries) - 1))
    action = draw(st.sampled_from(["set", "set", "set", "delete", "duplicate", "replace"]))
    if action == "duplicate":
        entries.append(copy.deepcopy(entries[index]))
    elif action == "replace":
        entries[index] = draw(json_values)
    elif isinstance(entries[index], dict) and entries[index]:
        field = draw(st.sampled_from(sorted(entries[index])))
        if action == "delete":
            del entries[index][field]
        else:
            entries[index][field] = draw(special_values)


@st.composite
def coco_documents(draw: st.DrawFn) -> Any:
    file_names = draw(st.lists(st.sampled_from(sorted(IMAGE_SIZES)), min_size=1, max_size=3, unique=True))
    images = [{"id": i, "file_name": name, "width": IMAGE_SIZES[name][0], "height": IMAGE_SIZES[name][1]}
              for i, name in enumerate(file_names, start=1)]  # fmt: skip
    annotations = []
    for ann_id in range(1, draw(st.integers(0, 5)) + 1):
        image = draw(st.sampled_from(images))
        x, y = draw(st.floats(0, image["width"] - 2)), draw(st.floats(0, image["height"] - 2))
        w, h = draw(st.floats(1, image["width"] - x)), draw(st.floats(1, image["height"] - y))
        annotations.append({"id": ann_id, "image_id": image["id"], "category_id": draw(st.integers(1, len(NAMES))),
                            "bbox": [x, y, w, h], "area": w * h, "iscrowd": draw(st.sampled_from([0, 0, 0, 1]))})  # fmt: skip
    document = {"images": images, "annotations": annotations,
                "categories": [{"id": i, "name": name} for i, name in enumerate(NAMES, start=1)]}  # fmt: skip
    for _ in range(draw(st.integers(0, 3))):
        mutate_document(draw, document)
    return document


number_tokens = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "-1", "0.5", "1e999", "-1e999", "nan", "inf", "1e-320", "0x10", "", "a",
                     "½", "٣", "1_0", "+0.5", "9" * 400]),
    st.floats(-2, 2).map(repr),
    st.integers(-3, 80).map(str),
)


def mutate_lines(draw: st.DrawFn, lines: list[list[str]], separator: str) -> str:
    """0-3 token edits (replace, delete, insert, duplicate a line) of a whitespace/comma-token file, then joined."""
    for _ in range(draw(st.integers(0, 3))):
        if not lines:
            lines.append([draw(number_tokens)])
            continue
        line = draw(st.sampled_from(lines))
        action = draw(st.sampled_from(["replace", "replace", "delete", "insert", "duplicate"]))
        if action == "duplicate":
            lines.append(list(line))
        elif action == "insert" or not line:
            line.insert(draw(st.integers(0, len(line))), draw(number_tokens))
        else:
            position = draw(st.integers(0, len(line) - 1))
            if action == "delete":
                del line[position]
            else:
                line[position] = draw(number_tokens)
    return "\n".join(separator.join(line) for line in lines)


def unit_box(draw: st.DrawFn) -> tuple[float, float, float, float]:
    """A YOLO box (cx, cy, w, h), normalised, inside the image."""
    cx, cy = draw(st.floats(0.1, 0.9)), draw(st.floats(0.1, 0.9))
    w, h = draw(st.floats(0.02, 2 * min(cx, 1 - cx))), draw(st.floats(0.02, 2 * min(cy, 1 - cy)))
    return cx, cy, w, h


@st.composite
def yolo_files(draw: st.DrawFn) -> str:
    lines = [[str(draw(st.integers(0, len(NAMES) - 1))), *map(repr, unit_box(draw))] for _ in range(draw(
        st.integers(0, 4)))]  # fmt: skip
    return mutate_lines(draw, lines, " ")


@st.composite
def txt_files(draw: st.DrawFn) -> tuple[str, int]:
    """(file text, label_base): lines 'file x1,y1,x2,y2,label,crowd ...', with the box as one comma-joined token."""
    label_base = draw(st.sampled_from([0, 1]))
    lines = []
    for name in draw(st.lists(st.sampled_from(sorted(IMAGE_SIZES)), max_size=3)):
        width, height = IMAGE_SIZES[name]
        boxes = []
        for _ in range(draw(st.integers(0, 3))):
            cx, cy, w, h = unit_box(draw)
            corners = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            label = draw(st.integers(label_base, label_base + len(NAMES) - 1))
            boxes.append(",".join([*(f"{v:.2f}" for v in corners), str(label), draw(st.sampled_from(["0", "1"]))]))
        lines.append([name, *boxes])
    lines.extend([name] for name in draw(st.lists(st.sampled_from(["missing.jpg", "²³.jpg", "9" * 30 + ".jpg",
                                                                   "../1.jpg"]), max_size=1)))  # fmt: skip
    text = mutate_lines(draw, lines, " ")
    if draw(st.booleans()):  # also mutate inside a box: split a line's tokens at commas
        text = mutate_lines(draw, [line.split(",") for line in text.split("\n")], ",")
    return text, label_base


@st.composite
def voc_files(draw: st.DrawFn, name: str) -> str:
    """A VOC XML file of image `name`: elements with valid text, then 0-3 edits (text replaced, element dropped, object
    duplicated), and one file in five cut short."""
    width, height = IMAGE_SIZES[name]
    header = {"filename": name, "width": str(width), "height": str(height)}
    objects = []
    for _ in range(draw(st.integers(0, 3))):
        cx, cy, w, h = unit_box(draw)
        corners = [1 + (cx - w / 2) * (width - 1), 1 + (cy - h / 2) * (height - 1), 1 + (cx + w / 2) * (width - 1),
                   1 + (cy + h / 2) * (height - 1)]  # fmt: skip
        objects.append({"name": draw(st.sampled_from([*NAMES, "zebra"])), "difficult": draw(st.sampled_from("01")),
                        **dict(zip(("xmin", "ymin", "xmax", "ymax"), (f"{v:.1f}" for v in corners)))})  # fmt: skip
    for _ in range(draw(st.integers(0, 3))):
        target = draw(st.sampled_from([header, *objects]))
        action = draw(st.sampled_from(["set", "set", "delete", "duplicate"]))
        if action == "duplicate" and target is not header:
            objects.append(dict(target))
        elif target:
            field = draw(st.sampled_from(sorted(target)))
            if action == "delete":
                del target[field]
            else:
                target[field] = draw(st.one_of(number_tokens, st.sampled_from(["", "cat", "<", "&amp;", "]]>"])))

    def element(tag: str, fields: dict[str, str]) -> str:
        return f"<{tag}>{fields[tag]}</{tag}>" if tag in fields else ""

    size = element("width", header) + element("height", header)
    text = "<annotation>" + element("filename", header) + (f"<size>{size}</size>" if size else "") + "".join(
        "<object>" + element("name", o) + element("difficult", o) + "<bndbox>" + "".join(
            element(t, o) for t in ("xmin", "ymin", "xmax", "ymax")) + "</bndbox></object>" for o in objects
    ) + "</annotation>"  # fmt: skip
    if draw(st.integers(0, 4)) == 0:
        text = text[: draw(st.integers(0, len(text) - 1))]
    return text


# --- properties of a loaded dataset -----------------------------------------------------------------------------------


def assert_clean(dataset: DetectionDataset) -> None:
    """What every reader promises about the dataset it returns, whatever the input was."""
    assert len(dataset.class_names) == len(dataset.category_ids) == len(set(dataset.class_names))
    assert len({r.image_id for r in dataset.records}) == len(dataset.records)
    for record in dataset.records:
        assert -(2**63) <= record.image_id < 2**63
        assert record.boxes.dtype == np.float32 and record.boxes.shape == (len(record.labels), 4)
        assert np.isfinite(record.boxes).all()
        assert (record.boxes[:, 2] > record.boxes[:, 0]).all() and (record.boxes[:, 3] > record.boxes[:, 1]).all()
        if record.width is not None and record.height is not None:
            assert record.width > 0 and record.height > 0
            assert (record.boxes >= 0).all()
            assert (record.boxes[:, [0, 2]] <= record.width).all() and (record.boxes[:, [1, 3]] <= record.height).all()
        assert ((record.labels >= 0) & (record.labels < len(dataset.class_names))).all()


def check_both_modes(load: Callable[[str], DetectionDataset], root: Path) -> DetectionDataset | None:
    """Load in both modes: only DatasetError may escape; "raise" reports exactly what "skip" leaves out, and every
    problem starts with the file it is in (everything these tests write is under `root`)."""
    try:
        skipped = load("skip")
    except DatasetError:
        skipped = None  # nothing loadable at all: must then fail the same way in "raise" mode
    try:
        strict = load("raise")
    except DatasetError as error:
        if skipped is not None:
            assert error.problems == skipped.problems and error.problems
            assert all(p.startswith(str(root)) for p in error.problems), error.problems
        return skipped
    assert skipped is not None and not skipped.problems and not strict.problems
    assert_clean(strict)
    return strict


# --- COCO -------------------------------------------------------------------------------------------------------------


@FUZZ
@given(document=st.one_of(coco_documents(), coco_documents(), coco_documents(), json_values))
def test_coco_reader_on_generated_documents(root: Path, document: Any) -> None:
    path = root / "instances.json"
    path.write_text(json.dumps(document))  # NaN and Infinity literals included, as Python's json writes them
    dataset = check_both_modes(lambda mode: load_coco(path, root / "images", on_error=mode), root)
    if dataset is not None:
        assert_clean(dataset)


@FUZZ
@given(document=st.one_of(coco_documents(), coco_documents(), coco_documents(), json_values))
def test_eval_loader_accepts_only_what_pycocotools_can_score(root: Path, document: Any) -> None:
    path = root / "gt.json"
    path.write_text(json.dumps(document))
    try:
        gt = load_coco_gt(path)
    except DatasetError as error:
        assert str(path) in str(error)
        return
    # Score the ground truth against itself, and against nothing: pycocotools must run on whatever was accepted.
    as_detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                     for a in gt.dataset["annotations"]]  # fmt: skip
    for detections in (as_detections, []):
        result = evaluate_coco(gt, detections)
        assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in result.metrics.values())


@FUZZ
@given(data=st.binary(max_size=200))
def test_coco_readers_on_random_bytes(root: Path, data: bytes) -> None:
    path = root / "bytes.json"
    path.write_bytes(data)
    check_both_modes(lambda mode: load_coco(path, root / "images", on_error=mode), root)
    with pytest.raises(DatasetError):
        load_coco_gt(path)  # no byte string of this size is a COCO file with 'images' and 'categories'


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d["images"].append(dict(d["images"][0])), "images[1]: duplicate id 1"),
        (lambda d: d["annotations"][0].update(category_id=7), "'category_id' 7 is not an id in 'categories'"),
        (lambda d: d["annotations"][0].update(image_id=9), "'image_id' 9 is not an id in 'images'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), "'bbox' must be 4 finite numbers"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 10**400, 4]), "'bbox' must be 4 finite numbers"),
        (lambda d: d["annotations"][0].pop("area"), "'area' must be a finite number"),
        (lambda d: d["annotations"][0].pop("iscrowd"), "'iscrowd' must be 0 or 1"),
        (lambda d: d["categories"][0].update(id="1"), "categories[0]: needs an integer 'id'"),
        (lambda d: d["images"][0].pop("file_name"), "'file_name' is None, expected a non-empty string"),
        (lambda d: d.update(annotations={"1": {}}), "'annotations' is a dict, expected a list"),
        (lambda d: d["images"][0].update(file_name="x" * 300 + ".jpg"), "are not in"),
    ],
    ids=["duplicate-image-id", "unknown-category", "unknown-image", "nan-box", "huge-int-box", "no-area",
         "no-iscrowd", "string-category-id", "no-file-name", "annotations-not-a-list", "file-name-too-long"],
)
def test_eval_command_reports_bad_ground_truth_in_one_message(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Callable[[dict], Any], fragment: str
) -> None:
    """Before these checks pycocotools indexed such files blindly: KeyError/TypeError tracebacks, or a duplicate image
    silently scored twice. The model is never loaded: the annotation file is checked first."""
    document = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 8], "area": 80, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "cat"}],
    }
    change(document)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(document))

    code = main(["eval", "--weights", str(tmp_path / "never_read.safetensors"), "--images", str(root / "images"),
                 "--annotations", str(path)])  # fmt: skip

    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.startswith("error: ") and str(path) in err.splitlines()[0], err
    assert fragment in err, err


# --- YOLO -------------------------------------------------------------------------------------------------------------


@FUZZ
@given(label_1=yolo_files(), label_2=yolo_files(), stray=st.booleans())
def test_yolo_reader_on_generated_label_files(root: Path, label_1: str, label_2: str, stray: bool) -> None:
    labels = root / "yolo_labels"
    labels.mkdir(exist_ok=True)
    (labels / "1.txt").write_text(label_1)
    (labels / "2.txt").write_text(label_2)
    (labels / "no_such_image.txt").unlink(missing_ok=True)
    if stray:
        (labels / "no_such_image.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    check_both_modes(lambda mode: load_yolo(root / "images", labels, list(NAMES), on_error=mode), root)


@FUZZ
@given(data=st.binary(max_size=120))
def test_yolo_reader_on_random_bytes(root: Path, data: bytes) -> None:
    labels = root / "yolo_bytes"
    labels.mkdir(exist_ok=True)
    (labels / "1.txt").write_bytes(data)
    check_both_modes(lambda mode: load_yolo(root / "images", labels, list(NAMES), on_error=mode), root)


# --- txt (the seed's format) ------------------------------------------------------------------------------------------

@FUZZ
@given(file=txt_files())
def test_txt_reader_on_generated_lines(root: Path, file: tuple[str, int]) -> None:
    text, label_base = file
    path = root / "annotations.txt"
    path.write_text(text)
    check_both_modes(
        lambda mode: load_txt(path, root / "images", list(NAMES), label_base=label_base, on_error=mode), root
    )


@FUZZ
@given(data=st.binary(max_size=120))
def test_txt_reader_on_random_bytes(root: Path, data: bytes) -> None:
    path = root / "bytes.txt"
    path.write_bytes(data)
    check_both_modes(lambda mode: load_txt(path, root / "images", list(NAMES), on_error=mode), root)


# --- VOC --------------------------------------------------------------------------------------------------------------


@FUZZ
@given(first=voc_files("1.jpg"), second=voc_files("000123.jpg"))
def test_voc_reader_on_generated_files(root: Path, first: str, second: str) -> None:
    folder = root / "Annotations"
    folder.mkdir(exist_ok=True)
    (folder / "1.xml").write_text(first)
    (folder / "2.xml").write_text(second)
    check_both_modes(lambda mode: load_voc(folder, root / "images", on_error=mode), root)


@FUZZ
@given(data=st.binary(max_size=200))
def test_voc_reader_on_random_bytes(root: Path, data: bytes) -> None:
    folder = root / "AnnotationsBytes"
    folder.mkdir(exist_ok=True)
    (folder / "1.xml").write_bytes(data)
    check_both_modes(lambda mode: load_voc(folder, root / "images", on_error=mode), root)


# --- the data command's output ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("{tmp}", "cannot write the COCO JSON (Is a directory)"),
        ("{tmp}/a_file.txt/coco.json", "a_file.txt is a file, not a folder"),
        ("{tmp}/" + "n" * 300 + ".json", "cannot write the COCO JSON (File name too long)"),
    ],
    ids=["output-is-a-folder", "output-below-a-file", "output-name-too-long"],
)
def test_data_convert_output_that_cannot_be_written(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str, fragment: str
) -> None:
    (tmp_path / "a_file.txt").write_text("in the way")
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 48}],
                                       "annotations": [], "categories": [{"id": 1, "name": "cat"}]}))  # fmt: skip
    argv = ["data", "convert", "--format", "coco", "--images", str(root / "images"), "--annotations", str(annotations)]

    assert main([*argv, "--output", output.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt", "instances.json"]  # no .tmp left behind

    # A folder that does not exist yet is created, as `predict --out` does.
    assert main([*argv, "--output", str(tmp_path / "new" / "coco.json")]) == 0
    assert json.loads((tmp_path / "new" / "coco.json").read_text())["images"][0]["file_name"] == "1.jpg"
