"""`cascade-rcnn serve` against real servers on loopback, over real HTTP.

Two `cascade-rcnn serve` subprocesses with a tiny untrained model: one for results, bad uploads, the load test and the
OpenAPI fuzz run; one with an API key, for the key and the SIGTERM shutdown. The queue-full (503) and timeout (504)
paths run uvicorn in a thread around a fake detector that blocks until the test lets it go, so their timing is the
test's, not the CPU's. Skipped where the `serve` extra (fastapi, uvicorn, python-multipart) or httpx is missing,
except the test that the command says so in one line.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rcnn import serve as serve_package
from cascade_rcnn.cli import main
from cascade_rcnn.structures import Detections
from tests.helpers import REPO, tiny_config, without_packages

CLASS_NAMES = ("person", "car", "dog")
API_KEY = "test-key-7f3a"
START_TIMEOUT_S = 120  # torch import and model build on a busy 2-core machine


def require_serve() -> Any:
    """httpx, after skipping the test where the serve extra or httpx is missing (naming which)."""
    for module in ("fastapi", "uvicorn", "python_multipart"):
        pytest.importorskip(module, reason=f"{module} not installed (pip install 'cascade-rcnn[serve]')")
    return pytest.importorskip("httpx", reason="httpx not installed (the test extra has it)")


# --- fixtures: weights, images, servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_weights(module_tmp: Path) -> Path:
    """An untrained 3-class detector on 64-96 px inputs with 20 proposals per image: ~0.1 s per image on 2 CPU cores,
    so the load test's 110 requests stay short."""
    from cascade_rcnn.api import Detector

    torch.manual_seed(0)
    small = {"transform.min_size": 64, "transform.max_size": 96, "rpn.pre_nms_top_n_test": 100,
             "rpn.post_nms_top_n_test": 20}  # fmt: skip
    config = tiny_config(3, class_names=CLASS_NAMES, **small)
    return Detector(config=config).save(module_tmp / "tiny.safetensors")


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header declaring width x height grey pixels, followed by a few compressed rows: decoding it would
    need gigabytes, the file is under 100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class ServerProcess:
    """`cascade-rcnn serve ... --port 0` in a subprocess; `url` from the line it prints once it listens."""

    def __init__(
        self, weights: Path, *args: str, env: dict[str, str] | None = None, without: tuple[str, ...] = ()
    ) -> None:
        argv = ["serve", "--weights", str(weights), "--port", "0", "--device", "cpu", "--log-level", "warning", *args]
        command = [sys.executable, "-m", "cascade_rcnn", *argv]
        if without:  # these packages cannot be imported in the server, as where they are not installed
            code = f"from cascade_rcnn.cli import main\nsys.exit(main({argv!r}))\n"
            command = [sys.executable, "-c", without_packages(without) + code]
        child_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO), **(env or {})}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=child_env, cwd=REPO)  # fmt: skip
        self.lines: list[str] = []
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        found = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line)
                if "http://" in line:
                    found.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not found.wait(START_TIMEOUT_S):
            self.stop()
            raise AssertionError(f"server did not start:\n{''.join(self.lines)}\n{self.stderr()}")
        return re.search(r"http://[\w.\[\]:]+", "".join(self.lines)).group(0)

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server(tiny_weights: Path) -> Iterator[ServerProcess]:
    require_serve()
    process = ServerProcess(tiny_weights, "--max-batch-size", "4", "--max-upload-mb", "1", "--max-images", "4",
                            "--max-megapixels", "10")  # fmt: skip
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Any]:
    httpx = require_serve()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def assert_refused(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    return detail


# --- results --------------------------------------------------------------------------------------------------------


def test_health_and_model(client: Any, tiny_weights: Path) -> None:
    assert client.get("/v1/health").json() == {"status": "ok", "queued_images": 0, "running_images": 0}
    model = client.get("/v1/model").json()
    assert model["preset"] == "cascade_rcnn_r50_fpn"
    assert model["classes"] == list(CLASS_NAMES)
    assert model["masks"] is False and model["backend"] == "torch"
    assert model["weights"] == tiny_weights.name
    assert model["weights_sha256"] == hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    assert model["limits"]["max_images_per_request"] == 4
    spec = client.get("/openapi.json").json()
    assert {"/v1/detect", "/v1/health", "/v1/model"} <= set(spec["paths"])


def test_detect_equals_the_python_api_in_original_pixels(client: Any, tiny_weights: Path) -> None:
    """Multipart with two images of different sizes, and the raw body, give the detections `Detector.predict` gives
    (boxes in each image's own pixels), filtered by score and class as asked."""
    from cascade_rcnn.api import Detector

    images = [np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
              for seed, (h, w) in enumerate([(48, 64), (90, 40)])]  # fmt: skip
    uploads = [png(image) for image in images]  # PNG: lossless, so both sides see the same pixels
    expected = Detector.from_weights(tiny_weights).predict(images)

    form = client.post("/v1/detect", params={"score_threshold": 0.0},
                       files=[("image", ("a.png", uploads[0], "image/png")), ("image", ("b.png", uploads[1], "image/png"))])  # fmt: skip
    assert form.status_code == 200, form.text
    results = form.json()["images"]
    assert [(r["width"], r["height"]) for r in results] == [(64, 48), (40, 90)]
    for result, reference in zip(results, expected, strict=True):
        assert len(result["boxes"]) == len(reference) > 0
        torch.testing.assert_close(torch.tensor(result["boxes"]), reference.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(torch.tensor(result["scores"]), reference.scores, atol=1e-5, rtol=0)
        assert result["labels"] == reference.labels.tolist() and result["names"] == reference.names
        assert "segmentation" not in result  # a box-only model
        assert max(max(box[2] for box in result["boxes"]), 0) <= result["width"] + 1e-3

    raw = client.post("/v1/detect?score_threshold=0.5&classes=dog&classes=person",
                      content=uploads[1], headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert raw.status_code == 200, raw.text
    (result,) = raw.json()["images"]
    keep = (expected[1].scores >= 0.5) & torch.isin(expected[1].labels, torch.tensor([0, 2]))
    assert result["scores"] == pytest.approx(expected[1].scores[keep].tolist(), abs=1e-5)
    assert set(result["names"]) <= {"dog", "person"}


# --- bad uploads: each kind its own 4xx with a one-line reason, and the server lives on -------------------------------

BAD_UPLOADS = {
    # name: (status, request keyword arguments, fragment of the reason)
    "not an image": (422, {"content": b"hello, not an image" * 10, "headers": {"Content-Type": "image/jpeg"}},
                     "cannot read image"),
    "truncated": (422, {"content": jpeg(320, 240)[:600], "headers": {"Content-Type": "image/jpeg"}}, "cannot read"),
    "decompression bomb": (422, {"content": png_bomb(), "headers": {"Content-Type": "image/png"}}, "too large"),
    "wrong content type": (415, {"content": b'{"image": 1}', "headers": {"Content-Type": "application/json"}},
                           "not an image"),
    "form encoding": (415, {"data": {"image": "x"}}, "not an image"),
    "empty body": (400, {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, "empty body"),
    "empty form file": (422, {"files": [("image", ("a.jpg", b"", "image/jpeg"))]}, "empty"),
    "form part not an image type": (415, {"files": [("image", ("a.txt", jpeg(), "text/plain"))]}, "not an image"),
    "no image field": (400, {"files": [("picture", ("a.jpg", jpeg(), "image/jpeg"))]}, "no form field 'image'"),
    "text field": (400, {"data": {"image": "abc"}, "files": [("other", ("a.jpg", jpeg(), "image/jpeg"))]},
                   "must be a file"),
    "too many images": (400, {"files": [("image", (f"{i}.jpg", jpeg(), "image/jpeg")) for i in range(5)]}, "form"),
    "broken multipart": (400, {"content": b"--xyz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
                               "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}, "form"),
    "multipart without boundary": (400, {"content": b"abc", "headers": {"Content-Type": "multipart/form-data"}},
                                   "multipart"),
    "over the upload limit": (413, {"content": b"\xff" * (1024 * 1024 + 1), "headers": {"Content-Type": "image/jpeg"}},
                              "limit"),
    "unknown class": (422, {"content": jpeg(), "headers": {"Content-Type": "image/jpeg"},
                            "params": {"classes": "zebra"}}, "unknown class"),
    "score threshold out of range": (422, {"content": jpeg(), "headers": {"Content-Type": "image/jpeg"},
                                           "params": {"score_threshold": "2"}}, "score_threshold"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(BAD_UPLOADS))
def test_bad_upload_gets_its_4xx(client: Any, kind: str) -> None:
    status, request, fragment = BAD_UPLOADS[kind]
    detail = assert_refused(client.post("/v1/detect", **request), status)
    assert fragment in detail


def test_a_one_pixel_sliver_is_detected_on(client: Any) -> None:
    """A 3000 x 1 image resizes to a side of at least one pixel: detected on like any image, not refused."""
    response = client.post("/v1/detect", content=png(np.zeros((1, 3000, 3), np.uint8)),
                           headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert response.json()["images"][0]["width"] == 3000


def test_server_lives_after_bad_uploads(client: Any) -> None:
    for _, request, _ in BAD_UPLOADS.values():
        client.post("/v1/detect", **request)
    response = client.post("/v1/detect", content=jpeg(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert client.get("/v1/health").json()["status"] == "ok"


# --- load: 4 clients x 25 requests, zero errors; latency and throughput printed -----------------------------------------


def run_clients(url: str, clients: int, requests_per_client: int) -> tuple[list[float], float, list[str]]:
    """Latencies (s), wall time (s) and errors of `clients` threads each sending `requests_per_client` requests."""
    httpx = require_serve()
    body = jpeg()

    def one_client(index: int) -> tuple[list[float], list[str]]:
        latencies, errors = [], []
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(requests_per_client):
                start = time.perf_counter()
                response = http.post("/v1/detect", content=body, headers={"Content-Type": "image/jpeg"})
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200 or len(response.json()["images"]) != 1:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
        return latencies, errors

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    return [x for lat, _ in outcomes for x in lat], wall, [e for _, errs in outcomes for e in errs]


def test_load_four_clients_zero_errors(server: ServerProcess) -> None:
    run_clients(server.url, 1, 2)  # warm-up: first calls page in the model
    report = []
    for clients, per_client in ((1, 10), (4, 25)):
        latencies, wall, errors = run_clients(server.url, clients, per_client)
        assert errors == [], errors[:5]
        assert len(latencies) == clients * per_client
        p50 = statistics.median(latencies)
        p99 = float(np.percentile(latencies, 99))
        report.append(f"{clients} client(s) x {per_client}: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                      f"{len(latencies) / wall:.1f} requests/s")  # fmt: skip
    print("\nserve load (tiny model, 64x48 JPEG, CPU): " + "; ".join(report))


# --- fuzz: schemathesis on the server's own OpenAPI spec finds no 5xx ------------------------------------------------


def test_fuzz_openapi_spec_finds_no_server_error(server: ServerProcess) -> None:
    require_serve()
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis not installed (the test extra has it)")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        has_inputs = bool(list(operation.iter_parameters()) or operation.body)
        # An operation without inputs (health) has no invalid data to send.
        modes = list(schemathesis.GenerationMode) if has_inputs else [schemathesis.GenerationMode.POSITIVE]
        for mode in modes:

            @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                case.call_and_validate(base_url=server.url, checks=checks)

            fuzz()
            tried += 1
    assert tried == 4  # detect positive and negative, health and model positive


# --- API key and SIGTERM: a second server ------------------------------------------------------------------------------


def test_api_key_and_sigterm_finishes_in_flight_requests(tiny_weights: Path) -> None:
    """With the key from the environment: /v1/detect and /v1/model refuse a missing or wrong X-API-Key, health is
    open. Then SIGTERM while a request waits in the batch queue (--max-wait-ms 1500 keeps it there): that request
    still gets its result, and the process exits 0."""
    httpx = require_serve()
    server = ServerProcess(tiny_weights, "--max-wait-ms", "1500", "--max-batch-size", "8",
                           env={"CASCADE_RCNN_API_KEY": API_KEY})  # fmt: skip
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get("/v1/health").status_code == 200
            assert_refused(http.get("/v1/model"), 401)
            assert_refused(http.get("/v1/model", headers={"X-API-Key": "wrong"}), 401)
            assert_refused(http.post("/v1/detect", content=jpeg(), headers={"Content-Type": "image/jpeg"}), 401)
            assert http.get("/v1/model", headers={"X-API-Key": API_KEY}).status_code == 200

            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(http.post, "/v1/detect", content=jpeg(),
                                        headers={"Content-Type": "image/jpeg", "X-API-Key": API_KEY})  # fmt: skip
                deadline = time.monotonic() + 30
                while http.get("/v1/health").json()["queued_images"] < 1:
                    assert time.monotonic() < deadline and not in_flight.done(), "request never queued"
                    time.sleep(0.02)
                server.process.send_signal(signal.SIGTERM)
                response = in_flight.result(timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 1
        assert server.process.wait(60) == 0, server.stderr()
        server.reader.join(10)  # the rest of its stdout
        assert server.lines[-1].strip() == "stopped"
    finally:
        server.stop()


# --- an exported graph: the OpenVINO backend (fp32 here; an int8 IR is served the same way) ------------------------


def test_openvino_backend_serves_the_ir_as_openvino_detector_predicts(
    tiny_weights: Path, module_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve --backend openvino` on an exported IR runs it with `LeanDetector`, in a server where torch, torchvision
    and pycocotools cannot be imported: /v1/model names the backend and hashes the .xml with its .bin, and /v1/detect
    gives `OpenVinoDetector`'s detections of the same pixels. `--bf16` with it is one line, no server."""
    httpx = require_serve()
    pytest.importorskip("openvino", reason="openvino not installed (pip install 'cascade-rcnn[openvino]')")
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'cascade-rcnn[openvino]')")
    from cascade_rcnn.deploy.openvino import OpenVinoDetector

    xml = module_tmp / "tiny.xml"
    assert main(["export", "--format", "openvino", "--weights", str(tiny_weights), "--output", str(xml)]) == 0
    image = np.random.default_rng(5).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    expected = OpenVinoDetector(xml).predict(image)
    server = ServerProcess(xml, "--backend", "openvino", without=("torch", "torchvision", "pycocotools"))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            model = http.get("/v1/model").json()
            assert model["backend"] == "openvino" and model["classes"] == list(CLASS_NAMES)
            both = xml.read_bytes() + xml.with_suffix(".bin").read_bytes()
            assert model["weights"] == "tiny.xml" and model["weights_sha256"] == hashlib.sha256(both).hexdigest()
            response = http.post("/v1/detect", params={"score_threshold": 0.0}, content=png(image),
                                 headers={"Content-Type": "image/png"})  # fmt: skip
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    (result,) = response.json()["images"]
    assert len(result["boxes"]) == len(expected) > 0
    torch.testing.assert_close(torch.tensor(result["boxes"]), expected.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(result["scores"]), expected.scores, atol=1e-5, rtol=0)
    assert result["labels"] == expected.labels.tolist()
    assert main(["serve", "--weights", str(xml), "--backend", "openvino", "--bf16", "--port", "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--bf16 applies to the torch backend" in error and "\n" not in error


# --- queue full (503 + Retry-After), timeout (504), model failure (500, one line): in-process, fake model ------------


class GatedDetector:
    """Blocks in `predict` until `gate` is set; fails on images 13 pixels wide; records the batch sizes it ran."""

    class_names = CLASS_NAMES

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[int] = []

    def predict(self, images: list[np.ndarray], *, batch_size: int = 1) -> list[Detections]:
        self.batches.append(len(images))
        if any(image.shape[1] == 13 for image in images):
            raise RuntimeError("simulated\nmodel failure")
        self.gate.wait(30)
        empty = Detections(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long), CLASS_NAMES)
        return [empty for _ in images]


@contextmanager
def inprocess_server(detector: Any, settings: Any, masks: bool = False) -> Iterator[str]:
    """uvicorn serving `detector` in a thread of this process (no signal handlers there); yields its URL."""
    import uvicorn

    from cascade_rcnn.commands.serve import bind_socket
    from cascade_rcnn.serve.app import ModelInfo, create_app

    info = ModelInfo("test", CLASS_NAMES, masks, "torch", "cpu", "test.safetensors", "0" * 64)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(detector, info, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "in-process server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def gated_server() -> Iterator[tuple[str, GatedDetector]]:
    require_serve()
    from cascade_rcnn.serve.app import ServeSettings

    detector = GatedDetector()
    settings = ServeSettings(max_batch_size=1, max_wait_ms=0, max_queue_images=1, max_images_per_request=1,
                             timeout_s=2.0)  # fmt: skip
    try:
        with inprocess_server(detector, settings) as url:
            yield url, detector
    finally:
        detector.gate.set()


def test_full_queue_is_503_with_retry_after_and_timeout_is_504(gated_server: tuple[str, GatedDetector]) -> None:
    httpx = require_serve()
    url, detector = gated_server
    post = {"content": jpeg(), "headers": {"Content-Type": "image/jpeg"}}
    with httpx.Client(base_url=url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/v1/detect", **post)  # the model takes it, and blocks
        _wait_for(http, "running_images", 1)
        queued = pool.submit(http.post, "/v1/detect", **post)  # fills the queue (1 image)
        _wait_for(http, "queued_images", 1)

        full = http.post("/v1/detect", **post)
        assert_refused(full, 503)
        assert int(full.headers["Retry-After"]) >= 1

        # Neither gets a result within the 2 s timeout; the queued one is cancelled, and the model never runs it.
        assert_refused(running.result(), 504)
        assert_refused(queued.result(), 504)
        detector.gate.set()
        _wait_for(http, "running_images", 0)
        assert http.post("/v1/detect", **post).status_code == 200
        assert detector.batches == [1, 1]

        failed = http.post("/v1/detect", content=png(np.zeros((20, 13, 3), np.uint8)),
                           headers={"Content-Type": "image/png"})  # fmt: skip
        assert "simulated model failure" in assert_refused(failed, 500)
        assert http.post("/v1/detect", **post).status_code == 200  # the worker lives on


def test_upload_that_never_finishes_is_408(gated_server: tuple[str, GatedDetector]) -> None:
    """A client that declares 1000 bytes and sends 10 holds no worker: the request timeout (2 s here) answers it."""
    url, detector = gated_server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 1000\r\n\r\n" + jpeg()[:10])  # fmt: skip
        reply = _read_response(conn)
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "did not arrive" in reply
    assert detector.batches == []


def _read_response(conn: socket.socket) -> str:
    """One whole HTTP response from a raw socket: headers and body may arrive in separate packets."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data.decode("latin-1")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
    while len(body) < length:
        chunk = conn.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def _wait_for(http: Any, field: str, value: int) -> None:
    deadline = time.monotonic() + 10
    while http.get("/v1/health").json()[field] != value:
        assert time.monotonic() < deadline, f"health never showed {field} == {value}"
        time.sleep(0.01)


# --- mask models: each detection's mask as COCO RLE ------------------------------------------------------------------


def test_mask_model_returns_the_api_masks_as_rle_aligned_with_the_kept_detections() -> None:
    httpx = require_serve()
    from cascade_rcnn.api import Detector
    from cascade_rcnn.evaluation.rle import decode_masks
    from cascade_rcnn.serve.app import ServeSettings

    torch.manual_seed(0)
    config = tiny_config(3, class_names=CLASS_NAMES, **{"mask.heads": "single", "transform.min_size": 64,
                                                        "transform.max_size": 96, "rpn.post_nms_top_n_test": 20})  # fmt: skip
    detector = Detector(config=config)
    image = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    expected = detector.predict(image)
    assert expected.masks is not None and len(expected) > 0
    keep = expected.labels != 1  # drop the cars: their masks must go with them
    assert 0 < int(keep.sum()) < len(expected)
    with inprocess_server(detector, ServeSettings(), masks=True) as url, httpx.Client(base_url=url) as http:
        response = http.post("/v1/detect", params={"score_threshold": 0.0, "classes": "person,dog"},
                             content=png(image), headers={"Content-Type": "image/png"})  # fmt: skip
    assert response.status_code == 200, response.text
    (result,) = response.json()["images"]
    assert len(result["segmentation"]) == len(result["boxes"]) == int(keep.sum())
    assert all(rle["size"] == [48, 64] for rle in result["segmentation"])
    assert torch.equal(decode_masks(result["segmentation"], (48, 64)), expected.masks[keep])


def test_decode_image_reads_bytes_as_load_image_reads_the_file(tmp_path: Path) -> None:
    """EXIF orientation, mode conversion and the pixel limit: one decoder for uploads and files."""
    from cascade_rcnn.data.image_io import decode_image, load_image
    from cascade_rcnn.errors import ImageReadError

    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 4), dtype=np.uint8)  # RGBA: composited on white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: 30x40 becomes 40x30
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif)
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    decoded = decode_image(buffer.getvalue(), "upload")
    assert decoded.shape == (40, 30, 3)
    np.testing.assert_array_equal(decoded, load_image(tmp_path / "a.png"))
    with pytest.raises(ImageReadError, match=r"^upload: image too large"):
        decode_image(buffer.getvalue(), "upload", max_pixels=1000)
    with pytest.raises(ImageReadError, match=r"^upload: cannot read image \(UnidentifiedImageError: no format"):
        decode_image(b"not an image", "upload")


# --- without the extra ----------------------------------------------------------------------------------------------


def test_missing_extra_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(serve_package, "_importable", lambda module: module != "uvicorn")
    code = main(["serve", "--weights", str(tmp_path / "w.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: cascade-rcnn serve needs uvicorn: pip install 'cascade-rcnn[serve]'"
