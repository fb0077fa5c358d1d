"""Tests of cascade_rcnn.io.download against a local HTTP server on 127.0.0.1 (no network).

Invariants: the final path only ever holds a complete file with the registered checksum; no `.part` file survives a
failure; a verified cached file is reused without a request; every failure message says where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import dataclasses
import io

import pytest
import torch
from test_mmdet_loading import small_mmdet_checkpoint

from cascade_rcnn.config import PRESETS, get_preset
from cascade_rcnn.io import download
from cascade_rcnn.io.detectron2 import MASK_PRESET
from cascade_rcnn.io.download import KNOWN_WEIGHTS, KnownWeights, fetch_weights, resolve_weights
from cascade_rcnn.io.weights import load_checkpoint
from cascade_rcnn.errors import CheckpointError, DownloadError

BODY = bytes(range(256)) * 4096  # 1 MiB, a few progress-bar chunks
BODY_SHA256 = hashlib.sha256(BODY).hexdigest()


class WeightsServer:
    """A threaded HTTP server with fixed routes; `requests` lists every path asked for."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, int]] = {}  # path -> (body, Content-Length sent)
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, length = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)  # when length > len(body), the connection then closes early

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[WeightsServer]:
    # A proxy from the environment must not intercept requests to the local server.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = WeightsServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _register(
    monkeypatch: pytest.MonkeyPatch, url: str, sha256: str | None, name: str = "test-weights"
) -> KnownWeights:
    entry = KnownWeights(
        name=name, url=url, sha256=sha256, file_name="weights.pth", format="mmdet",
        preset="cascade_rcnn_r50_fpn", box_ap=0.0, description="served by the test",
    )
    monkeypatch.setitem(KNOWN_WEIGHTS, name, entry)
    return entry


def _files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.parametrize("sha256", [BODY_SHA256, BODY_SHA256[:8]], ids=["full", "prefix"])
def test_good_checksum(tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch, sha256: str) -> None:
    server.routes["/w.pth"] = (BODY, len(BODY))
    _register(monkeypatch, server.url("/w.pth"), sha256)
    path = fetch_weights("test-weights", cache_dir=tmp_path, progress=True)
    assert path == tmp_path / "weights.pth"
    assert path.read_bytes() == BODY
    assert _files(tmp_path) == ["weights.pth"]


def test_bad_checksum_deletes_the_download(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/w.pth"] = (BODY, len(BODY))
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    _register(monkeypatch, server.url("/w.pth"), wrong)
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("test-weights", cache_dir=tmp_path, progress=False)
    message = str(excinfo.value)
    assert f"expected sha256 {wrong}" in message and f"got {BODY_SHA256}" in message
    assert _files(tmp_path) == []


def test_interrupted_transfer_leaves_no_file(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/w.pth"] = (BODY[:300_000], len(BODY))  # announces 1 MiB, sends 300 kB, closes
    _register(monkeypatch, server.url("/w.pth"), BODY_SHA256)
    with pytest.raises(DownloadError, match=f"interrupted.*300000 of {len(BODY)} bytes") as excinfo:
        fetch_weights("test-weights", cache_dir=tmp_path, progress=False)
    assert str(tmp_path / "weights.pth") in str(excinfo.value)
    assert _files(tmp_path) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_says_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    url = f"http://127.0.0.1:{_closed_port()}/w.pth"
    _register(monkeypatch, url, BODY_SHA256)
    with pytest.raises(DownloadError) as excinfo:
        fetch_weights("test-weights", cache_dir=tmp_path / "cache", progress=False)
    message = str(excinfo.value)
    assert url in message
    assert f"save it as {tmp_path / 'cache' / 'weights.pth'}" in message
    assert _files(tmp_path / "cache") == []


def test_http_error_says_where_to_put_the_file(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _register(monkeypatch, server.url("/missing.pth"), BODY_SHA256)
    with pytest.raises(DownloadError, match="HTTP 404") as excinfo:
        fetch_weights("test-weights", cache_dir=tmp_path, progress=False)
    assert str(tmp_path / "weights.pth") in str(excinfo.value)
    assert _files(tmp_path) == []


def test_cached_file_is_reused_without_a_request(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/w.pth"] = (BODY, len(BODY))
    _register(monkeypatch, server.url("/w.pth"), BODY_SHA256)
    first = fetch_weights("test-weights", cache_dir=tmp_path, progress=False)
    second = fetch_weights("test-weights", cache_dir=tmp_path, progress=False)
    assert first == second
    assert server.requests == ["/w.pth"]


def test_file_put_by_hand_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the no-network message asks a user to do: no server exists, and the file is still found and verified.
    _register(monkeypatch, f"http://127.0.0.1:{_closed_port()}/w.pth", BODY_SHA256)
    monkeypatch.setenv("CASCADE_RCNN_CACHE", str(tmp_path / "env_cache"))
    (tmp_path / "env_cache").mkdir()
    (tmp_path / "env_cache" / "weights.pth").write_bytes(BODY)
    assert fetch_weights("test-weights", progress=False) == tmp_path / "env_cache" / "weights.pth"


def test_damaged_cached_file_is_replaced(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/w.pth"] = (BODY, len(BODY))
    _register(monkeypatch, server.url("/w.pth"), BODY_SHA256)
    (tmp_path / "weights.pth").write_bytes(BODY[:1000])
    with pytest.warns(UserWarning, match="does not match"):
        path = fetch_weights("test-weights", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == BODY
    assert server.requests == ["/w.pth"]


def test_unpublished_checksum_is_accepted_with_a_warning(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/w.pkl"] = (BODY, len(BODY))
    _register(monkeypatch, server.url("/w.pkl"), None)
    with pytest.warns(UserWarning, match=f"no checksum is published.*{BODY_SHA256}"):
        path = fetch_weights("test-weights", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == BODY


def test_registered_url_is_verified_like_its_name(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/w.pth"] = (BODY, len(BODY))
    entry = _register(monkeypatch, server.url("/w.pth"), "0" * 64)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_weights(entry.url, cache_dir=tmp_path, progress=False)


def test_resolve_weights(tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "mine.pth"
    local.write_bytes(b"x")
    assert resolve_weights(local) == local
    assert resolve_weights(str(local)) == local

    server.routes["/w.pth"] = (BODY, len(BODY))
    _register(monkeypatch, server.url("/w.pth"), BODY_SHA256)
    assert resolve_weights("test-weights", cache_dir=tmp_path / "cache", progress=False).read_bytes() == BODY

    with pytest.raises(CheckpointError, match="no such file, and not a known weights name"):
        resolve_weights(tmp_path / "nothing.pth")
    with pytest.raises(DownloadError, match="unknown weights name"):
        fetch_weights("no-such-weights", cache_dir=tmp_path)


# --- the registry itself ---------------------------------------------------------------------------------------------


def test_registry_entries_are_consistent() -> None:
    assert {w.format for w in KNOWN_WEIGHTS.values()} == {"mmdet", "detectron2", "mindspore"}
    for key, entry in KNOWN_WEIGHTS.items():
        assert key == entry.name
        assert entry.url.startswith("https://"), key
        assert entry.preset in PRESETS, key
        assert 30.0 < entry.box_ap < 50.0, key
        # A mask AP exactly for the weights of a mask preset, and below the box AP, as every publisher's is.
        assert (entry.mask_ap is not None) == get_preset(entry.preset).has_masks, key
        assert entry.mask_ap is None or 30.0 < entry.mask_ap < entry.box_ap, key
        if entry.format == "mmdet":
            # mmcv's publish_model appends the first 8 hex digits of the file's sha256 to its name.
            assert entry.url.startswith("https://download.openmmlab.com/mmdetection/v2.0/cascade_rcnn/")
            assert entry.url.endswith("/" + entry.file_name)
            assert re.fullmatch(r".*-([0-9a-f]{8})\.pth", entry.file_name).group(1) == entry.sha256
            # mmdetection names its Cascade Mask R-CNN files cascade_mask_rcnn_*, and they load as a mask preset.
            assert entry.file_name.startswith("cascade_mask_rcnn_") == (entry.mask_ap is not None), key
        elif entry.format == "detectron2":
            assert entry.url.startswith("https://dl.fbaipublicfiles.com/detectron2/Misc/cascade_mask_rcnn_R_50_FPN_")
            assert entry.sha256 is None
            assert entry.preset == MASK_PRESET  # detectron2's published cascade files all have their mask head
            url_name = entry.url.rsplit("/", 1)[1]
            assert re.fullmatch(r"model_final_[0-9a-f]{6}\.pkl", url_name) and entry.file_name.endswith(url_name)
        else:
            assert entry.sha256 is not None and len(entry.sha256) == 64
            assert entry.url.endswith("/" + entry.file_name)
    file_names = [w.file_name for w in KNOWN_WEIGHTS.values()]
    assert len(set(file_names)) == len(file_names), "two entries would share one cache file"


def test_published_mask_weights() -> None:
    """The Cascade Mask R-CNN files of mmdetection's metafile (1x) and detectron2's MODEL_ZOO.md (Misc), with the
    box and mask AP their publishers report on COCO val2017."""
    expected = {
        "mmdet-mask-r50-1x": ("cascade_mask_rcnn_r50_fpn_1x_coco_20200203-9d4dcb24.pth", 41.2, 35.9),
        "mmdet-mask-r101-1x": ("cascade_mask_rcnn_r101_fpn_1x_coco_20200203-befdf6ee.pth", 42.9, 37.3),
        "mmdet-mask-x101-32x4d-1x": ("cascade_mask_rcnn_x101_32x4d_fpn_1x_coco_20200201-0f411b1f.pth", 44.3, 38.3),
        "mmdet-mask-x101-64x4d-1x": ("cascade_mask_rcnn_x101_64x4d_fpn_1x_coco_20200203-9a2db89d.pth", 45.3, 39.2),
        "detectron2-r50-1x": ("model_final_e9d89b.pkl", 42.1, 36.4),
        "detectron2-r50-3x": ("model_final_480dd8.pkl", 44.3, 38.5),
    }
    for name, (file_name, box_ap, mask_ap) in expected.items():
        entry = KNOWN_WEIGHTS[name]
        assert entry.url.endswith("/" + file_name) and (entry.box_ap, entry.mask_ap) == (box_ap, mask_ap), name
        assert "Cascade Mask R-CNN" in entry.description, name
    assert KNOWN_WEIGHTS["mmdet-mask-r50-1x"].url == (
        "https://download.openmmlab.com/mmdetection/v2.0/cascade_rcnn/cascade_mask_rcnn_r50_fpn_1x_coco/"
        "cascade_mask_rcnn_r50_fpn_1x_coco_20200203-9d4dcb24.pth"
    )
    assert KNOWN_WEIGHTS["mmdet-mask-r50-1x"].sha256 == "9d4dcb24"


def test_mask_entry_downloads_verifies_and_loads_as_its_preset(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A known mask name end to end, served locally: an mmdetection-layout Cascade Mask R-CNN checkpoint (1-element
    tensors, except the shapes the converter reads), verified by the 8-hex sha256 prefix of its name as mmdetection's
    entries are, read as the entry's preset with its mask heads."""
    state_dict = small_mmdet_checkpoint(num_classes=80)
    for s in range(3):
        state_dict[f"roi_head.mask_head.{s}.convs.0.conv.weight"] = torch.zeros(1)
        state_dict[f"roi_head.mask_head.{s}.conv_logits.weight"] = torch.zeros(1)
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict, "meta": {}}, buffer)
    body = buffer.getvalue()
    published = KNOWN_WEIGHTS["mmdet-mask-r50-1x"]
    path = "/" + published.url.split("/", 3)[3]  # the publisher's path, on the local server
    server.routes[path] = (body, len(body))
    served = dataclasses.replace(published, url=server.url(path), sha256=hashlib.sha256(body).hexdigest()[:8])
    monkeypatch.setitem(KNOWN_WEIGHTS, served.name, served)
    monkeypatch.setenv("CASCADE_RCNN_CACHE", str(tmp_path))

    local = resolve_weights("mmdet-mask-r50-1x", progress=False)
    assert local == tmp_path / published.file_name and local.read_bytes() == body
    checkpoint = load_checkpoint(local)
    assert checkpoint.preset == published.preset == "cascade_mask_rcnn_r50_fpn"
    assert checkpoint.config.has_masks and checkpoint.config.mask.heads == "per_stage"
    assert "mask_heads.heads.2.logits.weight" in checkpoint.state_dict

    # The same name with a body that does not start with the published prefix is refused, and nothing is kept.
    local.unlink()
    monkeypatch.setitem(KNOWN_WEIGHTS, served.name, dataclasses.replace(served, sha256=published.sha256))
    with pytest.raises(DownloadError, match="expected sha256 starting with 9d4dcb24"):
        resolve_weights("mmdet-mask-r50-1x", progress=False)
    assert _files(tmp_path) == []


def test_known_weights_rejects_malformed_checksums() -> None:
    fields = {"name": "x", "url": "https://e/x.pth", "file_name": "x.pth", "format": "mmdet", "preset": "p",
              "box_ap": 1.0, "description": ""}
    for bad in ("3dc56de", "3DC56DEB", "xyzxyzxy", "0" * 65):
        with pytest.raises(ValueError, match="sha256"):
            KnownWeights(sha256=bad, **fields)
    with pytest.raises(ValueError, match="format"):
        KnownWeights(**{**fields, "format": "onnx"}, sha256=None)
    KnownWeights(sha256="3dc56deb", **fields)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CASCADE_RCNN_CACHE", str(tmp_path))
    assert download.default_cache_dir() == tmp_path
    monkeypatch.delenv("CASCADE_RCNN_CACHE")
    assert download.default_cache_dir() == Path.home() / ".cache" / "cascade_rcnn"
