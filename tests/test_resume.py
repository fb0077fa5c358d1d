"""`predict --resume`: a run killed half-way and resumed writes what an uninterrupted run writes, running only the
images without a record; a torn last record is ignored; a resumption with other inputs or flags is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rcnn.cli import main
from cascade_rcnn.commands import predict as predict_command
from cascade_rcnn.inference import resume
from cascade_rcnn.structures import Detections
from tests.helpers import REPO, require_coco128


class PixelDetector:
    """Two detections per image, placed and scored from its pixels (so each image's differ), with masks (a mask
    model: `segmentation` goes through the records too); counts the images it is given. `interrupt_after`: raise
    KeyboardInterrupt (a Ctrl-C) once that many images were seen."""

    class_names = ("person", "car")

    def __init__(self, interrupt_after: int | None = None) -> None:
        self.seen = 0
        self.interrupt_after = interrupt_after

    def predict(self, images: list[np.ndarray], *, batch_size: int = 1, score_thresh: float | None = None,
                **kwargs: object) -> list[Detections]:  # fmt: skip
        out = []
        for image in images:
            if self.interrupt_after is not None and self.seen == self.interrupt_after:
                raise KeyboardInterrupt
            self.seen += 1
            h, w = image.shape[:2]
            m = float(image.mean()) / 255
            boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [m * 0.4, 0.2, 0.9, 0.9]]) * torch.tensor([w, h, w, h])
            masks = torch.zeros((2, h, w), dtype=torch.bool)
            masks[0, h // 4 :, : w // 2] = True
            masks[1, : int(m * h) + 1, w // 3 :] = True
            out.append(Detections(boxes, torch.tensor([0.9, 0.3 + m / 2]), torch.tensor([0, 1]), self.class_names,
                                  masks=masks))  # fmt: skip
        return out


def _images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, size=(30 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


def _use(monkeypatch: pytest.MonkeyPatch, detector: PixelDetector) -> PixelDetector:
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: detector)
    return detector


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_half_way_then_resume_equals_an_uninterrupted_run(
    tiny_weights: Path, tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = [str(p) for p in sorted((require_coco128() / "val2017").glob("*.jpg"))[:10]]
    flags = ["--weights", str(tiny_weights), "--device", "cpu", "--score-thresh", "0.05"]
    out = tmp_path / "killed"
    records = out / resume.PARTIAL_DIR / "rank0.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "cascade_rcnn", "predict", *inputs, *flags, "--out", str(out)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if records.is_file() and records.read_bytes().count(b"\n") >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed half-way"
    done = resume.scan_records(out / resume.PARTIAL_DIR, count=len(inputs))
    assert 3 <= len(done) < len(inputs) and not (out / "detections.json").exists()
    drawn_before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    assert main(["predict", *inputs, *flags, "--out", str(out), "--resume"]) == 0
    resumed = capsys.readouterr()
    assert main(["predict", *inputs, *flags, "--out", str(tmp_path / "whole")]) == 0

    assert f"resuming: {len(done)} of {len(inputs)} images already done" in resumed.err
    assert f"{len(inputs) - len(done)} images (and {len(done)} images of the interrupted run)" in resumed.out
    assert _tree(out) == _tree(tmp_path / "whole")  # detections.json and every picture; partial/ removed
    for index in done:  # the images done before the kill were not run again
        name = Path(inputs[index]).name
        assert (out / "images" / name).stat().st_mtime_ns == drawn_before[name]


def test_interrupted_run_with_a_torn_last_record_resumes_to_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _images(tmp_path / "in", 6)
    out = tmp_path / "out"
    _use(monkeypatch, PixelDetector(interrupt_after=3))
    assert main(["predict", *inputs, "--weights", "w", "--out", str(out)]) == 130  # Ctrl-C after 3 images
    part = out / resume.PARTIAL_DIR / "rank0.jsonl"
    assert part.read_bytes().count(b"\n") == 3
    with part.open("ab") as file:  # a kill while the 4th record was being written
        file.write(b'{"index": 3, "complete": true, "results": [{"image_id": 4, "bb')

    detector = _use(monkeypatch, PixelDetector())
    assert main(["predict", *inputs, "--weights", "w", "--out", str(out), "--resume"]) == 0
    assert detector.seen == 3  # the torn record's image and the two after it
    _use(monkeypatch, PixelDetector())
    assert main(["predict", *inputs, "--weights", "w", "--out", str(tmp_path / "whole")]) == 0
    assert _tree(out) == _tree(tmp_path / "whole")
    assert b'"segmentation"' in (out / "detections.json").read_bytes()


def test_resume_with_other_flags_or_inputs_is_refused_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _images(tmp_path / "in", 4)
    out = str(tmp_path / "out")
    _use(monkeypatch, PixelDetector(interrupt_after=2))
    assert main(["predict", *inputs, "--weights", "w", "--out", out]) == 130
    _use(monkeypatch, PixelDetector())
    capsys.readouterr()

    assert main(["predict", *inputs, "--weights", "w", "--out", out, "--resume", "--score-thresh", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--score-thresh 0.3" in err and "0.5" in err
    assert main(["predict", *inputs[:3], "--weights", "w", "--out", out, "--resume"]) == 2
    assert "inputs differ" in capsys.readouterr().err
    # --device and --batch-size do not change the results: a resumption may pick others.
    assert main(["predict", *inputs, "--weights", "w", "--out", out, "--resume", "--device", "cpu",
                 "--batch-size", "2"]) == 0  # fmt: skip
    assert "resuming: 2 of 4" in capsys.readouterr().err
    # Nothing left to resume (the run completed, partial/ is gone): a fresh run, said on one line.
    assert main(["predict", *inputs, "--weights", "w", "--out", out, "--resume"]) == 0
    assert "--resume: no interrupted run in" in capsys.readouterr().err


def test_image_whose_picture_failed_is_kept_and_run_again_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    (out / "images" / "img1.png").mkdir(parents=True)  # a folder where the picture should go: its save fails
    _use(monkeypatch, PixelDetector())
    assert main(["predict", *inputs, "--weights", "w", "--out", str(out)]) == 1
    first = (out / "detections.json").read_bytes()
    assert b'"img1.png"' in first  # its detections are kept, as a one-pass run keeps them

    (out / "images" / "img1.png").rmdir()
    detector = _use(monkeypatch, PixelDetector())
    assert main(["predict", *inputs, "--weights", "w", "--out", str(out), "--resume"]) == 0
    assert detector.seen == 1
    assert (out / "detections.json").read_bytes() == first
    assert (out / "images" / "img1.png").is_file() and not (out / resume.PARTIAL_DIR).exists()
