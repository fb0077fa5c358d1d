"""`cascade-rcnn predict` and `cascade-rcnn eval`: inputs, failures, output names, filters, label mapping, per-stage.

Most tests replace the model with a small fake (`load_detector` monkeypatched in the command module), so they check
the commands' own behaviour in milliseconds; the last two run a real, untrained Detector end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rcnn.cli import build_parser, main
from cascade_rcnn.commands import predict as predict_command
from cascade_rcnn.config import COCO_CLASSES
from cascade_rcnn.data.image_io import load_image
from cascade_rcnn.evaluation.coco import COCO_CATEGORY_IDS, METRIC_NAMES
from cascade_rcnn.structures import Detections

COCO128 = Path(
    os.environ.get("CASCADE_RCNN_COCO128", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco128")
)
VAL_JSON = COCO128 / "annotations" / "instances_val2017.json"
VAL_IMAGES = COCO128 / "val2017"
needs_coco128 = pytest.mark.skipif(
    not VAL_JSON.is_file(), reason=f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128 to its folder)"
)


# --- fakes ------------------------------------------------------------------------------------------------------------


class FixedBoxDetector:
    """Three detections per image at fixed fractions of its size: person 0.9, car 0.6, dog 0.2. Ignores
    `score_thresh` (records it), so the command's own filtering is what the tests see."""

    class_names = ("person", "car", "dog")
    fractions = ([0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.9], [0.0, 0.0, 0.3, 0.3])

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.score_threshs: list[float | None] = []

    def predict(self, images: list[np.ndarray], *, batch_size: int = 1, score_thresh: float | None = None,
                return_stages: bool = False) -> list[Detections]:  # fmt: skip
        assert all(isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 for image in images)
        self.batch_sizes.append(len(images))
        self.score_threshs.append(score_thresh)
        out = []
        for image in images:
            h, w = image.shape[:2]
            boxes = torch.tensor(self.fractions) * torch.tensor([w, h, w, h], dtype=torch.float32)
            out.append(Detections(boxes, torch.tensor([0.9, 0.6, 0.2]), torch.tensor([0, 1, 2]), self.class_names))
        return out


class OracleDetector:
    """Returns each image's ground truth (recognised by its pixels) with score 1; stage k's boxes are shifted by a
    fraction of their size that shrinks with k, so the stages score worse than the ensemble."""

    def __init__(self, dataset: dict, images_dir: Path, class_names: tuple[str, ...]) -> None:
        self.class_names = class_names
        names = {c["id"]: c["name"] for c in dataset["categories"]}
        self.answers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for image in dataset["images"]:
            path = images_dir / image["file_name"]
            if not path.is_file() or path.stat().st_size < 100:
                continue
            anns = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
            labels = torch.tensor([class_names.index(names[a["category_id"]]) for a in anns], dtype=torch.long)
            self.answers[self._key(load_image(path))] = (boxes.float(), labels)

    @staticmethod
    def _key(image: np.ndarray) -> str:
        return hashlib.sha1(image.tobytes()).hexdigest()

    def predict(self, images: list[np.ndarray], *, batch_size: int = 1, score_thresh: float | None = None,
                return_stages: bool = False) -> list[Detections]:  # fmt: skip
        out = []
        for image in images:
            boxes, labels = self.answers[self._key(image)]
            scores = torch.ones(len(boxes))
            det = Detections(boxes, scores, labels, self.class_names)
            if return_stages:
                size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
                det.stages = [Detections(boxes + size * shift, scores, labels, self.class_names)
                              for shift in (0.2, 0.1, 0.05)]  # fmt: skip
            out.append(det)
        return out


def _write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FixedBoxDetector:
    detector = FixedBoxDetector()
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: detector)
    return detector


def _results(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "detections.json").read_text())


# --- the CLI ----------------------------------------------------------------------------------------------------------


def test_help_lists_predict_and_eval() -> None:
    text = build_parser().format_help()
    assert "predict" in text and "eval" in text


# --- predict ----------------------------------------------------------------------------------------------------------


def test_predict_skips_unreadable_inputs_and_writes_the_others(
    fake: FixedBoxDetector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    numbered = _write_image(tmp_path / "in" / "000000000042.png", (80, 60), seed=0)
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    photo = _write_image(tmp_path / "in" / "photo.jpg", (50, 70), seed=1)
    out = tmp_path / "out"

    code = main(["predict", "--weights", "w", str(numbered), str(broken), str(photo), str(tmp_path / "missing.jpg"),
                 "--out", str(out)])  # fmt: skip

    assert code == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "missing.jpg" in err
    results = _results(out)
    assert {r["file_name"] for r in results} == {"000000000042.png", "photo.jpg"}
    # image_id: the number in a numeric stem, otherwise the running index (photo.jpg is the 3rd input found).
    assert {r["file_name"]: r["image_id"] for r in results} == {"000000000042.png": 42, "photo.jpg": 3}
    person = next(r for r in results if r["file_name"] == "000000000042.png" and r["category_name"] == "person")
    assert person["bbox"] == pytest.approx([8.0, 6.0, 32.0, 24.0])  # xyxy (8, 6, 40, 30) as xywh
    assert person["category_id"] == 1  # not a COCO-80 model: label + 1
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000000042.png", "photo.jpg"]
    drawn = Image.open(out / "images" / "000000000042.png")
    assert drawn.size == (80, 60)
    assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(Image.open(numbered)))


def test_predict_expands_folders_and_globs_once_each_in_batches(fake: FixedBoxDetector, tmp_path: Path) -> None:
    for i, name in enumerate(["b.png", "a.png", "c.jpg"]):
        _write_image(tmp_path / "in" / name, (40, 30), seed=i)
    (tmp_path / "in" / "notes.txt").write_text("not an image: folders and globs skip it")
    out = tmp_path / "out"

    code = main(["predict", "--weights", "w", str(tmp_path / "in"), str(tmp_path / "in" / "*.png"), "--out", str(out),
                 "--batch-size", "2"])  # fmt: skip

    assert code == 0
    assert [r["file_name"] for r in _results(out)][::2] == ["a.png", "b.png", "c.jpg"]  # sorted; 2 kept per image
    assert fake.batch_sizes == [2, 1]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.png", "b.png", "c.jpg"]


def test_predict_score_threshold_and_class_filter(
    fake: FixedBoxDetector, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _write_image(tmp_path / "x.png", (40, 30), seed=0)
    assert main(["predict", "--weights", "w", str(image), "--out", str(tmp_path / "default")]) == 0
    assert fake.score_threshs == [0.3]
    assert sorted(r["category_name"] for r in _results(tmp_path / "default")) == ["car", "person"]  # dog is 0.2

    assert main(["predict", "--weights", "w", str(image), "--out", str(tmp_path / "all"), "--score-thresh", "0"]) == 0
    assert len(_results(tmp_path / "all")) == 3

    assert main(["predict", "--weights", "w", str(image), "--out", str(tmp_path / "cars"), "--classes", " CAR,dog",
                 "--score-thresh", "0.1"]) == 0  # fmt: skip
    assert sorted(r["category_name"] for r in _results(tmp_path / "cars")) == ["car", "dog"]

    capsys.readouterr()
    assert main(["predict", "--weights", "w", str(image), "--out", str(tmp_path / "bad"), "--classes", "zebra"]) == 2
    err = capsys.readouterr().err
    assert "'zebra'" in err and "person, car, dog" in err


def test_output_names_cannot_escape_the_output_folder(tmp_path: Path) -> None:
    taken: set[str] = set()
    hostile = ["../../etc/passwd.jpg", "/abs/path/x.png", "..\\..\\win.jpg", "..", ".hidden.jpg", "", "a/b/..",
               "CON.JPG", "x.jpg", "X.jpg", "x.jpg", "weird name;$(rm).gif"]  # fmt: skip
    names = [predict_command.safe_output_name(name, taken) for name in hostile]
    out = (tmp_path / "images").resolve()
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name, name
        assert (out / name).resolve().parent == out
    assert len({n.lower() for n in names}) == len(names)  # unique, even on case-insensitive disks
    assert names[8:11] == ["x.jpg", "X_1.jpg", "x_2.jpg"]
    assert names[-1] == "weird_name_rm_.png"  # gif output is written as png


def test_predict_same_base_names_from_different_folders_are_kept_apart(fake: FixedBoxDetector, tmp_path: Path) -> None:
    inputs = [_write_image(tmp_path / folder / "img.jpg", (40, 30), seed=i) for i, folder in enumerate("ab")]
    inputs.append(_write_image(tmp_path / "c" / ".hidden.png", (40, 30), seed=2))
    out = tmp_path / "out"
    assert main(["predict", "--weights", "w", *map(str, inputs), "--out", str(out)]) == 0
    written = sorted(p.name for p in (out / "images").iterdir())
    assert written == ["hidden.png", "img.jpg", "img_1.jpg"]
    assert len({r["image_id"] for r in _results(out)}) == 3
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "images"]


def test_image_ids_numeric_stems_kept_and_unique() -> None:
    paths = [Path("000123.jpg"), Path("a.jpg"), Path("b/000123.jpg"), Path("2.jpg"), Path("٣.jpg")]
    ids = predict_command.assign_image_ids(paths)
    assert ids[0] == 123 and ids[3] == 2
    assert len(set(ids)) == len(ids)


# --- eval -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The first 4 coco128 val images with their annotations and all 80 categories, as an annotation file."""
    if not VAL_JSON.is_file():
        pytest.skip(f"coco128 not found at {COCO128} (set CASCADE_RCNN_COCO128 to its folder)")
    dataset = json.loads(VAL_JSON.read_text())
    images = sorted(dataset["images"], key=lambda image: image["id"])[:4]
    ids = {image["id"] for image in images}
    small = {"images": images, "categories": dataset["categories"],
             "annotations": [a for a in dataset["annotations"] if a["image_id"] in ids]}  # fmt: skip
    path = tmp_path_factory.mktemp("small") / "small.json"
    path.write_text(json.dumps(small))
    return path, small


@needs_coco128
def test_eval_detections_file_prints_table_and_writes_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = json.loads(VAL_JSON.read_text())
    detections = tmp_path / "gt_as_detections.json"
    detections.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                       "score": 1.0} for a in dataset["annotations"]]))  # fmt: skip
    out = tmp_path / "out"

    assert main(["eval", "--detections", str(detections), "--annotations", str(VAL_JSON), "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    assert "AP      0.50:0.95  all         100   1.000" in printed
    assert list(json.loads((out / "metrics.json").read_text())) == list(METRIC_NAMES)
    assert (out / "pr_curves" / "pr_iou0.50.png").is_file()


@needs_coco128
def test_eval_flag_combinations_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    detections = tmp_path / "d.json"
    detections.write_text("[]")
    assert main(["eval", "--detections", str(detections), "--annotations", str(VAL_JSON), "--per-stage"]) == 2
    assert "--per-stage only apply with --weights" in capsys.readouterr().err
    assert main(["eval", "--weights", "w", "--annotations", str(VAL_JSON)]) == 2
    assert "--weights needs --images" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exactly one of --detections / --weights
        main(["eval", "--annotations", str(VAL_JSON)])


@needs_coco128
@pytest.mark.parametrize("class_names", [COCO_CLASSES, tuple(reversed(COCO_CLASSES))], ids=["coco-order", "reversed"])
def test_eval_model_mode_with_oracle_scores_ap_one(
    small_set: tuple[Path, dict], class_names: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    annotations, dataset = small_set
    oracle = OracleDetector(dataset, VAL_IMAGES, class_names)
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: oracle)
    out = tmp_path / "out"

    code = main(["eval", "--weights", "w", "--images", str(VAL_IMAGES), "--annotations", str(annotations),
                 "--out", str(out), "--batch-size", "3"])  # fmt: skip

    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    results = _results(out)
    assert len(results) == len(dataset["annotations"])
    # Labels went to the right COCO ids whatever the model's class order (by name when the names match).
    expected = sorted((a["image_id"], a["category_id"]) for a in dataset["annotations"])
    assert sorted((r["image_id"], r["category_id"]) for r in results) == expected
    assert set(r["category_id"] for r in results) <= set(COCO_CATEGORY_IDS)
    assert "by class name" in capsys.readouterr().err


@needs_coco128
def test_eval_per_stage_reports_each_stage_and_the_ensemble(
    small_set: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations, dataset = small_set
    oracle = OracleDetector(dataset, VAL_IMAGES, COCO_CLASSES)
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: oracle)
    out = tmp_path / "out"

    code = main(["eval", "--weights", "w", "--images", str(VAL_IMAGES), "--annotations", str(annotations),
                 "--out", str(out), "--per-stage"])  # fmt: skip

    assert code == 0
    stage_ap = [json.loads((out / f"metrics_stage{k}.json").read_text())["AP"] for k in (1, 2, 3)]
    ensemble_ap = json.loads((out / "metrics.json").read_text())["AP"]
    assert stage_ap[0] < stage_ap[1] < stage_ap[2] < ensemble_ap  # boxes shifted by 20%, 10%, 5%, 0% of their size
    table = capsys.readouterr().out
    for row in ("stage 1", "stage 2", "stage 3", "ensemble"):
        assert row in table


@needs_coco128
def test_eval_unreadable_image_is_skipped_and_missing_one_is_an_error(
    small_set: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations, dataset = small_set
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for image in dataset["images"]:
        (images_dir / image["file_name"]).symlink_to(VAL_IMAGES / image["file_name"])
    (images_dir / "broken.jpg").write_bytes(b"truncated")
    broken_image = {"id": 5, "file_name": "broken.jpg", "width": 9, "height": 9}
    broken_object = {"id": 99999, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
    with_broken = dict(dataset, images=[*dataset["images"], broken_image])
    with_broken["annotations"] = [*dataset["annotations"], broken_object]
    broken_json = tmp_path / "with_broken.json"
    broken_json.write_text(json.dumps(with_broken))
    oracle = OracleDetector(dataset, images_dir, COCO_CLASSES)
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: oracle)

    code = main(["eval", "--weights", "w", "--images", str(images_dir), "--annotations", str(broken_json),
                 "--out", str(tmp_path / "out")])  # fmt: skip

    assert code == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    # The unreadable image is left out of the scoring rather than counted as all-missed.
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["AP"] == pytest.approx(1.0, abs=1e-12)

    (images_dir / "broken.jpg").unlink()
    assert main(["eval", "--weights", "w", "--images", str(images_dir), "--annotations", str(broken_json)]) == 2
    assert "broken.jpg (image id 5)" in capsys.readouterr().err


# --- end to end with the real (untrained) Detector ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_weights(module_tmp: Path) -> Path:
    """An untrained 3-class detector saved as a weights file; a small input size and 100 proposals per image keep
    CPU inference quick (the RoI heads' cost grows with the proposal count, not the image size)."""
    from cascade_rcnn.api import Detector

    torch.manual_seed(0)
    detector = Detector(preset="cascade_rcnn_r50_fpn", num_classes=3, class_names=("person", "car", "dog"),
                        **{"transform.min_size": 192, "transform.max_size": 320, "rpn.pre_nms_top_n_test": 200,
                           "rpn.post_nms_top_n_test": 100})  # fmt: skip
    return detector.save(module_tmp / "tiny.safetensors")


@needs_coco128
def test_predict_end_to_end_with_real_detector(tiny_weights: Path, tmp_path: Path) -> None:
    inputs = [VAL_IMAGES / "000000000139.jpg", VAL_IMAGES / "000000000285.jpg"]
    out = tmp_path / "out"

    code = main(["predict", "--weights", str(tiny_weights), *map(str, inputs), "--out", str(out), "--device", "cpu",
                 "--score-thresh", "0", "--batch-size", "2"])  # fmt: skip

    assert code == 0
    results = _results(out)
    sizes = {path.name: Image.open(path).size for path in inputs}
    assert {r["file_name"] for r in results} <= set(sizes)
    assert {r["image_id"] for r in results} <= {139, 285}
    for r in results:  # boxes in the original image's pixels, not the 256-pixel network input
        w, h = sizes[r["file_name"]]
        x, y, bw, bh = r["bbox"]
        assert -1e-3 <= x and -1e-3 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3 and bw >= 0 and bh >= 0
        assert r["category_name"] in ("person", "car", "dog") and r["category_id"] in (1, 2, 3)
    for name, size in sizes.items():
        assert Image.open(out / "images" / name).size == size


@needs_coco128
def test_eval_per_stage_end_to_end_with_real_detector(tiny_weights: Path, tmp_path: Path) -> None:
    dataset = json.loads(VAL_JSON.read_text())
    images = [image for image in dataset["images"] if image["id"] in (139, 285)]
    categories = [c for c in dataset["categories"] if c["name"] in ("person", "car", "dog")]
    kept = {c["id"] for c in categories}
    annotations = tmp_path / "two.json"
    annotations.write_text(json.dumps({"images": images, "categories": categories, "annotations": [
        a for a in dataset["annotations"] if a["image_id"] in (139, 285) and a["category_id"] in kept]}))  # fmt: skip
    out = tmp_path / "out"

    code = main(["eval", "--weights", str(tiny_weights), "--images", str(VAL_IMAGES), "--annotations",
                 str(annotations), "--out", str(out), "--per-stage", "--device", "cpu"])  # fmt: skip

    assert code == 0
    for name in ("metrics.json", "metrics_stage1.json", "metrics_stage2.json", "metrics_stage3.json"):
        metrics = json.loads((out / name).read_text())
        assert list(metrics) == list(METRIC_NAMES)
        assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in metrics.values())
    assert {r["category_id"] for r in _results(out)} <= kept


def test_bf16_flag_reaches_the_detector_and_is_refused_with_onnxruntime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _write_image(tmp_path / "in" / "a.png", (80, 60), seed=0)
    seen: dict[str, bool] = {}
    detector = FixedBoxDetector()

    def load(weights: str, device: str | None, preset: str | None, bf16: bool = False) -> FixedBoxDetector:
        seen["bf16"] = bf16
        return detector

    monkeypatch.setattr(predict_command, "load_detector", load)
    assert main(["predict", "--weights", "w.safetensors", str(image), "--out", str(tmp_path / "o"), "--bf16"]) == 0
    assert seen == {"bf16": True}
    code = main(["predict", "--weights", "w.onnx", str(image), "--out", str(tmp_path / "o2"), "--bf16",
                 "--backend", "onnxruntime"])  # fmt: skip
    assert code == 2 and "--bf16 applies to the torch backend" in capsys.readouterr().err


def test_default_batch_size_is_one_on_the_cpu() -> None:
    from types import SimpleNamespace

    assert predict_command.default_batch_size(SimpleNamespace(device=torch.device("cpu"))) == 1
    assert predict_command.default_batch_size(SimpleNamespace(device="cuda:0")) == 2
    assert predict_command.default_batch_size(object()) == 1  # ONNX Runtime: no torch device, runs on the CPU
