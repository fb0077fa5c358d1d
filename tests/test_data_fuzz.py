"""Mutated annotation files end in a loaded dataset or a DatasetError, never another exception.

A seeded byte/token mutator rather than hypothesis, so the inputs are the same on every run and the test is fast.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from cascade_rcnn.data import load_coco, load_txt, load_voc, load_yolo
from cascade_rcnn.errors import DatasetError

TOKENS = [
    "",
    "0",
    "-1",
    "1e400",
    "nan",
    "NaN",
    "Infinity",
    "true",
    "null",
    '"x"',
    "[]",
    "{}",
    ",",
    "\n",
    "<",
    ">",
    "\x00",
]


def mutate(text: str, rng: random.Random) -> str:
    """Apply 1-3 random edits: delete a span, insert a token, duplicate a span, or truncate."""
    for _ in range(rng.randint(1, 3)):
        if not text:
            return rng.choice(TOKENS)
        i = rng.randrange(len(text))
        j = min(len(text), i + rng.randint(1, 8))
        kind = rng.randrange(4)
        if kind == 0:
            text = text[:i] + text[j:]
        elif kind == 1:
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif kind == 2:
            text = text[:i] + text[i:j] * 2 + text[j:]
        else:
            text = text[:i]
    return text


def assert_only_dataset_errors(load, path: Path, base: str, seed: int, rounds: int = 150) -> int:
    rng = random.Random(seed)
    loaded = 0
    for _ in range(rounds):
        path.write_text(mutate(base, rng), encoding="utf-8", errors="surrogatepass")
        for on_error in ("raise", "skip"):
            try:
                load(on_error)
                loaded += 1
            except DatasetError:
                pass
    return loaded


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for name in ("1.jpg", "2.jpg"):
        Image.new("RGB", (64, 48)).save(root / name)
    return root


def test_mutated_coco_json(tmp_path, images):
    base = json.dumps(
        {
            "images": [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}],
        }
    )
    path = tmp_path / "a.json"
    loaded = assert_only_dataset_errors(lambda e: load_coco(path, images, on_error=e), path, base, seed=0)
    assert loaded > 0  # some mutations stay valid: the mutator does not only produce garbage


def test_huge_json_integer_in_a_box_is_a_problem_not_an_overflow(tmp_path, images):
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10**400, 2, 10, 10]}],
        "categories": [{"id": 1, "name": "a"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="annotation id 1 .*non-finite"):
        load_coco(tmp_path / "a.json", images)


def test_mutated_yolo_labels(tmp_path, images):
    labels = tmp_path / "labels"
    labels.mkdir()
    path = labels / "1.txt"
    base = "0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.05 0.05\n"
    assert_only_dataset_errors(lambda e: load_yolo(images, labels, ["a", "b"], on_error=e), path, base, seed=1)


def test_mutated_txt_lines(tmp_path, images):
    path = tmp_path / "a.txt"
    base = "1.jpg 1,2,10,20,1,0 5,5,9,9,2,1\n2.jpg 0,0,0,0,0,1\n"
    assert_only_dataset_errors(lambda e: load_txt(path, images, ["a", "b"], on_error=e), path, base, seed=2)


def test_mutated_voc_xml(tmp_path, images):
    annotations = tmp_path / "Annotations"
    annotations.mkdir()
    path = annotations / "1.xml"
    base = (
        "<annotation><filename>1.jpg</filename><size><width>64</width><height>48</height></size>"
        "<object><name>a</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax>"
        "<ymax>20</ymax></bndbox></object></annotation>"
    )
    assert_only_dataset_errors(lambda e: load_voc(annotations, images, on_error=e), path, base, seed=3)
