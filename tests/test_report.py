"""eval --report and data preview without a browser: the TIDE errors named on planted detections, the confusion
matrix, the report's numbers against eval's own files, stages, masks, bad input, and the preview's counts.

The browser checks (console errors, images loaded, numbers shown) are in test_report_browser.py.
"""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_rcnn.cli import main
from cascade_rcnn.commands import predict as predict_command
from cascade_rcnn.evaluation.coco import METRIC_NAMES, evaluate_coco, load_coco_gt
from cascade_rcnn.evaluation.confusion import DEFAULT_SCORE_THRESHOLD, confusion_matrix
from cascade_rcnn.evaluation.report import fmt
from cascade_rcnn.evaluation.tide import ERROR_TYPES, analyze_errors
from cascade_rcnn.evaluation.visualize import draw_detections
from tests.report_fixtures import ERROR_NAMES, OBJECTS, PlantedDetector, write_planted_set

# --- TIDE -------------------------------------------------------------------------------------------------------------


def test_error_types_are_ours_in_tidecv_order() -> None:
    assert ERROR_TYPES == ERROR_NAMES


@pytest.mark.parametrize("without", [None, *ERROR_NAMES])
def test_tide_names_exactly_the_planted_errors(tmp_path: Path, without: str | None) -> None:
    planted = write_planted_set(tmp_path, without=without)
    gt = load_coco_gt(planted.annotations)

    analysis = analyze_errors(gt, planted.results)

    expected = {kind: int(kind != without) for kind in ERROR_NAMES}
    assert analysis.counts == expected
    for kind in ERROR_NAMES:  # each planted error outranks a true positive of its class: fixing it raises AP
        assert (analysis.dap[kind] > 0) == (kind != without), kind
    # Each error points at the detection that was planted for it (and "miss" at object F, id 6).
    for case in analysis.cases:
        if case.kind == "miss":
            assert case.detection is None and case.annotation_id == list(OBJECTS).index("F") + 1
        else:
            assert planted.names[case.detection] == case.kind
    ids = {case.kind: case.annotation_id for case in analysis.cases}
    objects = {name: index + 1 for index, name in enumerate(OBJECTS)}
    if without != "cls":
        assert ids["cls"] == objects["B"]  # a cat box exactly on the dog B
    if without != "dupe":
        assert ids["dupe"] == objects["A"]  # repeats A, which tp_A took


def test_tide_without_detections_counts_every_object_missed(tmp_path: Path) -> None:
    planted = write_planted_set(tmp_path)
    analysis = analyze_errors(load_coco_gt(planted.annotations), [])
    assert analysis.counts == {**dict.fromkeys(ERROR_NAMES, 0), "miss": len(OBJECTS)}
    assert analysis.ap == 0.0 and math.isnan(analysis.dap["miss"])  # its oracle leaves nothing to score


def test_tide_leaves_matplotlib_style_alone(tmp_path: Path) -> None:
    import matplotlib

    before = dict(matplotlib.rcParams)
    planted = write_planted_set(tmp_path)
    analyze_errors(load_coco_gt(planted.annotations), planted.results)
    assert dict(matplotlib.rcParams) == before  # tidecv's plotter sets seaborn's style on construction


# --- confusion matrix ------------------------------------------------------------------------------------------------


def test_confusion_matrix_of_the_planted_set(tmp_path: Path) -> None:
    planted = write_planted_set(tmp_path)
    confusion = confusion_matrix(load_coco_gt(planted.annotations), planted.results)
    # rows ground truth (cat, dog, bird, background), columns prediction. A, C (cat) and B (dog), E (bird) are found;
    # D (dog, only a loc box) and F (cat) missed; cls, dupe (cat), loc, bkg (dog), both (bird) match nothing.
    assert confusion.matrix.tolist() == [[2, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 0], [2, 2, 1, 0]]
    assert confusion.score_threshold == DEFAULT_SCORE_THRESHOLD == 0.3
    assert confusion.labels == ["cat", "dog", "bird", "background"]


def test_confusion_matrix_counts_a_wrong_class_once_and_ignores_crowds_and_low_scores(tmp_path: Path) -> None:
    dataset = {"images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 200}],
               "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
               "annotations": [
                   {"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
                   {"id": 2, "image_id": 1, "category_id": 5, "bbox": [100, 100, 80, 80], "area": 6400, "iscrowd": 1},
               ]}  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    dets = [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 50, 48], "score": 0.8},  # a cat on the dog: confusion
            {"image_id": 1, "category_id": 5, "bbox": [1, 0, 50, 50], "score": 0.7},  # the dog is taken: background
            {"image_id": 1, "category_id": 5, "bbox": [110, 110, 40, 40], "score": 0.9},  # inside the cat crowd
            {"image_id": 1, "category_id": 9, "bbox": [0, 0, 50, 50], "score": 0.2}]  # below the score threshold
    confusion = confusion_matrix(load_coco_gt(path), dets)
    assert confusion.matrix.tolist() == [[0, 0, 0], [1, 0, 0], [1, 0, 0]]  # rows cat, dog, background
    assert confusion.most_confused() == [("dog", "cat", 1)]
    lower = confusion_matrix(load_coco_gt(path), dets, score_threshold=0.1)
    assert lower.matrix.tolist() == [[0, 0, 0], [0, 1, 0], [2, 0, 0]]  # the dog box takes the dog first


# --- the report from eval ---------------------------------------------------------------------------------------------


class _Links(HTMLParser):
    """Every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "src" and value is not None:
                self.sources.append(value)
            if name == "href" and value is not None:
                self.links.append(value)


def _run_eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_report_from_a_detections_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = write_planted_set(tmp_path / "set")
    out = tmp_path / "out"

    code, printed, _ = _run_eval(["--detections", str(planted.detections), "--annotations", str(planted.annotations),
                                  "--images", str(planted.images), "--out", str(out), "--report"], capsys)  # fmt: skip

    assert code == 0 and f"report written to {out / 'report.html'}" in printed
    report = json.loads((out / "report.json").read_text())
    box = report["iou_types"]["bbox"]
    assert box["metrics"] == json.loads((out / "metrics.json").read_text())
    assert {row["name"]: row["AP"] for row in box["per_class"]} == json.loads((out / "per_class_ap.json").read_text())
    assert [row["objects"] for row in box["per_class"]] == [3, 2, 1] and report["num_detections"] == 9
    assert box["tide"]["counts"] == dict.fromkeys(ERROR_NAMES, 1)
    assert report["confusion_matrix"]["matrix"][-1] == [2, 2, 1, 0]
    assert [item["kind"] for item in report["galleries"]["false_positives"]] == ["cls", "loc", "both", "bkg", "dupe"]
    assert [item["annotation_id"] for item in report["galleries"]["missed"]] == [6]
    for plot in ("report/pr_mean.png", "report/confusion_matrix.png", "report/tide_bbox.png",
                 "report/pr_by_class/1_cat.png", "report/pr_by_class/3_bird.png"):  # fmt: skip
        assert plot in report["plots"] and Image.open(out / plot).size[0] > 100

    page = (out / "report.html").read_text()
    links = _Links()
    links.feed(page)
    # Offline: everything shown is embedded; the crops link to drawn images beside the page.
    assert links.sources and all(src.startswith("data:image/") for src in links.sources)
    files = [href for href in links.links if not href.startswith("#")]
    assert files and all((out / href).is_file() for href in files)
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", page)
    assert 'class="errors-found">cls, loc, both, dupe, bkg, miss<' in page
    for name in METRIC_NAMES:
        value = box["metrics"][name]
        assert re.search(rf'data-metric="{name}" data-iou-type="bbox">{re.escape(fmt(value))}<', page), name


def test_eval_report_without_images_lists_the_gallery(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = write_planted_set(tmp_path / "set", without="dupe")
    out = tmp_path / "out"
    code, _, _ = _run_eval(["--detections", str(planted.detections), "--annotations", str(planted.annotations),
                            "--out", str(out), "--report"], capsys)  # fmt: skip
    assert code == 0
    page = (out / "report.html").read_text()
    assert "give <code>--images DIR</code>" in page and 'class="errors-found">cls, loc, both, bkg, miss<' in page
    assert not (out / "report" / "images").exists()


def test_eval_report_from_a_model_shows_each_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = write_planted_set(tmp_path / "set")
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: PlantedDetector())
    out = tmp_path / "out"

    code, printed, _ = _run_eval(["--weights", "w", "--images", str(planted.images), "--annotations",
                                  str(planted.annotations), "--out", str(out), "--report"], capsys)  # fmt: skip

    assert code == 0 and "stage 3" in printed  # --report scores the stages without --per-stage
    report = json.loads((out / "report.json").read_text())
    assert [stage["name"] for stage in report["stages"]] == ["stage 1", "stage 2", "stage 3"]
    for k, stage in enumerate(report["stages"], start=1):
        assert stage["metrics"] == json.loads((out / f"metrics_stage{k}.json").read_text())
    assert report["iou_types"]["bbox"]["metrics"] == json.loads((out / "metrics.json").read_text())
    assert report["iou_types"]["bbox"]["tide"]["counts"] == dict.fromkeys(ERROR_NAMES, 1)
    assert (out / "report" / "stages.png").is_file() and (out / "report" / "images" / "1.jpg").is_file()


def test_eval_report_of_a_mask_model_covers_segm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = write_planted_set(tmp_path / "set")
    detector = PlantedDetector(masks=True)
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: detector)
    out = tmp_path / "out"

    code, _, _ = _run_eval(["--weights", "w", "--images", str(planted.images), "--annotations",
                            str(planted.annotations), "--out", str(out), "--report"], capsys)  # fmt: skip

    assert code == 0
    report = json.loads((out / "report.json").read_text())
    segm = report["iou_types"]["segm"]
    assert segm["metrics"] == json.loads((out / "metrics_segm.json").read_text())
    assert {row["name"]: row["AP"] for row in segm["per_class"]} == json.loads(
        (out / "per_class_ap_segm.json").read_text())  # fmt: skip
    # The masks are ellipses in the boxes: the same errors, by mask IoU.
    assert segm["tide"]["counts"] == dict.fromkeys(ERROR_NAMES, 1)
    assert len(segm["pr_curves"]["per_class"]["cat"]) == 10  # one curve per IoU threshold
    assert (out / "report" / "pr_mean_segm.png").is_file() and (out / "report" / "tide_segm.png").is_file()
    page = (out / "report.html").read_text()
    assert 'data-metric="AP" data-iou-type="segm"' in page and 'id="classes-segm"' in page


def test_eval_report_pr_curves_are_cocoeval_precision(tmp_path: Path) -> None:
    from cascade_rcnn.evaluation.report import write_report

    planted = write_planted_set(tmp_path / "set")
    gt = load_coco_gt(planted.annotations)
    result = evaluate_coco(gt, planted.results)
    write_report(gt, planted.results, [result], tmp_path / "out")
    curves = json.loads((tmp_path / "out" / "report.json").read_text())["iou_types"]["bbox"]["pr_curves"]
    np.testing.assert_allclose(curves["per_class"]["dog"], result.precision[:, :, 1, 0, -1], atol=1e-4)
    np.testing.assert_allclose(curves["mean"][0], result.pr_curve(0), atol=1e-4)


# --- bad input --------------------------------------------------------------------------------------------------------


def _one_line_error(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_report_of_detections_about_other_images_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    planted = write_planted_set(tmp_path / "set")
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**det, "image_id": det["image_id"] + 1000} for det in planted.results]))
    code, _, err = _run_eval(["--detections", str(other), "--annotations", str(planted.annotations), "--out",
                              str(tmp_path / "out"), "--report"], capsys)  # fmt: skip
    assert "the two files are about different images" in _one_line_error(code, err)
    assert not (tmp_path / "out" / "report.html").exists()


def test_report_of_unknown_categories_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = write_planted_set(tmp_path / "set")
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**det, "category_id": 40 + i % 8} for i, det in enumerate(planted.results)]))
    code, _, err = _run_eval(["--detections", str(other), "--annotations", str(planted.annotations), "--out",
                              str(tmp_path / "out"), "--report"], capsys)  # fmt: skip
    line = _one_line_error(code, err)
    assert "category_id 40 (2 detections), 41 (1)" in line and "and 3 more" in line and "ids: 1, 2, 3" in line


def test_report_of_an_empty_detections_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = write_planted_set(tmp_path / "set")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "out"
    code, _, _ = _run_eval(["--detections", str(empty), "--annotations", str(planted.annotations), "--images",
                            str(planted.images), "--out", str(out), "--report"], capsys)  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_detections"] == 0 and "no detection" in report["notes"][0]
    assert report["iou_types"]["bbox"]["tide"]["counts"]["miss"] == len(OBJECTS)
    assert len(report["galleries"]["missed"]) == len(OBJECTS) and not report["galleries"]["false_positives"]
    assert "every object counts as missed" in (out / "report.html").read_text()


def test_report_needs_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = write_planted_set(tmp_path / "set")
    code, _, err = _run_eval(["--detections", str(planted.detections), "--annotations", str(planted.annotations),
                              "--report"], capsys)  # fmt: skip
    assert "--report needs --out" in _one_line_error(code, err)


def test_ground_truth_tags_have_no_score() -> None:
    image = np.zeros((60, 120, 3), np.uint8)
    box = [[10.0, 25.0, 110.0, 55.0]]
    named = np.asarray(draw_detections(image, box, None, [0], ["cat"]))
    scored = np.asarray(draw_detections(image, box, [0.87], [0], ["cat"]))
    tag_width = [int((drawn[:24].max(axis=2) > 0).any(axis=0).sum()) for drawn in (named, scored)]
    assert 0 < tag_width[0] < tag_width[1]  # "cat" is a shorter tag than "cat 0.87"


# --- data preview -----------------------------------------------------------------------------------------------------


def test_data_preview_of_coco_and_yolo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = write_planted_set(tmp_path / "set")
    labels = tmp_path / "labels"
    labels.mkdir()
    lines = [f"{cat - 1} {(x + w / 2) / 320:.6f} {(y + h / 2) / 240:.6f} {w / 320:.6f} {h / 240:.6f}"
             for cat, (x, y, w, h) in OBJECTS.values()]  # fmt: skip
    (labels / "planted.txt").write_text("\n".join(lines) + "\n")
    (labels / "empty.txt").write_text("")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    sources = {"coco": ["--annotations", str(planted.annotations)],
               "yolo": ["--annotations", str(labels), "--names", str(names)]}  # fmt: skip
    for fmt_name, extra in sources.items():
        out = tmp_path / f"preview_{fmt_name}"
        code = main(["data", "preview", "--format", fmt_name, "--images", str(planted.images), *extra,
                     "--out", str(out)])  # fmt: skip
        assert code == 0 and "preview of 2 images written" in capsys.readouterr().out
        summary = json.loads((out / "preview.json").read_text())
        assert [(row["name"], row["boxes"], row["images"]) for row in summary["classes"]] == [
            ("cat", 3, 1), ("dog", 2, 1), ("bird", 1, 1)]  # fmt: skip
        assert summary["num_boxes"] == 6 and summary["images_without_boxes"] == 1
        assert sum(summary["box_sizes"]["sqrt_area"]["counts"]) == 6
        assert summary["box_sizes"]["coco_sizes"] == [0, 6, 0]  # 60x60 boxes: medium
        assert len(summary["gallery"]) == 2 and all((out / item["drawn"]).is_file() for item in summary["gallery"])
        assert {"preview/class_counts.png", "preview/box_sizes.png"} <= set(summary["plots"])
        page = (out / "preview.html").read_text()
        links = _Links()
        links.feed(page)
        assert all(src.startswith("data:image/") for src in links.sources)
