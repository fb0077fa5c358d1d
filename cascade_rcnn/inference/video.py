"""`predict` on videos, cameras and streams: decode with PyAV (FFmpeg), detect in batches of frames, write the video
with the detections drawn and each frame's detections as a JSON line.

`cascade-rcnn predict clip.mp4 --weights W --out OUT` writes `OUT/videos/clip.mp4` (H.264 where the FFmpeg build has
libx264, MPEG-4 part 2 otherwise; the source's frame rate) and `OUT/videos/clip.jsonl`, one line per frame written:

    {"frame": 12, "time": 0.48, "detections": [{"category_id": 1, "category_name": "person", "bbox": [x, y, w, h],
     "score": 0.93}, ...]}

`frame` counts the source's frames in decoding order, skipped ones included; `time` is the frame's presentation time
in seconds; `bbox` and the optional `segmentation` (mask models, COCO RLE) are as in `detections.json`. A camera is
given by its index (`0`: `/dev/video0` through v4l2 on Linux, AVFoundation's device 0 on macOS), a stream by its URL
(rtsp://, rtmp://, http(s)://, udp://, tcp://, srt://), both read until they end or Ctrl-C, and both are written
out as files are. A frame FFmpeg cannot decode is skipped and named on stderr; a file that ends early (truncated)
ends the video there, with every frame decoded before written out; either makes the exit code 1, as a failed image
does. PyAV is the optional extra `video` (`pip install 'cascade-rcnn[video]'`); it is imported only here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cascade_rcnn.errors import ConfigError

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv",
                              ".wmv", ".3gp"})  # fmt: skip
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt")
_DEFAULT_FPS = 25
_STREAM_TIMEOUT_S = 10.0


def is_video_source(text: str) -> bool:
    """A video file (by its extension), a camera index (`0`, `1` ...: unless a file or folder has that name) or a
    stream URL."""
    if text.isascii() and text.isdigit():
        return not Path(text).exists()
    return (Path(text).suffix.lower() in VIDEO_EXTENSIONS
            or re.match(rf"^({'|'.join(STREAM_SCHEMES)})://", text, re.IGNORECASE) is not None)  # fmt: skip


def wants_video(inputs: Sequence[str]) -> bool:
    return any(is_video_source(text) for text in inputs)


def import_av() -> Any:
    try:
        import av
    except ImportError:
        raise ConfigError("video input needs PyAV: pip install 'cascade-rcnn[video]'") from None
    return av


# ---------------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    index: int  # in decoding order, skipped frames counted
    time: float | None  # presentation time, seconds
    pixels: np.ndarray  # (H, W, 3) uint8 RGB


def open_source(text: str) -> Any:
    """The PyAV input container of a file, camera index or stream URL; one-line `ConfigError` when it cannot open."""
    av = import_av()
    try:
        if text.isascii() and text.isdigit():
            if sys.platform.startswith("linux"):
                return av.open(f"/dev/video{text}", format="v4l2")
            if sys.platform == "darwin":
                return av.open(text, format="avfoundation")
            raise ConfigError(f"camera {text}: cameras by index are read through v4l2 (Linux) or AVFoundation (macOS)")
        if "://" in text:
            return av.open(text, timeout=_STREAM_TIMEOUT_S)
        if not Path(text).is_file():
            raise ConfigError(f"{text}: no such file")
        return av.open(text)
    except av.FFmpegError as error:
        raise ConfigError(f"{text}: cannot open video ({_reason(error)})") from None


def decode_frames(container: Any, say: Callable[[str], None]) -> Iterator[Frame]:
    """The frames of `container`'s first video stream as RGB arrays. A packet FFmpeg cannot decode is skipped and
    named through `say`, or, when it is the last one (a truncated file), said to end the video; an error reading the
    container also ends the frames there, said as well."""
    av = import_av()
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame threads: decoding keeps up with the model
    index = 0
    failed: tuple[str, str] | None = None  # the last packet's (frame, error): said once the next packet shows
    # whether it was the last one
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            packet = None
        except av.FFmpegError as error:
            say(f"stopped reading at frame {index}: {_reason(error)}; the frames before it are written")
            return
        if failed is not None:
            if packet is None or packet.size == 0:  # nothing after it but the decoder's flush
                say(f"ends at {failed[0]}, which cannot be decoded ({failed[1]}): truncated? the frames before it are "
                    "written")  # fmt: skip
                return
            say(f"skipped {failed[0]}: cannot decode it ({failed[1]})")
            failed = None
        if packet is None:
            return
        try:
            decoded = packet.decode()
        except av.FFmpegError as error:
            at = f" ({float(packet.pts * packet.time_base):.2f} s)" if packet.pts is not None else ""
            failed = (f"frame {index}{at}", _reason(error))
            index += 1
            continue
        for frame in decoded:
            yield Frame(index, None if frame.time is None else float(frame.time), frame.to_ndarray(format="rgb24"))
            index += 1


def frame_rate(container: Any) -> Fraction:
    """The first video stream's average frame rate (its guessed or base rate, else 25)."""
    stream = container.streams.video[0]
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and 0 < rate <= 1000:
            return Fraction(rate).limit_denominator(1001)
    return Fraction(_DEFAULT_FPS)


def _reason(error: Exception) -> str:
    """FFmpeg's message without PyAV's errno prefix and trailing file name."""
    text = getattr(error, "strerror", None) or str(error)
    return re.sub(r"^\[Errno -?\d+\] ", "", text).rstrip(": ")


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------


class VideoWriter:
    """An H.264 (or, without libx264, MPEG-4) video file written frame by frame at a constant rate. Frames are
    padded to even sides (4:2:0 chroma needs them); a frame of another size than the first is scaled to it."""

    def __init__(self, path: Path, rate: Fraction, width: int, height: int) -> None:
        av = import_av()
        self.path = path
        self.width, self.height = width + width % 2, height + height % 2
        self._container = av.open(str(path), "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.width, self._stream.height, self._stream.pix_fmt = self.width, self.height, "yuv420p"
        if codec == "libx264":
            self._stream.options = {"crf": "20", "preset": "veryfast"}
        self.count = 0

    def write(self, rgb: np.ndarray) -> None:
        av = import_av()
        h, w = rgb.shape[:2]
        if (h + h % 2, w + w % 2) == (self.height, self.width):
            if h % 2 or w % 2:
                rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        else:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
                width=self.width, height=self.height)  # fmt: skip
        frame.pts = self.count
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.count += 1

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():  # flush the encoder's delayed frames
                self._container.mux(packet)
            self._container.close()
            self._container = None


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`predict` with video inputs: every input must be a video file, camera index or stream URL."""
    from cascade_rcnn.commands import predict
    from cascade_rcnn.inference import options as inference_options
    from cascade_rcnn.training.distributed import env_world_size

    images = [text for text in args.inputs if not is_video_source(text)]
    if images:
        raise ConfigError(f"videos and images in one run ({images[0]} is not a video): run predict once for each")
    for flag, given in (("--resume", args.resume), ("--save-masks", getattr(args, "save_masks", False))):
        if given:
            raise ConfigError(f"{flag} applies to images, not to videos")
    if env_world_size() > 1:
        raise ConfigError("a video is read by one process: run predict on it without torchrun")
    import_av()
    tile, tta = inference_options.tile_config(args, args.batch_size), inference_options.tta_config(args)
    inference_options.check_backend(args, tile, tta)
    augment = {"tile": tile, "tta": tta} if tile is not None or tta is not None else {}
    videos_dir = predict.make_output_dir(predict.make_output_dir(args.out) / "videos")

    onnx = getattr(args, "backend", "torch") != "torch"
    device = predict.resolve_device(args.device or ("cpu" if onnx else None))
    if not onnx:
        detector = predict.load_detector(args.weights, device, args.preset, bf16=args.bf16)
    elif args.bf16:
        raise ConfigError("--bf16 applies to the torch backend (ONNX Runtime runs the graph in float32)")
    else:
        from cascade_rcnn.deploy.backends import load_backend

        detector = load_backend(args.weights, args.backend, device=device, preset=args.preset)
    inference_options.check_detector(detector, tile)
    batch_size = 1 if augment else args.batch_size or predict.default_batch_size(detector)
    class_names = tuple(detector.class_names)
    settings = _Settings(
        detector=detector, batch_size=batch_size, class_names=class_names, score_thresh=args.score_thresh,
        keep_labels=predict.parse_class_filter(args.classes, class_names),
        category_ids=predict.category_ids_for(class_names), wh_plus_one=predict.coco_wh_plus_one(detector),
        augment=augment,
    )  # fmt: skip
    failed = 0
    taken: set[str] = set()
    for source in args.inputs:
        name = PurePosixPath(predict.safe_output_name(_output_stem(source) + ".png", taken)).stem
        try:
            failed += run_video(source, videos_dir / f"{name}.mp4", videos_dir / f"{name}.jsonl", settings)
        except ConfigError as error:
            print(f"skipped {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


@dataclass(frozen=True)
class _Settings:
    detector: Any
    batch_size: int
    class_names: tuple[str, ...]
    score_thresh: float
    keep_labels: set[int] | None
    category_ids: list[int]
    wh_plus_one: bool
    augment: dict[str, Any]


def run_video(source: str, video_path: Path, lines_path: Path, settings: _Settings) -> int:
    """Detect on every frame of `source`; write the drawn video and the JSON lines. Returns how many problems (frames
    skipped, reading stopped early) were said on stderr."""
    from tqdm import tqdm

    container = open_source(source)
    problems = 0
    writer: VideoWriter | None = None
    detections = 0
    try:
        stream = container.streams.video[0] if container.streams.video else None
        if stream is None:
            raise ConfigError(f"{source}: has no video stream")
        rate = frame_rate(container)
        with (
            lines_path.open("w", encoding="utf-8") as lines,
            tqdm(total=stream.frames or None, unit="frame", desc=video_path.stem, file=sys.stderr) as progress,
        ):

            def say(message: str) -> None:
                nonlocal problems
                problems += 1
                progress.write(f"{source}: {message}", file=sys.stderr)

            for batch in _batches(decode_frames(container, say), settings.batch_size):
                if writer is None:
                    writer = VideoWriter(video_path, rate, batch[0].pixels.shape[1], batch[0].pixels.shape[0])
                for frame, drawn, record in _detect(batch, settings):
                    writer.write(drawn)
                    lines.write(json.dumps(record) + "\n")
                    detections += len(record["detections"])
                lines.flush()
                progress.update(len(batch))
    finally:
        if writer is not None:
            writer.close()
        container.close()
    if writer is None:
        lines_path.unlink(missing_ok=True)
        print(f"{source}: no frame could be decoded; nothing written", file=sys.stderr)
        return problems + 1
    frames = writer.count
    note = f" ({problems} problem(s), see above)" if problems else ""
    print(f"{source}: {frames} frames and {detections} detections written to {video_path} and {lines_path.name}"
          f"{note}")  # fmt: skip
    return problems


def _batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _detect(batch: list[Frame], settings: _Settings) -> Iterator[tuple[Frame, np.ndarray, dict[str, Any]]]:
    """Each frame of `batch` with its drawn pixels and its JSON-lines record."""
    from cascade_rcnn.commands.predict import _filtered, predict_batch
    from cascade_rcnn.evaluation.coco import detections_to_coco
    from cascade_rcnn.evaluation.visualize import draw_detections

    outputs = predict_batch(settings.detector, [frame.pixels for frame in batch], settings.batch_size,
                            score_thresh=settings.score_thresh, **settings.augment)  # fmt: skip
    for frame, det in zip(batch, outputs, strict=True):
        boxes, scores, labels, masks = _filtered(det, settings.score_thresh, settings.keep_labels)
        results = detections_to_coco(frame.index, boxes, scores, labels, settings.category_ids,
                                     wh_plus_one=settings.wh_plus_one, masks=masks)  # fmt: skip
        found = [{"category_id": r["category_id"], "category_name": settings.class_names[label], "bbox": r["bbox"],
                  "score": r["score"], **({"segmentation": r["segmentation"]} if "segmentation" in r else {})}
                 for r, label in zip(results, labels.tolist(), strict=True)]  # fmt: skip
        drawn = np.asarray(draw_detections(frame.pixels, boxes, scores, labels, settings.class_names, masks=masks))
        yield frame, drawn, {"frame": frame.index, "time": frame.time, "detections": found}


def _output_stem(source: str) -> str:
    """The base name of a source's outputs: a file's stem, `camera<N>`, or a stream URL's last path part (its host
    when the path is empty)."""
    if source.isascii() and source.isdigit():
        return f"camera{source}"
    if "://" in source:
        host, _, path = source.split("://", 1)[1].split("?", 1)[0].rstrip("/").partition("/")
        return PurePosixPath(path).stem if path else host or "stream"
    return Path(source).stem or "video"
