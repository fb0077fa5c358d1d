"""Published Cascade R-CNN weights: a registry of where they live, and a verified, cached download.

- `KNOWN_WEIGHTS` maps a short name (`mmdet-r50-1x`, `mmdet-mask-r50-1x`, `detectron2-r50-3x`, `mindspore-coco`, ...)
  to a `KnownWeights` record: the URL, the published checksum, the file format, the preset whose model the weights
  fit, and the box AP (and, for Cascade Mask R-CNN weights, the mask AP) the publisher reports on COCO val2017.
- `fetch_weights(name_or_url)` downloads once into the cache (`$CASCADE_RCNN_CACHE`, else `~/.cache/cascade_rcnn`),
  verifies the sha256 and returns the cached path; later calls reuse the verified file without a request.
- `resolve_weights(spec)` is what a `--weights` option wants: an existing local path as given, else a known name or
  URL fetched through the cache.

Checksums. mmdetection names each file `<name>_<date>-<8 hex>.pth`, the 8 hex being the start of the file's sha256
(mmcv's `publish_model`), so the registry holds that prefix and a download must start with it. MindSpore Hub publishes
the full sha256. detectron2's model zoo publishes none: those entries have `sha256=None`, and a download of them is
accepted with a warning that prints the sha256 it got, so a user can compare it with a trusted copy. The same holds
for a URL that is not in the registry.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cascade_rcnn.errors import CheckpointError, DownloadError

WEIGHT_FORMATS = ("mmdet", "detectron2", "mindspore")
_HEX = re.compile(r"[0-9a-f]+")
_MIN_SHA256_PREFIX = 8
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class KnownWeights:
    """One published weights file.

    Attributes:
        name: the registry key, what a user types.
        url: where the publisher serves the file.
        sha256: lower-case hex: the full 64-digit sha256, a prefix of at least 8 digits (mmdetection puts 8 in its
            file names), or None where the publisher gives no checksum.
        file_name: the name of the file in the cache.
        format: 'mmdet' (torch.save with `state_dict` and `meta`), 'detectron2' (model-zoo pickle of numpy arrays) or
            'mindspore' (MindSpore `.ckpt`).
        preset: the name of the model preset these weights fit.
        box_ap: the COCO val2017 box AP the publisher reports for these weights.
        description: one line for listings.
        mask_ap: the COCO val2017 mask AP the publisher reports, for Cascade Mask R-CNN weights (a mask preset);
            None for box-only weights.
    """

    name: str
    url: str
    sha256: str | None
    file_name: str
    format: str
    preset: str
    box_ap: float
    description: str
    mask_ap: float | None = None

    def __post_init__(self) -> None:
        if self.sha256 is not None and not (
            _MIN_SHA256_PREFIX <= len(self.sha256) <= 64 and _HEX.fullmatch(self.sha256)
        ):
            raise ValueError(f"{self.name}: sha256 must be None or 8 to 64 lower-case hex digits, got {self.sha256!r}")
        if self.format not in WEIGHT_FORMATS:
            raise ValueError(f"{self.name}: format must be one of {WEIGHT_FORMATS}, got {self.format!r}")


_MMDET = "https://download.openmmlab.com/mmdetection/v2.0/cascade_rcnn"
_D2 = "https://dl.fbaipublicfiles.com/detectron2/Misc"


def _mmdet(
    name: str, config: str, file_name: str, preset: str, box_ap: float, schedule: str, mask_ap: float | None = None
) -> KnownWeights:
    sha256_prefix = file_name.rsplit("-", 1)[1].removesuffix(".pth")
    model = "Cascade R-CNN" if mask_ap is None else "Cascade Mask R-CNN"
    return KnownWeights(
        name=name,
        url=f"{_MMDET}/{config}/{file_name}",
        sha256=sha256_prefix,
        file_name=file_name,
        format="mmdet",
        preset=preset,
        box_ap=box_ap,
        description=f"mmdetection {config} ({model}, {schedule} schedule, COCO)",
        mask_ap=mask_ap,
    )


def _detectron2(name: str, config: str, model_id: str, file_name: str, box_ap: float, mask_ap: float) -> KnownWeights:
    return KnownWeights(
        name=name,
        url=f"{_D2}/{config}/{model_id}/{file_name}",
        sha256=None,
        file_name=f"detectron2_{config}_{model_id}_{file_name}",  # every zoo file is called model_final_<6 hex>.pkl
        format="detectron2",
        preset="cascade_mask_rcnn_r50_fpn_detectron2",
        box_ap=box_ap,
        # A box preset asked for (--preset cascade_rcnn_r50_fpn_detectron2) loads the box path and skips the mask head.
        description=f"detectron2 Misc/{config} (Cascade Mask R-CNN, one mask head, COCO)",
        mask_ap=mask_ap,
    )


# Sources, read when this registry was written:
# - mmdetection: configs/cascade_rcnn/metafile.yml of open-mmlab/mmdetection (v2.x layout; URLs, box and mask AP).
# - detectron2: MODEL_ZOO.md of facebookresearch/detectron2, table "Ablations for Deformable Conv and Cascade R-CNN"
#   (box and mask AP).
# - MindSpore: mshub_res/assets/mindspore/1.8/cascadercnn_coco2017.md of mindspore-ai/hub (URL and full sha256;
#   "map37.3" there is the box AP), model code research/cv/CascadeRCNN of mindspore-ai/models (ResNet-101 FPN).
_REGISTRY = (
    _mmdet("mmdet-r50-1x", "cascade_rcnn_r50_fpn_1x_coco",
           "cascade_rcnn_r50_fpn_1x_coco_20200316-3dc56deb.pth", "cascade_rcnn_r50_fpn", 40.3, "1x"),
    _mmdet("mmdet-r50-20e", "cascade_rcnn_r50_fpn_20e_coco",
           "cascade_rcnn_r50_fpn_20e_coco_bbox_mAP-0.41_20200504_175131-e9872a90.pth", "cascade_rcnn_r50_fpn", 41.0,
           "20e"),
    _mmdet("mmdet-r101-1x", "cascade_rcnn_r101_fpn_1x_coco",
           "cascade_rcnn_r101_fpn_1x_coco_20200317-0b6a2fbf.pth", "cascade_rcnn_r101_fpn", 42.0, "1x"),
    _mmdet("mmdet-r101-20e", "cascade_rcnn_r101_fpn_20e_coco",
           "cascade_rcnn_r101_fpn_20e_coco_bbox_mAP-0.425_20200504_231812-5057dcc5.pth", "cascade_rcnn_r101_fpn", 42.5,
           "20e"),
    _mmdet("mmdet-x101-32x4d-1x", "cascade_rcnn_x101_32x4d_fpn_1x_coco",
           "cascade_rcnn_x101_32x4d_fpn_1x_coco_20200316-95c2deb6.pth", "cascade_rcnn_x101_32x4d_fpn", 43.7, "1x"),
    _mmdet("mmdet-x101-64x4d-1x", "cascade_rcnn_x101_64x4d_fpn_1x_coco",
           "cascade_rcnn_x101_64x4d_fpn_1x_coco_20200515_075702-43ce6a30.pth", "cascade_rcnn_x101_64x4d_fpn", 44.7,
           "1x"),
    _mmdet("mmdet-mask-r50-1x", "cascade_mask_rcnn_r50_fpn_1x_coco",
           "cascade_mask_rcnn_r50_fpn_1x_coco_20200203-9d4dcb24.pth", "cascade_mask_rcnn_r50_fpn", 41.2, "1x", 35.9),
    _mmdet("mmdet-mask-r101-1x", "cascade_mask_rcnn_r101_fpn_1x_coco",
           "cascade_mask_rcnn_r101_fpn_1x_coco_20200203-befdf6ee.pth", "cascade_mask_rcnn_r101_fpn", 42.9, "1x", 37.3),
    _mmdet("mmdet-mask-x101-32x4d-1x", "cascade_mask_rcnn_x101_32x4d_fpn_1x_coco",
           "cascade_mask_rcnn_x101_32x4d_fpn_1x_coco_20200201-0f411b1f.pth", "cascade_mask_rcnn_x101_32x4d_fpn", 44.3,
           "1x", 38.3),
    _mmdet("mmdet-mask-x101-64x4d-1x", "cascade_mask_rcnn_x101_64x4d_fpn_1x_coco",
           "cascade_mask_rcnn_x101_64x4d_fpn_1x_coco_20200203-9a2db89d.pth", "cascade_mask_rcnn_x101_64x4d_fpn", 45.3,
           "1x", 39.2),
    _detectron2("detectron2-r50-1x", "cascade_mask_rcnn_R_50_FPN_1x", "138602847", "model_final_e9d89b.pkl", 42.1,
                36.4),
    _detectron2("detectron2-r50-3x", "cascade_mask_rcnn_R_50_FPN_3x", "144998488", "model_final_480dd8.pkl", 44.3,
                38.5),
    KnownWeights(
        name="mindspore-coco",
        url="https://download.mindspore.cn/models/r1.8/"
        "cascadercnn_ascend_v180_coco2017_research_cv_map37.3_ap50acc55.5.ckpt",
        sha256="18204a922b382758a16cd57d30481a6f5c4d06aaabfe228aa3c8804521d2a019",
        file_name="cascadercnn_ascend_v180_coco2017_research_cv_map37.3_ap50acc55.5.ckpt",
        format="mindspore",
        preset="cascade_rcnn_r101_fpn_mindspore",
        box_ap=37.3,
        description="MindSpore Hub CascadeRCNN (research/cv/CascadeRCNN, ResNet-101 FPN, trained on Ascend, COCO)",
    ),
)
KNOWN_WEIGHTS: dict[str, KnownWeights] = {w.name: w for w in _REGISTRY}


def default_cache_dir() -> Path:
    """`$CASCADE_RCNN_CACHE` when set, else `~/.cache/cascade_rcnn`."""
    return Path(os.environ.get("CASCADE_RCNN_CACHE") or Path.home() / ".cache" / "cascade_rcnn").expanduser()


def _is_url(spec: str) -> bool:
    return urllib.parse.urlparse(spec).scheme in ("http", "https")


def _source_of(name_or_url: str) -> tuple[str, str | None, str]:
    """`(url, sha256 or None, file name)` for a registry name, a registered URL or any other http(s) URL."""
    if name_or_url in KNOWN_WEIGHTS:
        entry = KNOWN_WEIGHTS[name_or_url]
        return entry.url, entry.sha256, entry.file_name
    if _is_url(name_or_url):
        for entry in KNOWN_WEIGHTS.values():
            if entry.url == name_or_url:
                return entry.url, entry.sha256, entry.file_name
        file_name = Path(urllib.parse.urlparse(name_or_url).path).name
        if not file_name:
            raise DownloadError(f"cannot tell a file name from the URL {name_or_url}")
        return name_or_url, None, file_name
    raise DownloadError(f"unknown weights name {name_or_url!r}; known names: {', '.join(sorted(KNOWN_WEIGHTS))}")


def fetch_weights(name_or_url: str, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Return the local path of known weights, downloading and verifying them on first use.

    Args:
        name_or_url: a `KNOWN_WEIGHTS` key, or an http(s) URL (a registered URL is verified like its name).
        cache_dir: where files are kept; default `default_cache_dir()`.
        progress: show a tqdm progress bar on stderr while downloading.

    Returns:
        `cache_dir / file_name`, a complete file whose sha256 matches the registry (when it gives one).

    Raises:
        DownloadError: unknown name; no network or an HTTP error (the message gives the URL and the exact path to put
            the file by hand); a transfer cut short; a checksum mismatch (expected vs got). In every case no file is
            left at the final path and the partial `.part` file is removed.
    """
    url, sha256, file_name = _source_of(str(name_or_url))
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / file_name
    if target.is_file():
        if sha256 is None or _sha256_of(target).startswith(sha256):
            return target
        # A cached file that fails its checksum was damaged or replaced by hand with the wrong file: it goes, so that
        # the final path only ever holds a verified file, and a fresh copy is fetched.
        warnings.warn(f"{target} does not match its published sha256; removed, downloading it again", stacklevel=2)
        target.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        digest = _download(url, part, target, progress)
        _verify(url, sha256, digest, target)
        os.replace(part, target)  # atomic: the final path only ever holds a complete, verified file
    finally:
        part.unlink(missing_ok=True)
    return target


def _download(url: str, part: Path, target: Path, progress: bool) -> str:
    """Stream `url` into `part`, checking the length the server announced; returns the sha256 hex of the bytes."""
    hint = f"download it by hand from {url} and save it as {target}"
    request = urllib.request.Request(url, headers={"User-Agent": "cascade-rcnn"})
    sha256 = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            with open(part, "wb") as f, tqdm(
                total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name, disable=not progress
            ) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    sha256.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} ({e.reason}) from {url}; {hint}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url} ({e.reason}); no network? {hint}") from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise DownloadError(f"transfer of {url} interrupted after {received} bytes ({e!r}); retry, or {hint}") from None
    # http.client ends a read at a closed connection without complaint, so a short transfer shows only here.
    if expected is not None and received != expected:
        raise DownloadError(
            f"transfer of {url} interrupted: got {received} of {expected} bytes; retry, or {hint}"
        )
    return sha256.hexdigest()


def _verify(url: str, sha256: str | None, digest: str, target: Path) -> None:
    """Check a download's sha256 against the registry; warn, and name the digest, where none is published."""
    if sha256 is None:
        warnings.warn(f"no checksum is published for {url}; accepted unverified with sha256 {digest}", stacklevel=3)
    elif not digest.startswith(sha256):
        kind = "sha256" if len(sha256) == 64 else "sha256 starting with"
        raise DownloadError(
            f"checksum mismatch for {url}: expected {kind} {sha256}, got {digest}; "
            f"the download was deleted and nothing was written to {target}"
        )


def _sha256_of(path: Path) -> str:
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
    return sha256.hexdigest()


def resolve_weights(spec: str | os.PathLike[str], cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """A weights argument as a local path: an existing file as given, else a known name or URL via `fetch_weights`.

    Raises:
        CheckpointError: `spec` is neither an existing file, a known name nor an http(s) URL.
        DownloadError: see `fetch_weights`.
    """
    path = Path(spec)
    if path.exists():
        return path
    text = os.fspath(spec)
    if text in KNOWN_WEIGHTS or _is_url(text):
        return fetch_weights(text, cache_dir=cache_dir, progress=progress)
    raise CheckpointError(
        f"weights {text!r}: no such file, and not a known weights name ({', '.join(sorted(KNOWN_WEIGHTS))}) "
        "or an http(s) URL"
    )
