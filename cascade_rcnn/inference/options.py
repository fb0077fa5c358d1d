"""The command-line face of tiling and TTA, shared by `predict` and `eval`: the flags, their checks (one line each),
the decompression-bomb limit they may raise, and what a metrics file records of them."""

from __future__ import annotations

import argparse
from typing import Any

from PIL import Image

from cascade_rcnn.data.image_io import MAX_IMAGE_PIXELS
from cascade_rcnn.errors import ConfigError
from cascade_rcnn.inference import largest_stride
from cascade_rcnn.inference.tiling import MAX_OVERLAP, TileConfig
from cascade_rcnn.inference.tta import TTAConfig, parse_scales


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("large images and test-time augmentation (box-only)")
    group.add_argument("--tile", type=int, metavar="SIZE",
                       help="sliced inference: detect on overlapping SIZE x SIZE px slices and merge them (an image "
                            "no larger than a slice runs whole); about the model's training image size finds small "
                            "objects at their native scale")  # fmt: skip
    group.add_argument("--tile-overlap", type=float, default=0.2, metavar="F",
                       help=f"fraction of a slice that neighbouring slices share, 0..{MAX_OVERLAP} (0.2)")
    group.add_argument("--tile-full", action="store_true",
                       help="with --tile: also detect on the whole image at the model's input size (large objects)")
    group.add_argument("--tta", action="store_true",
                       help="test-time augmentation: horizontal flip and --tta-scales, merged as mmdetection's TTA")
    group.add_argument("--tta-scales", default="1.0", metavar="S[,S...]",
                       help="with --tta: factors on the model's input size, one view each (1.0; e.g. 0.8,1.0,1.2)")
    group.add_argument("--tta-no-flip", action="store_true", help="with --tta: no flipped views (scales only)")
    group.add_argument("--max-megapixels", type=float, metavar="MP",
                       help=f"refuse images above MP megapixels before decoding ({MAX_IMAGE_PIXELS / 1e6:.0f}); "
                            "raise it to read larger images, e.g. 400 for 20000x20000 with --tile")  # fmt: skip


def tile_config(args: argparse.Namespace, batch_size: int | None) -> TileConfig | None:
    """The `TileConfig` of `--tile ...` (None without `--tile`); `batch_size`: slices per forward pass (the
    `TileConfig` default when None). Flags given without `--tile` / `--tta` are a one-line `ConfigError`."""
    if args.tile is None:
        orphans = [flag for flag, given in (("--tile-overlap", args.tile_overlap != 0.2),
                                            ("--tile-full", args.tile_full)) if given]  # fmt: skip
        if orphans:
            raise ConfigError(f"{', '.join(orphans)} only with --tile SIZE")
        return None
    options: dict[str, Any] = {"size": args.tile, "overlap": args.tile_overlap, "full_image": args.tile_full}
    return TileConfig(**options, **({"batch_size": batch_size} if batch_size else {}))


def tta_config(args: argparse.Namespace) -> TTAConfig | None:
    """The `TTAConfig` of `--tta ...` (None without `--tta`)."""
    if not args.tta:
        orphans = [flag for flag, given in (("--tta-scales", args.tta_scales != "1.0"),
                                            ("--tta-no-flip", args.tta_no_flip)) if given]  # fmt: skip
        if orphans:
            raise ConfigError(f"{', '.join(orphans)} only with --tta")
        return None
    return TTAConfig(scales=parse_scales(args.tta_scales), flip=not args.tta_no_flip)


def max_pixels(args: argparse.Namespace) -> int:
    """The decoding limit in pixels: `--max-megapixels`, or the default guard. A limit above Pillow's own
    (`Image.MAX_IMAGE_PIXELS`, a hard error at twice it) raises Pillow's to match, for this process: the user asked."""
    if args.max_megapixels is None:
        return MAX_IMAGE_PIXELS
    if not args.max_megapixels > 0:
        raise ConfigError(f"--max-megapixels {args.max_megapixels}: must be a positive number of megapixels")
    limit = int(args.max_megapixels * 1e6)
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    return limit


def check_backend(args: argparse.Namespace, tile: TileConfig | None, tta: TTAConfig | None) -> None:
    """Tiling and TTA run the torch model's own flow: refused with another backend, with --save-masks (they are
    box-only) and with --per-stage (the merge mixes the stages), each on one line."""
    used = [flag for flag, on in (("--tile", tile is not None), ("--tta", tta is not None)) if on]
    if not used:
        return
    if getattr(args, "backend", "torch") != "torch":
        raise ConfigError(f"{' and '.join(used)} run the torch backend's model (not {args.backend})")
    if getattr(args, "save_masks", False):
        raise ConfigError(f"--save-masks: {' and '.join(used)} are box-only (full-image masks of every slice or view "
                          "are not kept); run without them for masks")  # fmt: skip
    if getattr(args, "per_stage", False):
        raise ConfigError(f"--per-stage: not available with {' and '.join(used)} (their merge mixes the stages)")


def check_detector(detector: Any, tile: TileConfig | None) -> None:
    """A slice smaller than the model's largest stride is refused as soon as the model is loaded."""
    if tile is not None and hasattr(detector, "model"):
        tile.check_model(largest_stride(detector.model))


def describe(tile: TileConfig | None, tta: TTAConfig | None) -> dict[str, Any]:
    """What a metrics file records: {"tile": ... or None, "tta": ... or None}."""
    return {"tile": None if tile is None else tile.describe(), "tta": None if tta is None else tta.describe()}
