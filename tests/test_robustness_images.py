"""Bad and unusual image files, end to end through `cascade-rcnn predict` and `cascade-rcnn eval` (run in-process).

The contract (issue 8): every input gives either a correct result or one line on stderr naming the file; no Python
traceback reaches the user; the other inputs of the same run are still processed and written; the exit code is
non-zero when something failed. The model is a real, untrained Detector at a tiny input size, saved to a safetensors
file and loaded from it by the command, as a user's weights would be.

`tests/test_data_image_io.py` checks the decoder itself (pixel values of each mode, the EXIF table, the size limits);
here the same kinds of files go through the whole command, where a different failure (a traceback from the model, a
half-written output folder, one bad file stopping the run) would show.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from cascade_rcnn.cli import main
from cascade_rcnn.data.image_io import MAX_IMAGE_PIXELS
from tests.helpers import tiny_config

CLASS_NAMES = ("person", "car", "dog")
# Even smaller than tiny_config: 64-pixel inputs, narrow FPN and box head, 20 proposals. The model is untrained, so only
# the plumbing is under test; at this size one image costs ~0.1 s on one CPU core.
SMALL = {
    "transform.min_size": 64,
    "transform.max_size": 96,
    "fpn.out_channels": 32,
    "cascade.fc_dim": 64,
    "rpn.pre_nms_top_n_test": 50,
    "rpn.post_nms_top_n_test": 20,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the model is tiny, and with other test processes on a 2-core machine more threads only
    oversubscribe it (measured: 0.1 s per image with one thread, 2-5 s with two on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights(module_tmp: Path) -> Path:
    from cascade_rcnn.api import Detector

    torch.manual_seed(0)
    detector = Detector(config=tiny_config(num_classes=3, class_names=CLASS_NAMES, **SMALL))
    return detector.save(module_tmp / "tiny.safetensors")


# --- writing test images ----------------------------------------------------------------------------------------------


def _pixels(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus a bright block in the top-left corner: survives JPEG, and no two orientations look alike."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    image = np.stack([(x * (200 / width) + rng.integers(0, 40)) % 256, (y * (200 / height)) % 256,
                      ((x + y) * 2) % 256], axis=2).astype(np.uint8)  # fmt: skip
    image[: height // 3, : width // 3] = 255
    return image


def _blank_png(path: Path, width: int, height: int) -> Path:
    """A complete, valid black 1-bit PNG of any declared size, compressed row by row: a 400-megapixel one is ~50 kB and
    never exists uncompressed here (the way a real decompression bomb is made)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + the row's packed bits
    compressor = zlib.compressobj()
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def _jpeg_bytes(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


# Display transform of each EXIF orientation, written from the EXIF specification (not from the code under test).
EXIF_DISPLAY: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    3: lambda a: np.rot90(a, 2),  # upside down
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # phone held upright, camera rotated: turn 90 degrees clockwise
    8: lambda a: np.rot90(a, 1),  # turn 90 degrees counter-clockwise
}

# name -> (width, height) as a viewer shows it; every one must be predicted and drawn.
GOOD = {
    "grayscale.png": (80, 60),
    "palette.png": (80, 60),
    "rgba.png": (80, 60),
    "sixteen_bit.png": (80, 60),
    "cmyk.jpg": (80, 60),
    "one_by_one.png": (1, 1),
    "exif_rotated.jpg": (60, 96),  # stored 96x60, orientation 6
    "large_photo.jpg": (6000, 4000),  # 24 megapixels: an ordinary camera photo, well under the limit
}
# name -> a fragment the one-line message must contain.
BAD = {
    "empty.jpg": "empty file (0 bytes)",
    "truncated.jpg": "truncated",
    "not_an_image.png": "cannot identify image file",
    "too_large.png": "image too large (12000x9000 = 108.0 megapixels, limit 100.0), refused before decoding",
    "bomb.png": "image too large, refused before decoding",
}


def _write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _pixels(80, 60, seed=0)
    Image.fromarray(rgb).convert("L").save(folder / "grayscale.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    rgba = np.dstack([rgb, np.full((60, 80), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    (folder / "cmyk.jpg").write_bytes(_jpeg_bytes(Image.fromarray(rgb).convert("CMYK")))
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_by_one.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    (folder / "exif_rotated.jpg").write_bytes(_jpeg_bytes(Image.fromarray(_pixels(96, 60, seed=1)), exif=exif))
    (folder / "large_photo.jpg").write_bytes(_jpeg_bytes(Image.new("RGB", (6000, 4000), (90, 120, 150))))

    (folder / "empty.jpg").write_bytes(b"")
    whole = _jpeg_bytes(Image.fromarray(_pixels(80, 60, seed=2)))
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "not_an_image.png").write_text("<html><body>a web page saved under an image name</body></html>\n")
    assert 12000 * 9000 > MAX_IMAGE_PIXELS > 6000 * 4000  # the expectations in GOOD and BAD rest on this
    _blank_png(folder / "too_large.png", 12000, 9000)  # above our 100 MP limit, below Pillow's own hard limit
    _blank_png(folder / "bomb.png", 20000, 20000)  # 400 MP from a ~50 kB file: above Pillow's hard limit too


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs") / "photos"
    _write_inputs(folder)
    return folder


def _by_file(out: Path) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    for r in json.loads((out / "detections.json").read_text()):
        results.setdefault(r["file_name"], []).append(r)
    return results


def _assert_no_traceback(err: str) -> None:
    assert "Traceback" not in err and 'File "' not in err, err


def _lines_naming(err: str, name: str) -> list[str]:
    # tqdm redraws its bar with carriage returns on the same stream; a message is what follows the last one.
    return [line.split("\r")[-1] for line in err.splitlines() if name in line]


# --- predict ----------------------------------------------------------------------------------------------------------


def test_small_bomb_helper_writes_a_real_png(tmp_path: Path) -> None:
    """The crafted PNGs below are genuine images, so 'refused' means refused for their size, not for being broken."""
    with Image.open(_blank_png(tmp_path / "small.png", 37, 5)) as image:
        image.load()
        assert image.size == (37, 5) and image.mode == "1" and not np.asarray(image).any()


def test_predict_every_bad_image_kind_in_one_run(
    weights: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    original_load = ImageFile.ImageFile.load

    def recording_load(self: ImageFile.ImageFile) -> Any:
        decoded.append(Path(getattr(self, "filename", "") or "?").name)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    out = tmp_path / "out"

    code = main(["predict", "--weights", str(weights), str(inputs), "--out", str(out), "--device", "cpu",
                 "--score-thresh", "0"])  # fmt: skip

    captured = capsys.readouterr()
    assert code == 1
    _assert_no_traceback(captured.err)
    for name, fragment in BAD.items():
        lines = _lines_naming(captured.err, name)
        assert len(lines) == 1, (name, captured.err)
        assert lines[0].startswith(f"skipped {inputs / name}: ") and fragment in lines[0], lines[0]
    assert f"{len(BAD)} input(s) failed" in captured.err
    assert f"{len(GOOD)} images and" in captured.out

    # The size limit acts on the header: the two oversized files were never handed to a decoder (the others were).
    assert "too_large.png" not in decoded and "bomb.png" not in decoded
    assert "grayscale.png" in decoded and "exif_rotated.jpg" in decoded

    # Every good image is drawn at the size a viewer shows, and its boxes lie inside that image.
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(GOOD)
    results = _by_file(out)
    assert set(results) <= set(GOOD)
    for name, (width, height) in GOOD.items():
        with Image.open(out / "images" / name) as drawn:
            assert drawn.size == (width, height), name
        for r in results.get(name, []):
            x, y, w, h = r["bbox"]
            assert -1e-3 <= x and -1e-3 <= y and x + w <= width + 1e-3 and y + h <= height + 1e-3, (name, r["bbox"])
            assert w >= 0 and h >= 0 and r["category_name"] in CLASS_NAMES
    # An untrained model at score threshold 0 still detects something in every image of a usable size.
    assert {name for name, size in GOOD.items() if min(size) > 1} <= set(results)


def test_exif_orientation_gives_the_boxes_of_the_upright_picture(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A photo stored sideways with an EXIF orientation tag is predicted exactly as the same photo stored upright:
    same boxes, in the coordinates of the picture the user sees."""
    folder = tmp_path / "in"
    folder.mkdir()
    for orientation, display in EXIF_DISPLAY.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = folder / f"tagged_{orientation}.jpg"
        path.write_bytes(_jpeg_bytes(Image.fromarray(_pixels(96, 60, seed=orientation)), exif=exif))
        with Image.open(path) as stored:  # Pillow does not apply the tag by itself: these are the stored pixels
            upright = display(np.asarray(stored.convert("RGB")))
        Image.fromarray(np.ascontiguousarray(upright)).save(folder / f"upright_{orientation}.png")  # lossless
    out = tmp_path / "out"

    code = main(["predict", "--weights", str(weights), str(folder), "--out", str(out), "--device", "cpu",
                 "--score-thresh", "0", "--batch-size", "1"])  # fmt: skip

    assert code == 0, capsys.readouterr().err
    results = _by_file(out)
    for orientation in EXIF_DISPLAY:
        tagged, upright = results[f"tagged_{orientation}.jpg"], results[f"upright_{orientation}.png"]
        assert len(tagged) == len(upright) > 0, orientation
        for a, b in zip(tagged, upright, strict=True):
            assert a["category_id"] == b["category_id"], orientation
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3), orientation
            assert a["score"] == pytest.approx(b["score"], abs=1e-5), orientation
        with Image.open(out / "images" / f"tagged_{orientation}.jpg") as drawn:
            assert drawn.size == ((60, 96) if orientation in (5, 6, 8) else (96, 60))


def test_predict_output_that_cannot_be_written_is_named_and_the_rest_are_written(
    weights: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    (out / "images" / "palette.png").mkdir(parents=True)  # a folder where the drawn picture should go

    code = main(["predict", "--weights", str(weights), str(inputs / "grayscale.png"), str(inputs / "palette.png"),
                 "--out", str(out), "--device", "cpu"])  # fmt: skip

    err = capsys.readouterr().err
    assert code == 1
    _assert_no_traceback(err)
    [line] = _lines_naming(err, "palette.png")
    assert line.startswith(f"skipped {inputs / 'palette.png'}: cannot write palette.png")
    assert (out / "images" / "grayscale.png").is_file()


def test_predict_when_every_input_fails_writes_an_empty_valid_results_file(
    weights: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(["predict", "--weights", str(weights), str(inputs / "empty.jpg"), str(inputs / "bomb.png"),
                 str(tmp_path / "missing.jpg"), str(tmp_path / ("long" * 80 + ".jpg")), "--out", str(out),
                 "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    _assert_no_traceback(captured.err)
    assert "missing.jpg: no such file or folder" in captured.err
    assert "...: File name too long" in captured.err
    assert json.loads((out / "detections.json").read_text()) == []
    assert "4 input(s) failed" in captured.err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--out", "{file}"], "exists and is not a folder"),
        (["--out", "{file}/below"], "cannot create the output folder (Not a directory)"),
        (["--out", "{tmp}/o", "--device", "gpu0"], "--device 'gpu0': not a torch device"),
        (["--out", "{tmp}/o", "--device", "cuda:99"], "--device 'cuda:99': this machine has"),
        (["--out", "{tmp}/o", "--weights", "{tmp}/no_such.safetensors"], "no_such.safetensors"),
        (["--out", "{tmp}/" + "o" * 300], "cannot create the output folder (File name too long)"),
        (["--out", "{tmp}/o", "--weights", "{tmp}/" + "w" * 300], "www...: File name too long"),
    ],
    ids=["out-is-a-file", "out-below-a-file", "unknown-device", "absent-gpu", "missing-weights", "out-name-too-long",
         "weights-name-too-long"],
)
def test_bad_command_line_values_are_one_line_errors(
    weights: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str
) -> None:
    a_file = tmp_path / "results.txt"
    a_file.write_text("an existing file, not a folder")
    argv = ["predict", str(inputs / "grayscale.png"), "--weights", str(weights)]
    argv += [arg.format(file=a_file, tmp=tmp_path) for arg in extra]

    assert main(argv) == 2
    err = capsys.readouterr().err
    _assert_no_traceback(err)
    assert err.startswith("error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "an existing file, not a folder"


# --- eval -------------------------------------------------------------------------------------------------------------


def test_eval_skips_unreadable_images_and_scores_the_rest(
    weights: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = sorted([*GOOD, *BAD])
    sizes = {**GOOD, "empty.jpg": (80, 60), "truncated.jpg": (80, 60), "not_an_image.png": (80, 60),
             "too_large.png": (12000, 9000), "bomb.png": (20000, 20000)}  # fmt: skip
    images = [{"id": i, "file_name": name, "width": sizes[name][0], "height": sizes[name][1]}
              for i, name in enumerate(names, start=1)]  # fmt: skip
    annotations = [{"id": i, "image_id": i, "category_id": 1 + i % 3, "iscrowd": 0, "area": 1.0,
                    "bbox": [0, 0, 1, 1]} for i in range(1, len(names) + 1)]  # fmt: skip
    categories = [{"id": i, "name": name} for i, name in enumerate(CLASS_NAMES, start=1)]
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    out = tmp_path / "out"

    code = main(["eval", "--weights", str(weights), "--images", str(inputs), "--annotations", str(annotation_file),
                 "--out", str(out), "--device", "cpu"])  # fmt: skip

    captured = capsys.readouterr()
    assert code == 1
    _assert_no_traceback(captured.err)
    for name, fragment in BAD.items():
        [line] = _lines_naming(captured.err, name)
        assert line.startswith(f"skipped {inputs / name}: ") and fragment in line, line
    assert f"{len(BAD)} images could not be read; metrics cover the other {len(GOOD)}" in captured.err
    good_ids = {image["id"] for image in images if image["file_name"] in GOOD}
    detected_ids = {r["image_id"] for r in json.loads((out / "detections.json").read_text())}
    assert detected_ids <= good_ids and len(detected_ids) >= len(GOOD) - 1  # the 1x1 image may give nothing
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in metrics.values())
