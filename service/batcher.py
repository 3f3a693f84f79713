"""A generic asyncio dynamic batcher: many callers' items, one ``process`` call per batch.

Callers :meth:`Batcher.submit` a request of one or more opaque items and await one
future for all its results. The queue holds one entry per waiting item, in arrival
order, and its length is the queue depth. One loop per batcher takes up to
``max_batch_size`` entries into a batch as soon as that many wait or ``max_wait_s``
after the oldest arrived, and awaits ``process`` on each batch, one at a time. A
request's items may be split across and within batches; its future is resolved, with
all its results in its order, once the last one is back.

- Admission is bounded in items: a request that does not fit in ``max_queue_size``
  queued items is refused at once with :class:`Overloaded` (and a Retry-After
  estimate); once :meth:`Batcher.close` is called, new requests get :class:`Closed`
  while what is queued still runs (draining).
- Each request has a deadline, a timer on the clock: if none of its items has reached a
  batch ``timeout_s`` after it was queued, it fails with :class:`DeadlineExceeded` and
  never reaches ``process``.
- A caller that goes away cancels its future (a plain ``Task.cancel`` of the awaiting
  task does): its queued items leave the queue at once.
- An exception from ``process`` reaches the callers of that batch and no one else;
  their items still queued leave the queue.
- The loop task is supervised: should it fail, every request queued or in the running
  batch fails with :class:`Unavailable`, :attr:`Batcher.healthy` is false and new
  requests are refused with :class:`Unavailable` until the loop restarts
  ``restart_delay_s`` later.

No torch and no model here: items and results are opaque, and time comes from an
injected :class:`Clock`, so tests drive the batcher deterministically.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BATCH_SECONDS_SMOOTHING = 0.2  # weight of the latest batch in the running mean of batch durations
RESTART_DELAY_S = 1.0  # between a failed loop and its restart (readiness is 503 meanwhile)
log = logging.getLogger("service.batcher")


class BatcherError(Exception):
    """A request the batcher did not run."""


class Overloaded(BatcherError):
    """The queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(BatcherError):
    """The request waited in the queue past its deadline."""


class Closed(BatcherError):
    """The batcher is shutting down and admits no new work."""


class Unavailable(BatcherError):
    """The batching loop failed; it restarts on its own, retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time in seconds, and callbacks at a later time."""

    def now(self) -> float: ...

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer: ...


class MonotonicClock:
    """The real clock: the event loop's (monotonic) time and timers."""

    def now(self) -> float:
        return time.monotonic()

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(seconds, callback)


class BatchListener(Protocol):
    """Receives what a batcher observes (for metrics)."""

    def queue_wait(self, seconds: float) -> None:
        """A request's first item reached a batch ``seconds`` after it was queued."""

    def batch_done(self, size: int, seconds: float) -> None:
        """A batch of ``size`` items went through ``process`` in ``seconds``."""


@dataclass(eq=False)
class _Request(Generic[T, R]):
    """One caller's items, the future of all their results, and its deadline timer."""

    items: Sequence[T]
    future: asyncio.Future[list[R]]
    queued_at: float
    results: list[Any]
    started: bool = False  # an item has reached a batch: the deadline no longer applies
    left: int = 0  # results still to come
    deadline: Timer | None = field(default=None, repr=False)


class Batcher(Generic[T, R]):
    """Batches items of concurrent requests into calls of ``process`` (see the module docstring)."""

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        timeout_s: float,
        clock: Clock | None = None,
        listener: BatchListener | None = None,
        name: str = "batcher",
        restart_delay_s: float = RESTART_DELAY_S,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1:
            raise ValueError(f"max_batch_size and max_queue_size must be >= 1, got {max_batch_size}, {max_queue_size}")
        if not (max_wait_s >= 0 and timeout_s > 0 and restart_delay_s >= 0):
            raise ValueError(
                f"need max_wait_s >= 0, timeout_s > 0 and restart_delay_s >= 0, got {max_wait_s}, {timeout_s},"
                f" {restart_delay_s}"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.timeout_s = timeout_s
        self.restart_delay_s = restart_delay_s
        self._process = process
        self._clock = clock or MonotonicClock()
        self._listener = listener
        self._queue: deque[tuple[_Request[T, R], int]] = deque()  # (request, item index), one per waiting item
        self._running: list[_Request[T, R]] = []  # the requests of the batch in ``process``
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._batch_seconds = 0.0  # running mean of batch durations, for Retry-After

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def healthy(self) -> bool:
        """The loop runs (false from a failure of the loop until its restart)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._started = True
            self._launch()

    def _launch(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-loop")
        self._task.add_done_callback(self._supervise)

    def close(self) -> None:
        """Stop admitting requests; what is queued runs at once, without waiting to fill batches."""
        self._closed = True
        self._wakeup.set()

    async def stop(self) -> None:
        """Close, then wait until every queued and running request is answered."""
        self.close()
        while self._task is not None and not self._task.done():
            await asyncio.wait((self._task,))

    def retry_after_s(self) -> int:
        """Whole seconds until the current queue is likely to have drained (at least 1)."""
        batches = math.ceil(len(self._queue) / self.max_batch_size)
        return max(1, math.ceil(batches * (self._batch_seconds + self.max_wait_s)))

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` as one request and return their results, in order."""
        if self._closed:
            raise Closed(f"{self.name}: shutting down, not accepting new work")
        if not self._started:
            raise RuntimeError(f"{self.name}: submit before start")
        if not self.healthy:
            raise Unavailable(f"{self.name}: the batching loop failed and is restarting", self._restart_after_s())
        if not items:
            return []
        if len(items) > self.max_queue_size:
            raise ValueError(f"{self.name}: {len(items)} items can never fit a queue of {self.max_queue_size}")
        if len(self._queue) + len(items) > self.max_queue_size:
            raise Overloaded(
                f"{self.name}: queue full ({len(self._queue)} of {self.max_queue_size} items waiting)",
                self.retry_after_s(),
            )
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        request: _Request[T, R] = _Request(items, future, self._clock.now(), [None] * len(items), left=len(items))
        request.deadline = self._clock.call_later(self.timeout_s, lambda: self._expire(request))
        future.add_done_callback(lambda _: self._forget(request))
        self._queue.extend((request, index) for index in range(len(items)))
        self._wakeup.set()
        return await future  # cancelling the caller cancels the future: _forget drops its queued items

    def _restart_after_s(self) -> int:
        return max(1, math.ceil(self.restart_delay_s))

    def _expire(self, request: _Request[T, R]) -> None:
        """The deadline timer: fail a request none of whose items has reached a batch."""
        if not request.started and not request.future.done():
            request.future.set_exception(
                DeadlineExceeded(f"{self.name}: waited {self.timeout_s:g} s in the queue without being run")
            )

    def _forget(self, request: _Request[T, R]) -> None:
        """A request is answered, failed or cancelled: its timer stops and its queued items leave the queue."""
        if request.deadline is not None:
            request.deadline.cancel()
        if request.left and any(queued is request for queued, _ in self._queue):
            self._queue = deque(entry for entry in self._queue if entry[0] is not request)
            self._wakeup.set()  # a filling batch may have lost its oldest item

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """The loop task ended: after a failure, answer everyone it held and restart it after a delay."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("%s: batching loop failed; restarting in %g s", self.name, self.restart_delay_s,
                  exc_info=task.exception())
        failure = Unavailable(f"{self.name}: the batching loop failed; retry shortly", self._restart_after_s())
        for request in dict.fromkeys([*self._running, *(request for request, _ in self._queue)]):
            if not request.future.done():
                request.future.set_exception(failure)
        self._running, self._queue = [], deque()
        self._clock.call_later(self.restart_delay_s, self._launch)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill()
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _fill(self) -> None:
        """Wait until a batch is full, the batcher closes, or ``max_wait_s`` has passed since the oldest item came."""
        while self._queue and len(self._queue) < self.max_batch_size and not self._closed:
            remaining = self._queue[0][0].queued_at + self.max_wait_s - self._clock.now()
            if remaining <= 0:
                return
            self._wakeup.clear()
            timer = self._clock.call_later(remaining, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()

    def _take(self) -> list[tuple[_Request[T, R], int]]:
        """Up to max_batch_size (request, item index) pairs from the head of the queue."""
        now = self._clock.now()
        batch = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
        for request in dict.fromkeys(request for request, _ in batch):
            if not request.started:
                request.started = True
                if self._listener is not None:
                    self._listener.queue_wait(now - request.queued_at)
        return batch

    async def _execute(self, batch: list[tuple[_Request[T, R], int]]) -> None:
        """One ``process`` call; results to their requests, or its exception to this batch's requests.

        ``_running`` names the batch's requests until they are answered, so that a failure
        of the loop itself (here or in the listener) reaches them (:meth:`_supervise`).
        """
        requests = list(dict.fromkeys(request for request, _ in batch))
        self._running = requests
        started = self._clock.now()
        try:
            results = await self._process([request.items[index] for request, index in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: process returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # whatever it is, it belongs to this batch's callers
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(exc)
            results = []
        finally:
            seconds = self._clock.now() - started
            self._batch_seconds += BATCH_SECONDS_SMOOTHING * (seconds - self._batch_seconds)
            if self._listener is not None:
                self._listener.batch_done(len(batch), seconds)
        for (request, index), result in zip(batch, results):
            if request.future.done():
                continue
            request.results[index] = result
            request.left -= 1
            if request.left == 0:
                request.future.set_result(request.results)
        self._running = []
