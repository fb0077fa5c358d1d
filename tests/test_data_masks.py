"""Instance masks in the data layer: rasterising COCO polygons and RLE, flips and resizes that keep masks on their
boxes, every bad segmentation named by its annotation id, the COCO round trip, and the mask-preset-on-box-data error."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training_fixtures import TINY_MODEL

from cascade_rcnn import cli
from cascade_rcnn.commands import data as data_command
from cascade_rcnn.data import DetectionDataset, ImageRecord, convert_to_coco, load_coco, load_voc, write_coco
from cascade_rcnn.data.masks import check_segmentation, record_masks, segmentation_area, segmentation_to_mask
from cascade_rcnn.data.transforms import DetectionTorchDataset, resize_masks
from cascade_rcnn.errors import ConfigError, DatasetError
from cascade_rcnn.training.config import experiment_from_dict
from cascade_rcnn.training.data import build_train_dataset
from tests.helpers import COCO128

COCO128_TRAIN = COCO128 / "annotations" / "instances_train2017.json"
needs_coco128 = pytest.mark.skipif(
    not COCO128_TRAIN.is_file(), reason=f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128)"
)

# An RLE of a 3x4 image, hand-decoded: runs alternate 0s and 1s, column by column (COCO's Fortran order).
RLE_3X4 = {"size": [3, 4], "counts": [2, 3, 1, 6]}
RLE_3X4_PIXELS = [[0, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1]]


def mask_box(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """The pixel-edge box ``x1, y1, x2, y2`` around a mask's True pixels."""
    ys, xs = np.nonzero(np.asarray(mask))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


# --- rasterising -------------------------------------------------------------------------------------------------


def test_polygons_rasterise_to_the_pixels_whose_centres_they_cover_and_several_are_one_mask():
    rectangle = [1, 1, 4, 1, 4, 3, 1, 3]  # covers the centres of columns 1..3, rows 1..2
    expected = np.zeros((4, 6), bool)
    expected[1:3, 1:4] = True
    np.testing.assert_array_equal(segmentation_to_mask([rectangle], 4, 6), expected)
    expected[3, 0:2] = True
    np.testing.assert_array_equal(segmentation_to_mask([rectangle, [0, 3, 2, 3, 2, 4, 0, 4]], 4, 6), expected)
    assert segmentation_area([rectangle], 4, 6) == 6


def test_rle_uncompressed_and_compressed_decode_column_major():
    from pycocotools import mask as mask_utils

    np.testing.assert_array_equal(segmentation_to_mask(RLE_3X4, 3, 4), RLE_3X4_PIXELS)
    compressed = mask_utils.frPyObjects(RLE_3X4, 3, 4)
    compressed = {"size": [3, 4], "counts": compressed["counts"].decode("ascii")}  # as JSON holds it
    assert check_segmentation(compressed, 3, 4) is None
    np.testing.assert_array_equal(segmentation_to_mask(compressed, 3, 4), RLE_3X4_PIXELS)


def test_record_masks_one_per_box_zero_for_a_box_without_a_segmentation():
    record = ImageRecord(
        "a.png", 1, 4, 3, boxes=[[0, 0, 4, 3], [1, 1, 2, 2], [0, 0, 1, 1]], labels=[0, 0, 0], iscrowd=[1, 0, 0],
        segmentations=[RLE_3X4, [[1, 1, 3, 1, 3, 2]], None],
    )  # fmt: skip
    masks = record_masks(record, 3, 4)
    assert masks.dtype == np.uint8 and masks.shape == (3, 3, 4)
    np.testing.assert_array_equal(masks[0], RLE_3X4_PIXELS)
    assert masks[1].sum() > 0 and masks[2].sum() == 0
    box_only = ImageRecord("b.png", 2, 4, 3, boxes=[[0, 0, 1, 1]], labels=[0], iscrowd=[0])
    assert record_masks(box_only, 3, 4).shape == (1, 3, 4) and record_masks(box_only, 3, 4).sum() == 0
    with pytest.raises(ValueError, match="1 boxes but 2 segmentations"):
        ImageRecord("c.png", 3, 4, 3, boxes=[[0, 0, 1, 1]], labels=[0], iscrowd=[0], segmentations=[None, None])


@pytest.mark.parametrize(
    "segmentation, reason",
    [
        ([[1, 2, 3, 4]], "4 coordinates"),  # 2 points; pycocotools would even read it as a box
        ([[1, 2, 3, 4, 5, 6, 7]], "7 coordinates"),
        ([[1, 2, "3", 4, 5, 6]], "expected a list of numbers"),
        ([1, 2, 3, 4, 5, 6], "flat list"),
        ([[0, 0, 1e12, 0, 0, 1e12]], "farther outside"),  # would crash pycocotools' rasteriser
        ([[0, 0, float("nan"), 0, 0, 5]], "non-finite"),
        ("polygon", "is a str"),
        ({"size": [10, 10], "counts": [100]}, "differs from the image's"),
        ({"size": [3, 4], "counts": [2, 3]}, "do not sum"),  # would decode to uninitialised memory
        ({"size": [3, 4], "counts": [13, -1]}, "negative"),
        ({"size": [3, 4], "counts": "0o:A0"}, "do not sum"),
        ({"size": [3, 4], "counts": "\x01"}, "not a pycocotools compressed string"),
        ({"counts": [12]}, "'size'"),
    ],
)
def test_check_segmentation_names_what_is_wrong(segmentation, reason):
    assert reason in check_segmentation(segmentation, 3, 4)
    with pytest.raises(ValueError, match=reason[:8]):
        segmentation_to_mask(segmentation, 3, 4)


def test_absent_segmentations_are_no_mask_not_a_problem():
    for absent in (None, []):
        assert check_segmentation(absent, 3, 4) is None
        assert not segmentation_to_mask(absent, 3, 4).any()


# --- resize and flip ---------------------------------------------------------------------------------------------


def test_resize_masks_is_nearest_neighbour_as_opencv():
    masks = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8)
    np.testing.assert_array_equal(resize_masks(masks, (4, 4))[0], np.kron([[1, 0], [0, 1]], np.ones((2, 2))))
    # 2 -> 3 takes input rows floor(0), floor(0.67), floor(1.33) = 0, 0, 1 (not the nearest centre: 0, 1, 1).
    np.testing.assert_array_equal(resize_masks(masks, (3, 3))[0], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    # Downscaling takes input row/column floor(i * 4 / 2): 0 and 2.
    big = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4)
    np.testing.assert_array_equal(resize_masks(big, (2, 2))[0], [[0, 2], [8, 10]])
    assert resize_masks(torch.zeros((0, 4, 4), dtype=torch.uint8), (2, 3)).shape == (0, 2, 3)


@pytest.fixture
def mask_dataset(tmp_path: Path) -> DetectionDataset:
    """One 64x48 image: a rectangle polygon, a triangle polygon and a crowd RLE, each boxed by its mask's pixel edges
    (so that a box and its mask transformed alike must still agree)."""
    from pycocotools import mask as mask_utils

    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    crowd = np.zeros((48, 64), np.uint8)
    crowd[30:45, 40:60] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd))
    segmentations = [
        [[10, 8, 30, 8, 30, 20, 10, 20]],
        [[5, 25, 25, 25, 5, 45]],
        {"size": [48, 64], "counts": rle["counts"].decode("ascii")},
    ]
    boxes = [mask_box(segmentation_to_mask(segmentation, 48, 64)) for segmentation in segmentations]
    np.testing.assert_array_equal(boxes[0], [10, 8, 30, 20])
    record = ImageRecord(
        "a.png", 1, 64, 48, boxes=boxes, labels=[0, 1, 0], iscrowd=[0, 0, 1], segmentations=segmentations
    )
    return DetectionDataset(tmp_path, [record], ("a", "b"), (1, 2))


@pytest.mark.parametrize("resize, flip", [(False, False), (False, True), (True, False), (True, True)])
def test_masks_follow_their_boxes_through_resize_and_flip(mask_dataset, resize, flip):
    # Scale (72, 200) resizes the 64x48 image by 1.5 to 96x72: a non-integer factor.
    dataset = DetectionTorchDataset(
        mask_dataset, train=True, flip_prob=1.0 if flip else 0.0, resize=resize, scale=(72, 200), with_masks=True
    )
    image, target = dataset[0]
    masks, boxes = target["masks"], target["boxes"]
    assert masks.dtype == torch.uint8 and masks.shape == (3, *image.shape[-2:])
    assert image.shape[-2:] == ((72, 96) if resize else (48, 64))
    for mask, box in zip(masks, boxes.double().numpy()):
        np.testing.assert_allclose(mask_box(mask), box, atol=1.0)  # nearest-neighbour rounds by under a pixel
    # The rectangle's edges fall on pixel edges at scale 1.5 too: exact there, whatever the transform.
    np.testing.assert_array_equal(mask_box(masks[0]), boxes[0].numpy())


def test_masks_only_when_asked_and_through_the_training_set(mask_dataset):
    assert "masks" not in DetectionTorchDataset(mask_dataset, train=False)[0][1]
    cfg = experiment_from_dict({"data": {"flip_prob": 0.0}}).data
    _, target = build_train_dataset(mask_dataset, cfg, seed=0, with_masks=True)[0]
    np.testing.assert_array_equal(target["masks"].numpy(), record_masks(mask_dataset.records[0], 48, 64))
    assert "sample_seed" in target


# --- load_coco: problems, skip, round trip -----------------------------------------------------------------------


def write_coco_file(tmp_path: Path, annotations: list[dict]) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48)).save(images / "a.png")
    Image.new("RGB", (64, 48)).save(images / "b.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}],
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


def annotation(ann_id: int, x: float, segmentation=None, image_id: int = 1, **extra) -> dict:
    """A 4x4 box at (x, 2); each test annotation gets its own x, so the boxes that survive name the annotations."""
    entry = {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [x, 2, 4, 4], **extra}
    if segmentation is not None:
        entry["segmentation"] = segmentation
    return entry


def square(x: float) -> list[list[float]]:
    return [[x, 2, x + 4, 2, x + 4, 6, x, 6]]


GOOD = [
    annotation(1, 0, square(0)),
    annotation(2, 10, {"size": [48, 64], "counts": [48 * 64]}, iscrowd=1),  # an empty crowd region: still valid
    annotation(3, 20, iscrowd=1),  # crowd without a mask: allowed, its mask is empty
    annotation(4, 30, square(30), image_id=2),
]
BAD = {
    11: annotation(11, 1, [[1, 2, 5, 2]]),  # 2 points
    12: annotation(12, 2, {"size": [64, 48], "counts": [48 * 64]}),  # RLE of the transposed size
    13: annotation(13, 3, "polygon"),  # wrong type
    14: annotation(14, 4, []),  # no mask, in a file with masks
    15: annotation(15, 5),  # no 'segmentation' key at all
    16: annotation(16, 6, [[1, 2, 3, 4, 5, 6, 7]]),  # odd count
    17: annotation(17, 7, [[1, 2, None, 4, 5, 6]]),  # not numbers
}


def test_every_bad_segmentation_is_named_by_its_annotation_id(tmp_path):
    path, images = write_coco_file(tmp_path, GOOD + list(BAD.values()))
    with pytest.raises(DatasetError) as error:
        load_coco(path, images)
    problems = error.value.problems
    assert len(problems) == len(BAD)
    for ann_id, problem in zip(BAD, problems):
        assert problem.startswith(f"{path}: annotation id {ann_id} (image id 1): ")
    assert "differs from the image's" in problems[1] and "masks" in problems[3] and "masks" in problems[4]


def test_skip_drops_exactly_the_bad_annotations_box_and_mask(tmp_path):
    path, images = write_coco_file(tmp_path, GOOD + list(BAD.values()))
    dataset = load_coco(path, images, on_error="skip")
    assert len(dataset.problems) == len(BAD)
    first, second = dataset.records
    np.testing.assert_array_equal(first.boxes[:, 0], [0, 10, 20])
    assert first.segmentations == [GOOD[0]["segmentation"], GOOD[1]["segmentation"], None]
    assert second.segmentations == [GOOD[3]["segmentation"]]
    assert dataset.has_masks and dataset.mask_counts() == {"polygon": 2, "rle": 1, "crowd": 1}


def test_box_only_files_load_as_before(tmp_path):
    # Exporters write "segmentation": [] everywhere; no key at all is box-only too.
    path, images = write_coco_file(tmp_path, [annotation(1, 0, []), annotation(2, 10)])
    dataset = load_coco(path, images)
    assert dataset.problems == [] and not dataset.has_masks
    assert all(record.segmentations is None for record in dataset.records)


def test_convert_round_trip_keeps_segmentations_and_writes_mask_areas(tmp_path):
    path, images = write_coco_file(tmp_path, GOOD)
    dataset = load_coco(path, images)
    written = convert_to_coco(dataset)
    assert [a["segmentation"] for a in written["annotations"]] == [
        GOOD[0]["segmentation"], GOOD[1]["segmentation"], [], GOOD[3]["segmentation"]
    ]  # fmt: skip
    assert [a["area"] for a in written["annotations"]] == [16.0, 0.0, 16.0, 16.0]  # mask, mask, box, mask
    again = load_coco(write_coco(dataset, tmp_path / "out.json"), images)
    assert [r.segmentations for r in again.records] == [r.segmentations for r in dataset.records]


def run_data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_command.add_arguments(parser)
    return data_command.run(parser.parse_args(argv))


def test_data_check_counts_masks_and_convert_skip_bad_drops_exactly_the_bad_ones(tmp_path, capsys):
    path, images = write_coco_file(tmp_path, GOOD + list(BAD.values()))
    assert run_data(["check", "--format", "coco", "--images", str(images), "--annotations", str(path)]) == 1
    out = capsys.readouterr().out
    assert "masks: 3 of 4 boxes (2 polygons, 1 RLE; 1 crowd)" in out
    for ann_id in BAD:
        assert f"annotation id {ann_id} (image id 1)" in out
    output = tmp_path / "clean.json"
    argv = ["convert", "--format", "coco", "--images", str(images), "--annotations", str(path), "--output", str(output)]
    with pytest.raises(DatasetError):
        run_data(argv)
    assert run_data([*argv, "--skip-bad"]) == 0
    assert "4 boxes (3 with masks)" in capsys.readouterr().out
    kept = json.loads(output.read_text())["annotations"]
    assert [a["bbox"][0] for a in kept] == [0, 10, 20, 30]
    assert [a["segmentation"] for a in kept] == [a.get("segmentation", []) for a in GOOD]


# --- coco128 -----------------------------------------------------------------------------------------------------


@needs_coco128
def test_coco128_train_masks_load_and_lie_inside_their_boxes(tmp_path):
    from pycocotools.coco import COCO

    dataset = load_coco(COCO128_TRAIN, COCO128 / "train2017")
    assert dataset.problems == [] and dataset.has_masks
    assert dataset.mask_counts() == {"polygon": 929, "rle": 10, "crowd": 10}
    for record in dataset.records:
        for mask, box in zip(record_masks(record, record.height, record.width), record.boxes.astype(np.float64)):
            inside = mask_box(mask)
            assert (inside[:2] >= box[:2] - 1).all() and (inside[2:] <= box[2:] + 1).all(), (record.image_id, box)
    # The written file keeps every segmentation, and pycocotools draws the same masks from it.
    path = write_coco(dataset, tmp_path / "train.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
    record = dataset.records[0]
    annotations = gt.loadAnns(gt.getAnnIds(imgIds=[record.image_id]))
    np.testing.assert_array_equal(
        np.stack([gt.annToMask(a) for a in annotations]), record_masks(record, record.height, record.width)
    )
    again = load_coco(path, COCO128 / "train2017")
    assert [r.segmentations for r in again.records] == [r.segmentations for r in dataset.records]


@needs_coco128
def test_coco128_val_is_box_only():
    dataset = load_coco(COCO128 / "annotations" / "instances_val2017.json", COCO128 / "val2017")
    assert not dataset.has_masks and dataset.problems == []


# --- training: a mask preset on box-only data --------------------------------------------------------------------


def write_yolo(root: Path) -> tuple[Path, Path, Path]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    Image.new("RGB", (64, 48)).save(images / "a.jpg")
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "names.txt").write_text("cat\n")
    return images, labels, root / "names.txt"


def test_mask_preset_on_yolo_data_stops_with_one_line(tmp_path, capsys):
    images, labels, names = write_yolo(tmp_path)
    code = cli.main(
        ["train", "--preset", "cascade_mask_rcnn_r50_fpn", "--format", "yolo", "--train-images", str(images),
         "--train-annotations", str(labels), "--names", str(names), "--device", "cpu",
         "--output-dir", str(tmp_path / "run"), "--progress", "off"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"error: the preset cascade_mask_rcnn_r50_fpn needs instance masks, but {labels} has none "
        "(VOC / YOLO / txt data are box-only); use a box preset such as cascade_rcnn_r50_fpn\n"
    )


@pytest.mark.parametrize("preset", ["cascade_mask_rcnn_r50_fpn_detectron2", "cascade_rcnn_r50_fpn"])
def test_mask_models_on_voc_and_box_only_coco_are_refused(tmp_path, preset):
    from cascade_rcnn.training import Trainer

    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "JPEGImages" / "a.jpg")
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height><depth>3</depth></size>"
        "<object><name>cat</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>20</ymax></bndbox>"
        "</object></annotation>"
    )
    assert len(load_voc(tmp_path / "Annotations", tmp_path / "JPEGImages")) == 1
    coco, coco_images = write_coco_file(tmp_path / "coco", [annotation(1, 0, [])])
    model = {"mask": {"heads": "single"}} if preset == "cascade_rcnn_r50_fpn" else {}
    expected = (
        f"the preset {preset} needs instance masks" if "mask" in preset else "model.mask.heads (preset cascade_rcnn"
    )
    fix = "a box preset such as cascade_rcnn_r50_fpn_detectron2" if "mask" in preset else "model.mask.heads = 'none'"
    for data, why in (
        ({"format": "voc", "train_images": str(tmp_path / "JPEGImages"),
          "train_annotations": str(tmp_path / "Annotations")}, "VOC / YOLO / txt data are box-only"),
        ({"format": "coco", "train_images": str(coco_images), "train_annotations": str(coco)},
         "no annotation has a 'segmentation'"),
    ):  # fmt: skip
        exp = experiment_from_dict(
            {"preset": preset, "model": model, "data": data, "train": {"device": "cpu", "output_dir": str(tmp_path)}}
        )
        with pytest.raises(ConfigError) as error:
            Trainer(exp, log=lambda message: None)
        message = str(error.value)
        assert "\n" not in message and message.startswith(expected) and why in message and message.endswith(fix)


def test_mask_preset_on_mask_data_trains_on_targets_with_masks(tmp_path):
    from cascade_rcnn.training import Trainer

    path, images = write_coco_file(tmp_path, GOOD)
    exp = experiment_from_dict(
        {"preset": "cascade_mask_rcnn_r50_fpn", "model": TINY_MODEL,
         "data": {"train_images": str(images), "train_annotations": str(path), "num_workers": 0},
         "train": {"device": "cpu", "output_dir": str(tmp_path / "run"), "calibration_images": 1}}
    )  # fmt: skip
    trainer = Trainer(exp, log=lambda message: None)
    _, target = trainer.train_set[0]
    assert target["masks"].shape == (3, 48, 64) and target["masks"].dtype == torch.uint8
    assert target["masks"][0].sum() == 16  # annotation 1's 4x4 square
