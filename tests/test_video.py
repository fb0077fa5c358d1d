"""`predict` on video: a drawn video and per-frame JSON lines from clips the tests encode themselves with PyAV; a
corrupt frame skipped and named, a truncated file written out up to where it ends, frames batched, one-line errors
(no PyAV, videos mixed with images). The model is a fake that places its boxes from the frame's pixels, so every
frame's line can be checked against the frame itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_rcnn.cli import main
from cascade_rcnn.commands import predict as predict_command
from cascade_rcnn.evaluation.coco import detections_to_coco
from cascade_rcnn.inference import video
from cascade_rcnn.structures import Detections

av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")

FRAMES, WIDTH, HEIGHT, RATE = 10, 64, 48, 10


class FrameDetector:
    """One box per frame whose right edge follows the frame's mean red level, plus a mask over that box (so a mask
    model's `segmentation` goes into the lines too); records the size of every batch."""

    class_names = ("person", "car")

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.config = None

    def predict(self, images: list[np.ndarray], *, batch_size: int = 1, **kwargs: object) -> list[Detections]:
        self.batches.append(len(images))
        return [self.detect(image) for image in images]

    @staticmethod
    def detect(image: np.ndarray) -> Detections:
        h, w = image.shape[:2]
        right = 8 + (w - 9) * float(image[..., 0].mean()) / 255
        boxes = torch.tensor([[2.0, 3.0, right, h - 4.0]])
        masks = torch.zeros((1, h, w), dtype=torch.bool)
        masks[0, 3 : h - 4, 2 : int(right)] = True
        return Detections(boxes, torch.tensor([0.8]), torch.tensor([1]), FrameDetector.class_names, masks=masks)


def _clip(path: Path, codec: str) -> Path:
    """FRAMES frames at RATE fps: a red bar that grows frame by frame over a grey background."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=RATE)
        stream.width, stream.height = WIDTH, HEIGHT
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(FRAMES):
            pixels = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
            pixels[:, : (i + 1) * WIDTH // FRAMES] = (230, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FrameDetector:
    detector = FrameDetector()
    monkeypatch.setattr(predict_command, "load_detector", lambda weights, device, preset, bf16=False: detector)
    return detector


def test_clip_gives_a_drawn_video_and_each_frames_detections(fake: FrameDetector, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    clip = _clip(tmp_path / "clip.mp4", "libx264")
    out = tmp_path / "out"

    assert main(["predict", str(clip), "--weights", "w", "--out", str(out), "--batch-size", "4"]) == 0

    assert fake.batches == [4, 4, 2]
    source = _decoded(clip)
    drawn = _decoded(out / "videos" / "clip.mp4")
    assert len(drawn) == len(source) == FRAMES and drawn[0].shape == (HEIGHT, WIDTH, 3)
    lines = _lines(out / "videos" / "clip.jsonl")
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert [line["time"] for line in lines] == pytest.approx([i / RATE for i in range(FRAMES)])
    for line, pixels in zip(lines, source, strict=True):  # each line: the detector's output on that very frame
        det = FrameDetector.detect(pixels)
        (expected,) = detections_to_coco(0, det.boxes, det.scores, det.labels, [1, 2], masks=det.masks)
        assert line["detections"] == [{"category_id": 2, "category_name": "car", "bbox": expected["bbox"],
                                       "score": expected["score"], "segmentation": expected["segmentation"]}]
    # The boxes are drawn: the written frames differ from the source where the box outline runs.
    assert np.abs(drawn[5].astype(int) - source[5].astype(int)).max() > 100
    err = capsys.readouterr().err
    assert "frame/s" in err or "s/frame" in err  # the progress bar's rate


def test_corrupt_frame_is_skipped_and_named_the_rest_written(fake: FrameDetector, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    data = bytearray(_clip(tmp_path / "clip.avi", "mjpeg").read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]  # one JPEG per frame
    assert len(starts) == FRAMES
    data[starts[4] : starts[5] - 8] = bytes(starts[5] - 8 - starts[4])  # frame 4's JPEG zeroed
    corrupt = tmp_path / "corrupt.avi"
    corrupt.write_bytes(bytes(data))

    assert main(["predict", str(corrupt), "--weights", "w", "--out", str(tmp_path / "out")]) == 1

    err = capsys.readouterr().err
    assert f"{corrupt}: skipped frame 4 (0.40 s): cannot decode it" in err
    lines = _lines(tmp_path / "out" / "videos" / "corrupt.jsonl")
    assert [line["frame"] for line in lines] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert len(_decoded(tmp_path / "out" / "videos" / "corrupt.mp4")) == FRAMES - 1


def test_truncated_file_ends_with_what_was_decoded(fake: FrameDetector, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    data = _clip(tmp_path / "clip.avi", "mjpeg").read_bytes()
    truncated = tmp_path / "cut.avi"
    truncated.write_bytes(data[: len(data) * 6 // 10])

    assert main(["predict", str(truncated), "--weights", "w", "--out", str(tmp_path / "out")]) == 1

    err = capsys.readouterr().err
    lines = _lines(tmp_path / "out" / "videos" / "cut.jsonl")
    written = _decoded(tmp_path / "out" / "videos" / "cut.mp4")
    assert 0 < len(lines) == len(written) < FRAMES
    assert [line["frame"] for line in lines] == list(range(len(lines)))
    assert f"{truncated}: ends at frame {len(lines)} (" in err and "truncated?" in err  # where it ended, named


def test_without_pyav_one_line_names_the_extra(fake: FrameDetector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    assert main(["predict", str(tmp_path / "clip.mp4"), "--weights", "w", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "error: video input needs PyAV: pip install 'cascade-rcnn[video]'\n"


def test_videos_and_images_in_one_run_are_refused(fake: FrameDetector, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    clip = _clip(tmp_path / "clip.mp4", "libx264")
    code = main(["predict", str(clip), str(tmp_path / "a.jpg"), "--weights", "w", "--out", str(tmp_path / "out")])
    assert code == 2 and "videos and images in one run" in capsys.readouterr().err
    assert main(["predict", str(clip), "--weights", "w", "--out", str(tmp_path / "out"), "--resume"]) == 2


def test_video_sources_are_recognised() -> None:
    assert all(video.is_video_source(s) for s in ("a.MP4", "x/y.mkv", "0", "2", "rtsp://cam.local/live",
                                                  "HTTP://host/stream.m3u8", "udp://239.0.0.1:1234"))  # fmt: skip
    assert not any(video.is_video_source(s) for s in ("a.jpg", "folder", "*.png", "file://x.jpg", "-1", "٣"))
    assert video._output_stem("rtsp://cam.local/live?x=1") == "live"
    assert video._output_stem("udp://239.0.0.1:1234") == "239.0.0.1:1234"
    assert video._output_stem("3") == "camera3"


def test_missing_camera_or_file_is_one_line_and_exit_code_one(fake: FrameDetector, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    if Path("/dev/video97").exists() or not sys.platform.startswith("linux"):
        pytest.skip("needs a Linux machine without /dev/video97")
    assert main(["predict", "97", str(tmp_path / "gone.mp4"), "--weights", "w", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("skipped 97: cannot open video (")
    assert err[1] == f"skipped {tmp_path / 'gone.mp4'}: no such file"
