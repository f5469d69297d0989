"""The engine thread: one `ContinuousBatcher` stepping for every connection of the server.

HTTP handlers run on the event loop and submit requests here; the engine thread steps the
batcher while any request is waiting or active and hands each token event back to its
request's asyncio queue. The model's generate lock is held while requests are in flight,
so a `generate()` call on the same model waits instead of overwriting their cache rows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..runtime.batching import (
    DEFAULT_PREFILLS_PER_STEP,
    ContinuousBatcher,
    Sampling,
    SlotRequest,
    TokenEvent,
)
from .metrics import ServingMetrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""

    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass(eq=False)
class RequestStream:
    """The event-loop side of one request: its token events, in order, ending with a finish."""

    request: SlotRequest
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def cancel(self) -> None:
        """Give up on the request (client gone): its slot is freed at the next step."""
        self.request.cancelled = True


class ServingEngine:
    """Continuous batching over a loaded model, driven by a thread of its own."""

    def __init__(
        self,
        model,
        max_queue_size: int = 256,
        metrics: ServingMetrics | None = None,
        prefills_per_step: int = DEFAULT_PREFILLS_PER_STEP,
    ):
        self.model = model
        self.batcher = ContinuousBatcher(model.runtime, prefills_per_step)
        self.max_queue_size = max_queue_size
        self.metrics = metrics or ServingMetrics()
        self._wake = threading.Condition()
        self._incoming: list[RequestStream] = []
        self._streams: dict[SlotRequest, RequestStream] = {}
        self._waiting = 0  # submitted, not yet in a slot (guarded by `_wake`)
        self._accepting = True
        self._stopping = False
        self._holds_model = False
        self._request_seconds = 1.0  # running mean from first token to finish, for Retry-After
        self._thread = threading.Thread(target=self._run, name="optimum-gemma3-engine", daemon=True)
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def batch_size(self) -> int:
        return self.model.runtime.batch_size

    def submit(self, prompt_ids: Sequence[int], sampling: Sampling) -> RequestStream:
        """Queue a request (from the event loop). Raises `QueueFull` or `ShuttingDown`."""
        stream = RequestStream(
            SlotRequest(list(prompt_ids), sampling), asyncio.Queue(), asyncio.get_running_loop()
        )
        with self._wake:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_queue_size:
                raise QueueFull(self._retry_after())
            self._waiting += 1
            self.metrics.queue_length.set(self._waiting)
            self._incoming.append(stream)
            self._wake.notify()
        return stream

    def _retry_after(self) -> int:
        """Seconds until the queue ahead has about drained into slots (at least 1)."""
        return max(1, math.ceil(self._waiting / self.batch_size * self._request_seconds))

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish for up to `timeout` seconds,
        end the rest (their streams end with finish reason "cancelled"), stop the thread
        and the model's rank processes."""
        with self._wake:
            self._accepting = False
            deadline = time.monotonic() + timeout
            while (self._incoming or not self.batcher.idle) and time.monotonic() < deadline:
                self._wake.wait(timeout=0.05)
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        self.model.runtime.close()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._incoming and self.batcher.idle and not self._stopping:
                    self._release_model()
                    self._wake.wait()
                incoming, self._incoming = self._incoming, []
                stopping = self._stopping
            events = []
            for stream in incoming:
                events += self._enqueue(stream)
            if stopping:
                events += self.batcher.fail_all()
                self._dispatch(events)
                self._release_model()
                return
            self._hold_model()
            try:
                events += self.batcher.step()
            except Exception:
                logger.exception("A decoding step failed: ending every request in flight.")
                events += self.batcher.fail_all("error")
            self._dispatch(events)

    def _enqueue(self, stream: RequestStream) -> list[TokenEvent]:
        """Hand a request to the batcher; one it refuses ends at once (the HTTP layer
        checks lengths first, so this is a safety net)."""
        self._streams[stream.request] = stream
        try:
            self.batcher.submit(stream.request)
        except ValueError:
            logger.exception("A request was refused by the runtime.")
            stream.request.finish_reason = "error"
            return [TokenEvent(stream.request, None, "error")]
        return []

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        admitted = 0
        for event in events:
            stream = self._streams[event.request]
            if stream.last_token_at is None:
                admitted += 1
                stream.first_token_at = now
                if event.token is not None:
                    self.metrics.prompt_tokens.inc(len(event.request.prompt_ids))
                    self.metrics.time_to_first_token.observe(now - stream.arrived)
            elif event.token is not None:
                self.metrics.inter_token_latency.observe(now - stream.last_token_at)
            if event.token is not None:
                self.metrics.generated_tokens.inc()
            stream.last_token_at = now
            if event.finish_reason is not None:
                del self._streams[event.request]
                seconds = now - stream.first_token_at
                self._request_seconds = 0.9 * self._request_seconds + 0.1 * seconds
            stream.loop.call_soon_threadsafe(stream.events.put_nowait, event)
        with self._wake:
            self._waiting -= admitted
            self.metrics.queue_length.set(self._waiting)
            self.metrics.active_slots.set(len(self.batcher.active))
            self._wake.notify_all()

    def _hold_model(self) -> None:
        if not self._holds_model:
            self.model._generate_lock.acquire()
            self._holds_model = True

    def _release_model(self) -> None:
        if self._holds_model:
            self.model._generate_lock.release()
            self._holds_model = False
