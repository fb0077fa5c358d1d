"""Batching across clients: the images of concurrent requests are gathered into one model call.

One worker thread owns the model. `Batcher.submit(images)` puts a request's images on a bounded queue and returns a
`concurrent.futures.Future` of their detections. The worker takes the oldest requests, whole, up to `max_batch_size`
images, as soon as that many are waiting or the oldest request has waited `max_wait_ms`, and runs them in one
`predict` call. PyTorch (and ONNX Runtime) release the GIL while they compute, so the event loop keeps reading and
decoding uploads meanwhile; under load the queue fills while the model runs, and the next batch leaves at once.

No HTTP here: the server maps `QueueFullError` to 503 with Retry-After, and cancels the future of a request that timed
out, which the worker then skips if it has not started it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class QueueFullError(Exception):
    """The queue cannot take the request now; `retry_after_s` estimates when it can."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Request:
    images: list[np.ndarray]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """A bounded queue of requests and the one thread that runs the model on batches of them.

    `predict(images)` runs the model on a list of (H, W, 3) uint8 RGB arrays and returns one result per image, in
    order. At most `max_queue_images` images wait at a time (a request larger than the batch still runs, alone, and
    `predict` splits it as it likes).
    """

    def __init__(
        self,
        predict: Callable[[list[np.ndarray]], Sequence[Any]],
        *,
        max_batch_size: int = 4,
        max_wait_ms: float = 5.0,
        max_queue_images: int = 32,
    ) -> None:
        if max_batch_size < 1 or max_queue_images < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue_images must be >= 1, max_wait_ms >= 0")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_images = max_queue_images
        self._queue: deque[_Request] = deque()
        self._queued_images = 0
        self._running_images = 0
        self._closed = False
        self._changed = threading.Condition()
        # Seconds per image, a running average of the model's recent batches: only for Retry-After estimates.
        self._seconds_per_image = 0.1
        self._thread = threading.Thread(target=self._work, name="cascade-rcnn-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, and stop the worker (waiting up to `timeout` seconds)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def running_images(self) -> int:
        return self._running_images

    def submit(self, images: list[np.ndarray]) -> Future:
        """Queue one request's images; the future's result is the list of their `predict` outputs, in order.

        Raises:
            QueueFullError: the queue holds too many images to take these (or the batcher is closing).
        """
        if not images:
            raise ValueError("a request needs at least one image")
        request = _Request(list(images))
        with self._changed:
            if self._closed:
                raise QueueFullError("the server is shutting down", retry_after_s=5)
            if self._queued_images + len(images) > self.max_queue_images:
                waiting = self._queued_images + self._running_images
                retry_after = max(1, math.ceil(waiting * self._seconds_per_image))
                raise QueueFullError(
                    f"server busy: {self._queued_images} images queued (limit {self.max_queue_images}); "
                    f"retry in {retry_after} s",
                    retry_after_s=retry_after,
                )
            self._queue.append(request)
            self._queued_images += len(images)
            self._changed.notify_all()
        return request.future

    def _next_batch(self) -> list[_Request] | None:
        """The oldest requests, up to `max_batch_size` images (at least one request), once the batch is full or the
        oldest has waited `max_wait_s`; None when closed and drained."""
        with self._changed:
            while not self._queue and not self._closed:
                self._changed.wait()
            if not self._queue:
                return None
            # The wait counts from the oldest request's arrival: requests that queued while the model was busy have
            # already waited, and leave at once.
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._queued_images < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            batch = [self._queue.popleft()]
            count = len(batch[0].images)
            while self._queue and count + len(self._queue[0].images) <= self.max_batch_size:
                batch.append(self._queue.popleft())
                count += len(batch[-1].images)
            self._queued_images -= count
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            # A request whose client timed out was cancelled; it is dropped here, unless the model already has it.
            live = [request for request in batch if request.future.set_running_or_notify_cancel()]
            images = [image for request in live for image in request.images]
            if not images:
                continue
            self._running_images = len(images)
            started = time.perf_counter()
            try:
                outputs = list(self.predict(images))
                if len(outputs) != len(images):
                    raise RuntimeError(f"the model returned {len(outputs)} results for {len(images)} images")
            except Exception as error:  # noqa: BLE001 - any model failure goes to its requests; the worker lives on
                for request in live:
                    request.future.set_exception(error)
            else:
                start = 0
                for request in live:
                    request.future.set_result(outputs[start : start + len(request.images)])
                    start += len(request.images)
                per_image = (time.perf_counter() - started) / len(images)
                self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * per_image
            finally:
                self._running_images = 0
