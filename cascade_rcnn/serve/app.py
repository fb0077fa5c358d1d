"""The HTTP API: a FastAPI application around one detector and its `Batcher`.

    POST /v1/detect   multipart form field `image` (repeatable), or the raw image bytes as the body
                      query: score_threshold (0..1), classes (names; repeat or comma-separate)
    GET  /v1/health   liveness, and how many images are queued and running
    GET  /v1/model    preset, class names, masks or not, backend, weights file and sha256, the limits
    GET  /openapi.json, /docs

Every refusal is a JSON `{"detail": "<one line>"}` with a 4xx status: 400 malformed request (empty body, broken
multipart, no `image` field, too many images), 401 missing or wrong `X-API-Key`, 408 upload not received within the
timeout, 413 body over the upload limit, 415 content type that is not an image, 422 an image that does not decode
(not an image, truncated, over the megapixel limit: a decompression bomb is refused from its header) or a bad query
value. 503 with Retry-After: the queue is full. 504: no result within the request timeout.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cascade_rcnn.data.image_io import decode_image
from cascade_rcnn.errors import ImageReadError
from cascade_rcnn.serve.batcher import Batcher, QueueFullError

API_KEY_HEADER = "X-API-Key"
# Content types taken as image bytes, besides image/*: what clients send when they do not know the format.
_RAW_TYPES = frozenset({"", "application/octet-stream"})


@dataclass(frozen=True)
class ServeSettings:
    """What the server accepts and how it batches; `cascade-rcnn serve` fills it from its flags."""

    max_batch_size: int = 4  # images per model call, gathered across requests
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others to fill a batch
    max_queue_images: int = 32  # images waiting for the model; more is 503 with Retry-After
    max_images_per_request: int = 8
    max_upload_bytes: int = 20 * 1024 * 1024  # the whole request body
    max_megapixels: float = 40.0  # per image, checked on its header before decoding
    timeout_s: float = 30.0  # upload + queue + model, per request
    score_threshold: float = 0.3  # default for requests that give none
    api_key: str | None = None  # when set, /v1/detect and /v1/model need it in X-API-Key


@dataclass(frozen=True)
class ModelInfo:
    """What `GET /v1/model` says about the served weights."""

    preset: str
    classes: tuple[str, ...]
    masks: bool
    backend: str
    device: str
    weights: str  # the file name (never the server's folder layout)
    weights_sha256: str


# --- response schemas (they make the OpenAPI spec that clients and the fuzz test read) --------------------------------


class Error(BaseModel):
    detail: str = Field(description="why the request was refused, one line")


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE counts")


class ImageDetections(BaseModel):
    width: int = Field(description="the image's width in pixels (EXIF orientation applied)")
    height: int
    boxes: list[list[float]] = Field(description="xyxy, original-image pixels, by decreasing score")
    scores: list[float]
    labels: list[int] = Field(description="indices into the model's classes")
    names: list[str] = Field(description="class name of each detection")
    segmentation: list[RLE] | None = Field(None, description="mask models: each detection's mask, COCO RLE")


class DetectResponse(BaseModel):
    images: list[ImageDetections] = Field(description="one entry per uploaded image, in upload order")


class Health(BaseModel):
    status: str
    queued_images: int
    running_images: int


class Limits(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue_images: int
    max_images_per_request: int
    max_upload_bytes: int
    max_megapixels: float
    timeout_s: float
    score_threshold: float


class ModelResponse(BaseModel):
    preset: str
    classes: list[str]
    masks: bool
    backend: str
    device: str
    weights: str
    weights_sha256: str
    limits: Limits


_DETECT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in {
        400: "malformed request: empty body, broken multipart, no `image` field, too many images",
        401: "missing or wrong X-API-Key",
        408: "the upload did not arrive within the request timeout",
        413: "request body over the upload limit",
        415: "content type is not an image (send image/*, application/octet-stream or multipart/form-data)",
        422: "an image does not decode (not an image, truncated, over the megapixel limit) or a bad query value",
        503: "queue full (see Retry-After), or shutting down",
        504: "no result within the request timeout",
    }.items()
}
_BINARY = {"type": "string", "format": "binary"}
_DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "array", "items": _BINARY, "description": "one or more images"}},
                    "required": ["image"],
                }
            },
            "image/jpeg": {"schema": _BINARY},
            "image/png": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
        },
    }
}


def create_app(detector: Any, info: ModelInfo, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The application serving `detector` (a `Detector` or any object with its `predict` contract) with `settings`.

    The batcher's worker starts with the application (its lifespan) and, at shutdown, finishes the queued requests
    before it stops; uvicorn first waits for the in-flight requests, so a SIGTERM drops none of them.
    """
    batcher = Batcher(
        lambda images: _predict(detector, images, settings.max_batch_size),
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue_images=settings.max_queue_images,
    )
    class_index = {name.lower(): label for label, name in enumerate(info.classes)}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close, settings.timeout_s)

    app = FastAPI(
        title="cascade-rcnn",
        version=_package_version(),
        summary="Cascade R-CNN object detection over HTTP",
        lifespan=lifespan,
    )
    protected = [Depends(_api_key_check(settings.api_key))] if settings.api_key else []

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"detail": _one_line(f"{where}: {first.get('msg')}")}, status_code=422)

    @app.get("/v1/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", queued_images=batcher.queued_images, running_images=batcher.running_images)

    @app.get("/v1/model", response_model=ModelResponse, dependencies=protected,
             responses={401: _DETECT_ERRORS[401]})  # fmt: skip
    async def model() -> ModelResponse:
        fields = asdict(info)
        fields["classes"] = list(info.classes)
        limits = {k: v for k, v in asdict(settings).items() if k != "api_key"}
        return ModelResponse(**fields, limits=Limits(**limits))

    # Query() defaults, not Annotated[...]: with postponed annotations FastAPI resolves an annotation by name in the
    # module, and this description names the settings of this call.
    @app.post(
        "/v1/detect",
        response_model=DetectResponse,
        response_model_exclude_none=True,
        dependencies=protected,
        responses=_DETECT_ERRORS,
        openapi_extra=_DETECT_BODY,
        summary="Detect objects in one or more images",
    )
    async def detect(
        request: Request,
        score_threshold: float | None = Query(
            None, ge=0.0, le=1.0, description=f"keep detections scoring at least this (default {settings.score_threshold})"
        ),
        classes: list[str] | None = Query(  # noqa: B008
            None, description="class names to keep (repeat, or comma-separate); default all"
        ),
    ) -> dict[str, Any]:
        keep_labels = _labels_for(classes, class_index, info.classes)
        threshold = settings.score_threshold if score_threshold is None else score_threshold
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout_s
        try:
            uploads = await asyncio.wait_for(_read_uploads(request, settings), settings.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the upload did not arrive within {settings.timeout_s:g} s") from None
        images = await run_in_threadpool(_decode_all, uploads, settings.max_megapixels)
        try:
            future = batcher.submit(images)
        except QueueFullError as error:
            raise HTTPException(503, str(error), headers={"Retry-After": str(error.retry_after_s)}) from None
        try:
            outputs = await asyncio.wait_for(asyncio.wrap_future(future), max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            future.cancel()  # dropped from the queue if the model has not started it
            raise HTTPException(504, f"no result within the request timeout of {settings.timeout_s:g} s") from None
        except Exception as error:  # noqa: BLE001 - a model failure is the server's fault: one line, server lives on
            raise HTTPException(500, _one_line(f"the model failed: {type(error).__name__}: {error}")) from None
        results = await run_in_threadpool(_to_json, outputs, images, threshold, keep_labels, info.classes)
        return {"images": results}

    return app


# --- request reading -------------------------------------------------------------------------------------------------


async def _read_uploads(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """The request's images as (name for messages, bytes): the `image` fields of a multipart form, or the body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_form = media_type == "multipart/form-data"
    if not (is_form or media_type in _RAW_TYPES or media_type.startswith("image/")):
        raise HTTPException(
            415,
            f"content type {media_type!r} is not an image: send the image bytes as image/* or "
            "application/octet-stream, or a multipart/form-data form with field 'image'",
        )
    body = await _read_body(request, settings.max_upload_bytes)
    if not body:
        raise HTTPException(400, "empty body: send an image (raw bytes, or a multipart form field 'image')")
    if not is_form:
        return [("request body", body)]

    async def replay() -> dict[str, Any]:  # the form parser reads the body we already hold
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=settings.max_images_per_request, max_fields=settings.max_images_per_request + 8
        )
    except StarletteHTTPException as error:  # Starlette's own refusals (too many files or fields, a broken part): 400
        raise HTTPException(400, _one_line(f"malformed multipart form: {error.detail}")) from None
    except Exception as error:  # noqa: BLE001 - whatever a hostile form makes the parser raise is the form's fault
        raise HTTPException(400, _one_line(f"malformed multipart form ({type(error).__name__}: {error})")) from None
    try:
        uploads = []
        for index, value in enumerate(form.getlist("image")):
            if not isinstance(value, UploadFile):
                raise HTTPException(400, "form field 'image' must be a file (curl -F image=@photo.jpg), not text")
            part_type = (value.content_type or "").split(";")[0].strip().lower()
            name = f"image {index}" + (f" ({value.filename[:80]!r})" if value.filename else "")
            if not (part_type in _RAW_TYPES or part_type.startswith("image/")):
                raise HTTPException(415, f"{name}: content type {part_type!r} is not an image")
            uploads.append((name, await value.read()))
    finally:
        await form.close()
    if not uploads:
        fields = ", ".join(repr(key) for key in form) or "none"
        raise HTTPException(400, f"no form field 'image' (fields received: {fields[:200]})")
    if len(uploads) > settings.max_images_per_request:
        raise HTTPException(400, f"{len(uploads)} images; at most {settings.max_images_per_request} per request")
    return uploads


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (from Content-Length when the client sent it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected during the upload") from None
    return b"".join(chunks)


def _decode_all(uploads: list[tuple[str, bytes]], max_megapixels: float) -> list[np.ndarray]:
    """Decode each upload with the project's image reader (size limit on the header, EXIF, every mode to RGB)."""
    images = []
    for name, data in uploads:
        try:
            image = decode_image(data, name, max_pixels=int(max_megapixels * 1e6))
        except ImageReadError as error:
            raise HTTPException(422, _one_line(str(error))) from None
        images.append(image)
    return images


def _labels_for(classes: list[str] | None, index: dict[str, int], names: Sequence[str]) -> set[int] | None:
    """The labels that `classes` (names, case-insensitive, repeated or comma-separated) keep; None keeps all."""
    if not classes:
        return None
    wanted = [name.strip() for item in classes for name in item.split(",") if name.strip()]
    unknown = [name for name in wanted if name.lower() not in index]
    if unknown or not wanted:
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        given = ", ".join(repr(name[:40]) for name in unknown[:5]) or "(none given)"
        raise HTTPException(422, f"classes: unknown class name(s) {given}; the model's classes are: {shown}")
    return {index[name.lower()] for name in wanted}


# --- model call and results ------------------------------------------------------------------------------------------


def _predict(detector: Any, images: list[np.ndarray], batch_size: int) -> list[Any]:
    """The detector on one gathered batch; always a list (the API returns a bare result for a single input)."""
    outputs = detector.predict(images, batch_size=batch_size)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _to_json(
    outputs: Sequence[Any],
    images: Sequence[np.ndarray],
    score_threshold: float,
    keep_labels: set[int] | None,
    class_names: Sequence[str],
) -> list[dict[str, Any]]:
    """Each image's detections with score >= `score_threshold` and label in `keep_labels` (all when None), as JSON:
    xyxy boxes in original pixels, scores, labels, names, and each mask as COCO RLE for a mask model."""
    results = []
    for det, image in zip(outputs, images, strict=True):
        # numpy, whichever detector: `Detector.predict` gives CPU tensors, `LeanDetector` numpy arrays.
        scores = np.asarray(det.scores).reshape(-1)
        labels = np.asarray(det.labels).reshape(-1).astype(np.int64)
        keep = scores >= score_threshold
        if keep_labels is not None:
            keep &= np.isin(labels, sorted(keep_labels))
        kept_labels = labels[keep].tolist()
        result: dict[str, Any] = {
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "boxes": np.asarray(det.boxes).reshape(-1, 4)[keep].tolist(),
            "scores": scores[keep].tolist(),
            "labels": kept_labels,
            "names": [class_names[i] if i < len(class_names) else str(i) for i in kept_labels],
        }
        masks = getattr(det, "masks", None)
        if masks is not None:
            from cascade_rcnn.evaluation.rle import encode_masks

            result["segmentation"] = encode_masks([masks[i] for i in np.flatnonzero(keep).tolist()])
        results.append(result)
    return results


# --- helpers ---------------------------------------------------------------------------------------------------------


def _api_key_check(expected: str) -> Any:
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the key the server was started with")
    expected_bytes = expected.encode()

    def check(key: str | None = Depends(header)) -> None:
        # compare_digest: a wrong key takes as long to refuse whatever its common prefix with the right one.
        if key is None or not hmac.compare_digest(key.encode(), expected_bytes):
            raise HTTPException(401, f"missing or wrong {API_KEY_HEADER} header")

    return check


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cascade-rcnn")
    except PackageNotFoundError:
        return "0"


def weights_sha256(path: str | Path) -> str:
    """The sha256 of a weights file, read in 1 MiB blocks; of an OpenVINO IR, of its .xml followed by its .bin (the
    graph and the weights it holds)."""
    import hashlib

    files = [Path(path)]
    if files[0].suffix.lower() == ".xml":
        files.append(files[0].with_suffix(".bin"))
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as file:
            while block := file.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
