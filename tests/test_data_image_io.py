"""image_io on every bad or odd image kind: each gives a correct RGB array or an ImageReadError naming the file."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cascade_rcnn.data.image_io import MAX_IMAGE_PIXELS, image_size, load_image, to_rgb
from cascade_rcnn.errors import ImageReadError

EXIF_ORIENTATION = 0x0112


def gradient_rgb(width: int = 40, height: int = 30) -> np.ndarray:
    """An asymmetric test pattern: any flip or rotation changes it."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), (xs + 2 * ys) % 256], -1).astype(np.uint8)


def assert_read_error_names_file(path: Path, fragment: str, **kwargs) -> None:
    with pytest.raises(ImageReadError) as info:
        load_image(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert "\n" not in message  # one line for the CLI


def test_rgb_png_round_trips_exactly(tmp_path):
    pixels = gradient_rgb()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    assert out.flags.writeable  # torch.from_numpy and in-place augmentation need it
    np.testing.assert_array_equal(out, pixels)
    assert image_size(tmp_path / "a.png") == (40, 30)


def test_missing_file(tmp_path):
    assert_read_error_names_file(tmp_path / "nope.jpg", "no such file")
    with pytest.raises(ImageReadError, match="no such file"):
        image_size(tmp_path / "nope.jpg")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_read_error_names_file(path, "empty file")
    with pytest.raises(ImageReadError, match="empty file"):
        image_size(path)


def test_non_image_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a JPEG\n" * 10)
    assert_read_error_names_file(path, "cannot read image")
    with pytest.raises(ImageReadError, match="cannot read image header"):
        image_size(path)


def test_directory_is_not_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    assert_read_error_names_file(tmp_path / "dir.jpg", "not a file")


def test_truncated_jpeg_is_refused_not_grey_filled(tmp_path):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert_read_error_names_file(path, "truncated")
    # The header is intact, so the size can still be read without decoding.
    assert image_size(path) == (256, 256)


def test_truncated_png_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[:-2000])
    assert_read_error_names_file(path, "cannot read image")


def test_refuses_to_decode_when_truncated_images_are_globally_allowed(tmp_path, monkeypatch):
    Image.fromarray(gradient_rgb()).save(tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert_read_error_names_file(tmp_path / "ok.png", "LOAD_TRUNCATED_IMAGES")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds one tiny compressed row: a decompression bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    pixels = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_by_size_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 20_000))  # 400 MP declared, ~60 bytes on disk
    assert_read_error_names_file(path, "too large")
    # Above Pillow's hard limit (2 x Image.MAX_IMAGE_PIXELS) even the header read refuses, with the same clear error.
    with pytest.raises(ImageReadError, match="too large"):
        image_size(path)


def test_bomb_below_pillows_hard_limit_is_refused_by_ours(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(11_000, 11_000))  # 121 MP: above our 100 MP, below Pillow's 179 MP error
    assert_read_error_names_file(path, "121.0 megapixels")
    assert image_size(path) == (11_000, 11_000)  # the header alone is fine to read


def test_pixel_limit_is_configurable(tmp_path):
    Image.fromarray(gradient_rgb(40, 30)).save(tmp_path / "a.png")
    assert_read_error_names_file(tmp_path / "a.png", "limit", max_pixels=40 * 30 - 1)
    assert load_image(tmp_path / "a.png", max_pixels=40 * 30).shape == (30, 40, 3)
    assert MAX_IMAGE_PIXELS == 100_000_000


def test_one_by_one_image(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    np.testing.assert_array_equal(load_image(tmp_path / "dot.png"), [[[10, 20, 30]]])


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = gradient_rgb()[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (30, 40, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_palette_image_keeps_its_colours(tmp_path):
    pixels = gradient_rgb()
    palette_image = Image.fromarray(pixels).quantize(colors=16)
    palette_image.save(tmp_path / "p.png")
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), expected)


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # opaque red stays red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent (black underneath) shows white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black is mid grey
    rgba[1, 1] = (0, 0, 255, 255)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png").astype(int)
    np.testing.assert_array_equal(out[0, 0], [200, 10, 10])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert np.all(np.abs(out[1, 0] - 127) <= 1)
    np.testing.assert_array_equal(out[1, 1], [0, 0, 255])


def test_sixteen_bit_png_is_scaled_by_65535_not_by_its_maximum(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 12850]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")  # really stored as 16-bit
    out = load_image(tmp_path / "deep.png")
    expected = np.rint(values / 257.0).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
    # A dark 16-bit image stays dark (no auto-contrast stretching).
    Image.fromarray(np.full((4, 4), 2570, np.uint16)).save(tmp_path / "dark.png")
    assert load_image(tmp_path / "dark.png").max() == 10


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as check:
        assert check.mode == "CMYK"
    out = load_image(tmp_path / "cmyk.jpg").astype(int)
    assert out.shape == (16, 16, 3)
    assert np.all(np.abs(out - [255, 0, 0]) <= 8)


def _save_with_orientation(pixels: np.ndarray, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=100, subsampling=0, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "upright"),
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (4, lambda a: a[::-1]),
        (5, lambda a: a.transpose(1, 0, 2)),
        (6, lambda a: np.rot90(a, -1)),
        (7, lambda a: np.rot90(a, 2).transpose(1, 0, 2)),
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientation_is_applied_and_image_size_agrees(tmp_path, orientation, upright):
    stored = gradient_rgb(40, 30)
    path = tmp_path / f"o{orientation}.jpg"
    _save_with_orientation(stored, path, orientation)
    with Image.open(path) as raw:
        decoded_stored = np.asarray(raw.convert("RGB"))
    out = load_image(path)
    np.testing.assert_array_equal(out, upright(decoded_stored))
    assert image_size(path) == (out.shape[1], out.shape[0])
    assert image_size(path) == ((30, 40) if orientation >= 5 else (40, 30))


def test_to_rgb_leaves_rgb_untouched_and_handles_bilevel():
    rgb = Image.fromarray(gradient_rgb())
    assert to_rgb(rgb) is rgb
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    np.testing.assert_array_equal(np.asarray(to_rgb(bilevel)), [[[0, 0, 0], [255, 255, 255]]])
