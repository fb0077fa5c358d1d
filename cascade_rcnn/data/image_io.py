"""Image decoding with Pillow: size limits checked before decoding, EXIF orientation applied, every mode to 8-bit RGB.

Three entry points:

- `load_image(path)` decodes a file to a (H, W, 3) uint8 RGB array in the orientation a viewer shows.
- `image_size(path)` reads only the header and returns (width, height) in that same orientation, so dataset loaders can
  check boxes against the image without decoding it.
- `decode_image(data, name)` decodes an image held in memory (an upload) as `load_image` decodes a file.

Every failure caused by the file (missing, empty, truncated, not an image, too large) is an `ImageReadError` whose
message starts with the path (or the name given for bytes), so the CLI can print one line and go on with the next input.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from cascade_rcnn.errors import ImageReadError

# Refuse images above this many pixels before decoding them. 100 MP is ~300 MB as RGB uint8: larger than any photo a
# detector is trained on, small enough that a crafted "decompression bomb" (a tiny PNG declaring 50000x50000 pixels)
# cannot exhaust memory. Pillow's own guard (Image.MAX_IMAGE_PIXELS, a hard error at twice that value) stays in place
# as a backstop; a caller raising `max_pixels` above it must raise Pillow's limit as well.
MAX_IMAGE_PIXELS = 100_000_000

# EXIF orientations 5-8 are transpositions (a 90 or 270 degree turn): a viewer shows the image with width and height
# swapped.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112
# The transform that shows an image stored with each EXIF orientation upright (as PIL.ImageOps.exif_transpose does).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pillow modes holding one 16-bit (or wider integer) channel. 16-bit PNGs open as I;16 (or I on older Pillow); they
# are mapped 0..65535 -> 0..255 with a fixed scale, never stretched by the image's own maximum, so the same pixel
# value always gives the same 8-bit value.
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to a (H, W, 3) uint8 RGB array, in the orientation a viewer shows (EXIF applied).

    Args:
        path: the image file (any format Pillow reads; the first frame of animated files).
        max_pixels: refuse images with more pixels than this, checked on the header before decoding; None: no limit
            of ours (Pillow's own `Image.MAX_IMAGE_PIXELS` guard still applies).

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, or too large; the message names it.
    """
    path = Path(path)
    _check_nonempty(path)
    return _decode(path, path, max_pixels)


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image held in memory (e.g. an HTTP upload) to a (H, W, 3) uint8 RGB array, as `load_image` decodes a
    file: the same size limit, EXIF orientation and modes.

    Raises:
        ImageReadError: `data` is empty, truncated, not an image, or too large; the message starts with `name`.
    """
    if not data:
        raise ImageReadError(f"{name}: empty (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Path | io.BytesIO, path: str | Path, max_pixels: int | None) -> np.ndarray:
    """`load_image` and `decode_image`: decode `source` (a file, or bytes in memory); messages start with `path` (the
    file's path, or the name given to the bytes)."""
    # The truncated-file check below only works with Pillow's default; a library that flipped this process-wide
    # switch would make truncated JPEGs decode silently as grey-filled images.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageReadError(
            f"{path}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; refusing to decode because "
            "truncated files would be accepted silently"
        )
    try:
        with warnings.catch_warnings():
            # Our own limit decides; Pillow's warning between its soft and hard limits would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageReadError(_too_large_message(path, width, height, max_pixels))
                # Read before decoding, by the same rule as `image_size`, so the two always agree.
                orientation = _exif_orientation(image)
                # Decode now, inside the try: Pillow decodes lazily, and a truncated file only fails here.
                image.load()
                rgb = to_rgb(image)
                if orientation in _ORIENTATION_TRANSPOSE:
                    rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
                # np.array, not asarray: a view of Pillow's buffer is read-only, and callers (torch.from_numpy,
                # in-place augmentation) need a writable array.
                return np.array(rgb)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path}: image too large, refused before decoding ({error})") from None
    except Image.UnidentifiedImageError as error:
        # Pillow's message names its file object: a path for a file, but a meaningless repr for bytes in memory.
        detail = error if isinstance(source, Path) else "no format Pillow reads"
        raise ImageReadError(f"{path}: cannot read image (UnidentifiedImageError: {detail})") from None
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except Exception as error:  # noqa: BLE001
        # Pillow's plugins raise a zoo of types on malformed input: OSError (UnidentifiedImageError, "image file is
        # truncated"), ValueError, SyntaxError, EOFError, struct.error, IndexError... Whatever fails while decoding an
        # untrusted file is the file's fault, and must reach the user as one line naming it.
        raise ImageReadError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as a viewer shows it (EXIF orientation applied), from the header only.

    Nothing is decoded, so this is fast enough to call on every image of a dataset, and safe on decompression bombs.

    Raises:
        ImageReadError: the file is missing, empty or not an image; the message names it.
    """
    path = Path(path)
    _check_nonempty(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if _exif_orientation(image) in _TRANSPOSING_ORIENTATIONS:
                    width, height = height, width
                return width, height
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path}: image too large ({error})") from None
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except Exception as error:  # noqa: BLE001 - as in load_image: any failure on an untrusted file is the file's
        raise ImageReadError(f"{path}: cannot read image header ({type(error).__name__}: {error})") from None


def as_rgb_array(image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    """An image file, a Pillow image or an array -> (H, W, 3) RGB array, 0-255 (files and Pillow images uint8 via
    `load_image` / `to_rgb`; an array keeps its dtype: (H, W) grey is repeated, a fourth channel dropped). Inputs are
    never modified.

    Raises:
        ImageReadError: an unreadable file, or an array that is not an image (the message gives its shape).
    """
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ImageReadError(f"expected an (H, W, 3) image array, got shape {image.shape}")
        return image[:, :, :3]
    raise ImageReadError(f"unsupported image input of type {type(image).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (1, L, P, RGBA, LA, CMYK, YCbCr, I;16, I, F, ...) to 8-bit RGB.

    Transparent pixels are composited over white, as most viewers show them: dropping alpha instead would expose
    whatever colour the encoder left under fully transparent pixels (often black). 16-bit grey is scaled by
    255/65535. CMYK JPEGs (including Adobe's inverted ones) are converted by Pillow's decoder.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GRAY_MODES:
        array = np.asarray(image).astype(np.float64)
        # 65535 / 257 == 255 exactly, so full scale maps to full scale.
        array = np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    elif image.mode == "F":
        # Float images carry no range convention; values are taken as 0..255 and clipped.
        array = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _check_nonempty(path: Path) -> None:
    """Give missing and zero-byte files their own messages: Pillow would call both 'cannot identify image file'."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the name (from an annotation file)
        raise ImageReadError(f"{path}: cannot read image ({error})") from None
    if not path.is_file():
        raise ImageReadError(f"{path}: not a file")
    if size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 when absent or unreadable), without decoding pixel data."""
    # PngImageFile.getexif() decodes the whole image when the eXIf chunk was not seen in the header; a PNG whose EXIF
    # follows the pixel data is taken as unrotated rather than paying for a full decode here.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not make an otherwise readable image unreadable
        return 1
    return orientation if isinstance(orientation, int) else 1


def _too_large_message(path: str | Path, width: int, height: int, max_pixels: int) -> str:
    return (
        f"{path}: image too large ({width}x{height} = {width * height / 1e6:.1f} megapixels, limit "
        f"{max_pixels / 1e6:.1f}), refused before decoding"
    )
