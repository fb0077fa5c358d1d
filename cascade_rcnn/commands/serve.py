"""`cascade-rcnn serve`: serve a detector over HTTP (FastAPI on uvicorn; the `serve` extra).

    cascade-rcnn serve --weights model.safetensors                 # http://127.0.0.1:8000, loopback only
    curl -F image=@photo.jpg 'http://127.0.0.1:8000/v1/detect?score_threshold=0.5'

Routes, status codes and limits: `cascade_rcnn.serve.app`; batching: `cascade_rcnn.serve.batcher`. The first line on
stdout says where it listens (`--port 0` picks a free port). SIGTERM or Ctrl-C stops accepting connections, lets the
requests in flight finish (up to --timeout), then exits 0 (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cascade_rcnn.commands import add_backend_argument, add_bf16_argument, backend_device, positive_int
from cascade_rcnn.errors import ConfigError
from cascade_rcnn.serve import require_serve_dependencies

HELP = "Serve a detector over HTTP: POST /v1/detect, GET /v1/health, /v1/model, /openapi.json (cascade-rcnn[serve])."

API_KEY_ENV = "CASCADE_RCNN_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, metavar="W",
                        help="weights file (any the project reads, or an exported .onnx), or a known pretrained name")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks a free one, printed at start)")
    parser.add_argument("--device", metavar="DEVICE", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--preset", metavar="NAME", help="model preset (default: from the weights file's metadata)")
    add_backend_argument(parser)
    add_bf16_argument(parser)
    parser.add_argument("--max-batch-size", type=positive_int, metavar="N",
                        help="images per model call, gathered across concurrent requests (default: 4 on a GPU, 1 on "
                             "the CPU, where batches of full-size images run slower per image)")  # fmt: skip
    parser.add_argument("--max-wait-ms", type=_non_negative_float, default=5.0, metavar="MS",
                        help="how long a request waits for others to fill a batch (5)")  # fmt: skip
    parser.add_argument("--queue-size", type=positive_int, default=32, metavar="N",
                        help="images waiting for the model at most; beyond, 503 with Retry-After (32)")  # fmt: skip
    parser.add_argument("--max-images", type=positive_int, default=8, metavar="N", help="images per request (8)")
    parser.add_argument("--max-upload-mb", type=_positive_float, default=20.0, metavar="MB",
                        help="request body limit in MiB; beyond, 413 (20)")  # fmt: skip
    parser.add_argument("--max-megapixels", type=_positive_float, default=40.0, metavar="MP",
                        help="per-image limit, checked on the header before decoding; beyond, 422 (40)")  # fmt: skip
    parser.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S",
                        help="seconds per request for upload, queue and model; beyond, 408 or 504 (30)")  # fmt: skip
    parser.add_argument("--score-thresh", type=float, default=0.3, metavar="S",
                        help="default score threshold of requests that give no score_threshold (0.3)")  # fmt: skip
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"require this key in the X-API-Key header of /v1/detect and /v1/model (or set "
                             f"{API_KEY_ENV}, which keeps it out of the process list)")  # fmt: skip
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                        help="uvicorn's log level (info logs every request)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    require_serve_dependencies()
    import uvicorn

    from cascade_rcnn.serve.app import (
        ModelInfo,
        ServeSettings,
        create_app,
        weights_sha256,
    )

    if not 0.0 <= args.score_thresh <= 1.0:
        raise ConfigError(f"--score-thresh {args.score_thresh}: must be between 0 and 1")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and api_key is None:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use the "
              "model", file=sys.stderr)  # fmt: skip
    sock = bind_socket(args.host, args.port)  # before the model loads: a taken port fails at once
    detector, weights_path = _load(args)
    settings = ServeSettings(
        max_batch_size=args.max_batch_size or default_max_batch_size(detector),
        max_wait_ms=args.max_wait_ms,
        max_queue_images=max(args.queue_size, args.max_images),  # a request of max_images must fit in the queue
        max_images_per_request=args.max_images,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_megapixels=args.max_megapixels,
        timeout_s=args.timeout,
        score_threshold=args.score_thresh,
        api_key=api_key,
    )
    _warm_up(detector)  # the first call builds the optimised copy and pages the weights in; not a client's wait
    info = ModelInfo(
        preset=detector.preset,
        classes=tuple(detector.class_names),
        masks=bool(getattr(getattr(detector, "config", None), "has_masks", False)),
        backend=args.backend,
        device=str(detector.device),
        weights=Path(weights_path).name,
        weights_sha256=weights_sha256(weights_path),
    )
    app = create_app(detector, info, settings)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        # Uvicorn waits this long for the requests in flight after SIGTERM; each is bounded by the timeout anyway.
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
        server_header=False,
    )
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"serving {info.weights} ({info.preset}, {len(info.classes)} classes, {info.backend} on {info.device}) "
          f"at http://{shown_host}:{port} (OpenAPI: /openapi.json, docs: /docs)", flush=True)  # fmt: skip
    # Uvicorn re-raises the signal that stopped it once it has shut down gracefully; with Python's default SIGTERM
    # action that would kill the process (exit -15) after a clean shutdown. This handler makes it a normal exit.
    previous = signal.signal(signal.SIGTERM, _ignore_signal)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    print("stopped", flush=True)
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (IPv4 or IPv6, as `host` resolves); a one-line `ConfigError` when the
    address cannot be used (port taken, unknown host, not an address of this machine)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be between 0 and 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)  # connections that arrive while the model loads wait in the backlog
        except OSError:
            sock.close()
            raise
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return sock


def _load(args: argparse.Namespace) -> tuple[Any, Path]:
    """The detector and its weights file. An exported graph on its backend (.onnx on onnxruntime, .xml on openvino)
    runs in `LeanDetector` (numpy and the runtime: torch is never imported into the server, which then answers in
    about half the memory, and needs no torch installed); anything else loads as `cascade-rcnn predict` loads it."""
    if args.backend != "torch" and not args.bf16:  # --bf16: refused with the others by `load_for_backend`
        from cascade_rcnn.deploy.lean import LeanDetector, exported_graph

        graph = exported_graph(args.weights, args.backend, device=args.device, preset=args.preset)
        if graph is not None:
            return LeanDetector(graph), graph
    from cascade_rcnn.api import resolve_weights
    from cascade_rcnn.commands.predict import load_for_backend

    return load_for_backend(args, backend_device(args)), resolve_weights(args.weights)


def default_max_batch_size(detector: Any) -> int:
    """4 on a GPU; 1 on the CPU, where a batch of 4 800x1333 images ran at 0.8x the per-image speed of one by one
    (`predict.default_batch_size`'s measurement), so gathering requests would only add latency."""
    return 4 if str(getattr(detector, "device", "cpu")).startswith("cuda") else 1


def _warm_up(detector: Any) -> None:
    detector.predict(np.zeros((64, 64, 3), np.uint8))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value
