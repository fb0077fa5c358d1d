"""eval's report.html and data preview's preview.html in a real browser: Debian's headless Chromium, driven by
selenium through Debian's chromedriver (.ci/run installs both; elsewhere these tests skip and say so).

Checked: no console errors (nor failed loads, which Chromium logs as errors); every image and plot decoded
(`naturalWidth > 0`); nothing fetched from outside the page and its folder; the numbers the page shows equal
metrics.json, metrics_segm.json, per_class_ap.json and metrics_stage*.json; the TIDE section names exactly the planted
errors; sorting the per-class table by AP works.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cascade_rcnn.cli import main
from cascade_rcnn.commands import predict as predict_command
from cascade_rcnn.evaluation.coco import METRIC_NAMES
from cascade_rcnn.evaluation.report import fmt
from tests.report_fixtures import PlantedDetector, write_planted_set

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000")  # fmt: skip


def _missing() -> str | None:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        return (f"Debian's chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium "
                "chromium-driver (.ci/run does)")  # fmt: skip
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path_factory.mktemp("chromium-profile")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open(browser: Any, page: Path) -> list[dict[str, Any]]:
    """Load `page`, wait for it, and return what the console logged while it loaded."""
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(page.resolve().as_uri())
    browser.execute_async_script("""
        var done = arguments[arguments.length - 1];
        if (document.readyState === "complete") { done(); } else { window.addEventListener("load", done); }
    """)
    return browser.get_log("browser")


def _check_page_health(browser: Any, page: Path, logs: list[dict[str, Any]], min_images: int) -> None:
    errors = [entry for entry in logs if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt]);")
    assert len(images) >= min_images
    assert all(complete and width > 0 for complete, width, _ in images), [alt for c, w, alt in images if not w]
    # Only this page's folder and data URIs: no CDN, no network.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(name.startswith(("data:", page.parent.resolve().as_uri())) for name in resources), resources
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'));")
    assert all(href.startswith("#") or (page.parent / href).is_file() for href in links), links
    assert browser.find_element("tag name", "h1").text  # not an empty page


def _cells(browser: Any, selector: str) -> list[tuple[dict[str, str], str]]:
    """(data-* attributes, shown text) of each element matching `selector`."""
    return [(cell, text) for cell, text in browser.execute_script(f"""
        return Array.from(document.querySelectorAll({json.dumps(selector)})).map(e => [Object.assign({{}}, e.dataset),
                                                                                      e.textContent.trim()]);
    """)]  # fmt: skip


@pytest.fixture(scope="module")
def mask_model_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """eval --report of a stand-in cascade mask model on the planted set: bbox and segm, three stages, galleries."""
    root = tmp_path_factory.mktemp("report")
    planted = write_planted_set(root / "set")
    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict_command, "load_detector",
                      lambda weights, device, preset, bf16=False: PlantedDetector(masks=True))  # fmt: skip
        code = main(["eval", "--weights", "w", "--images", str(planted.images), "--annotations",
                     str(planted.annotations), "--out", str(out), "--report"])  # fmt: skip
    assert code == 0
    return out


def test_report_loads_cleanly_and_shows_the_numbers_of_the_metrics_files(browser: Any, mask_model_report: Path) -> None:
    out = mask_model_report
    page = out / "report.html"
    logs = _open(browser, page)
    # The two mean PR plots, 2 x 3 per-class ones, confusion, 2 TIDE, stages, 5 false positives and 1 miss.
    _check_page_health(browser, page, logs, min_images=2 + 6 + 1 + 2 + 1 + 6)

    shown = _cells(browser, "#metrics td[data-metric]")
    assert len(shown) == 2 * len(METRIC_NAMES)
    files = {"bbox": "metrics.json", "segm": "metrics_segm.json"}
    for cell, text in shown:
        metrics = json.loads((out / files[cell["iouType"]]).read_text())
        assert text == fmt(metrics[cell["metric"]]), cell

    for iou_type, name in (("bbox", "per_class_ap.json"), ("segm", "per_class_ap_segm.json")):
        per_class = json.loads((out / name).read_text())
        rows = browser.execute_script(f"""
            return Array.from(document.querySelectorAll('table.per-class[data-iou-type="{iou_type}"] tbody tr')).map(
                r => [r.dataset.class, r.querySelector('td[data-metric="AP"]').textContent]);
        """)  # fmt: skip
        assert dict(rows) == {name: fmt(ap) for name, ap in per_class.items()}

    stages = _cells(browser, "#stages td[data-stage]")
    assert {cell["stage"] for cell, _ in stages} == {"stage 1", "stage 2", "stage 3", "ensemble"}
    for cell, text in stages:
        name = "metrics.json" if cell["stage"] == "ensemble" else f"metrics_stage{cell['stage'][-1]}.json"
        assert text == fmt(json.loads((out / name).read_text())[cell["metric"]]), cell

    found = [text for _, text in _cells(browser, ".errors-found")]
    assert found == ["cls, loc, both, dupe, bkg, miss"] * 2  # bbox and segm
    counts = _cells(browser, 'table.tide[data-iou-type="bbox"] tr[data-error] td.num:first-of-type')
    assert [text for _, text in counts] == ["1"] * 6
    kinds = [cell["kind"] for cell, _ in _cells(browser, "figure.crop")]
    assert kinds == ["cls", "loc", "both", "bkg", "dupe", "miss"]


def test_per_class_table_sorts_by_ap(browser: Any, mask_model_report: Path) -> None:
    logs = _open(browser, mask_model_report / "report.html")
    table = 'table.per-class[data-iou-type="bbox"]'
    header = browser.find_element("css selector", f"{table} th:nth-child(5)")
    assert header.text.startswith("AP")

    def order() -> list[float]:
        return browser.execute_script(f"""
            return Array.from(document.querySelectorAll('{table} tbody td[data-metric="AP"]')).map(
                td => parseFloat(td.dataset.value));
        """)  # fmt: skip

    header.click()
    assert order() == sorted(order(), reverse=True)
    header.click()
    assert order() == sorted(order())
    assert not [entry for entry in logs + browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_report_of_empty_detections_says_so_in_the_browser(browser: Any, tmp_path: Path) -> None:
    planted = write_planted_set(tmp_path / "set")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "out"
    assert main(["eval", "--detections", str(empty), "--annotations", str(planted.annotations), "--images",
                 str(planted.images), "--out", str(out), "--report"]) == 0  # fmt: skip
    page = out / "report.html"
    logs = _open(browser, page)
    _check_page_health(browser, page, logs, min_images=4)
    notes = [element.text for element in browser.find_elements("css selector", "p.note")]
    assert any("every object counts as missed" in note for note in notes)
    assert browser.find_element("id", "num-detections").text == "0"


def test_data_preview_loads_cleanly(browser: Any, tmp_path: Path) -> None:
    planted = write_planted_set(tmp_path / "set")
    out = tmp_path / "preview"
    assert main(["data", "preview", "--format", "coco", "--images", str(planted.images), "--annotations",
                 str(planted.annotations), "--out", str(out)]) == 0  # fmt: skip
    page = out / "preview.html"
    logs = _open(browser, page)
    _check_page_health(browser, page, logs, min_images=4)  # 2 plots, 2 thumbnails
    summary = json.loads((out / "preview.json").read_text())
    assert browser.find_element("id", "num-boxes").text == str(summary["num_boxes"])
    rows = browser.execute_script("""
        return Array.from(document.querySelectorAll('#class-counts tbody tr')).map(
            r => [r.dataset.class, r.cells[2].textContent]);
    """)
    assert dict(rows) == {row["name"]: str(row["boxes"]) for row in summary["classes"]}
