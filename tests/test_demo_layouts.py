"""`cascade-rcnn demo --data-only --layout coco|voc|yolo` writes the same synthetic set in each format's folder layout
(the README's walk-through uses them): each loads back with the same images, boxes and classes."""

from __future__ import annotations

import numpy as np

from cascade_rcnn.commands.demo import folder_tree, write_layout
from cascade_rcnn.data import load_dataset


def test_every_layout_loads_back_the_same_boxes(tmp_path):
    files = {layout: write_layout(tmp_path / layout, layout, num_train=4, num_val=2, seed=1)
             for layout in ("coco", "voc", "yolo")}  # fmt: skip
    coco, voc, yolo = tmp_path / "coco", tmp_path / "voc", tmp_path / "yolo"
    for split in ("train", "val"):
        sets = [
            load_dataset("coco", coco / split, coco / f"{split}.json"),
            load_dataset("voc", voc / "JPEGImages", voc / "Annotations", names=voc / "names.txt",
                         split=voc / "ImageSets" / "Main" / f"{split}.txt"),
            load_dataset("yolo", yolo / "images" / split, yolo / "labels" / split, names=yolo / "names.txt"),
        ]  # fmt: skip
        reference = sets[0]
        for other in sets[1:]:
            assert other.class_names == reference.class_names and len(other) == len(reference)
            for a, b in zip(reference.records, other.records):
                assert np.array_equal(a.labels, b.labels)
                np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3)  # YOLO: 6 decimals of a normalised value
    tree = folder_tree(tmp_path / "yolo", files["yolo"])
    assert "    images/\n        train/\n            000001.png" in tree and "... (4 files)" in tree
