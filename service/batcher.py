"""A generic asyncio dynamic batcher: many callers' items, one ``process`` call per batch.

Callers :meth:`Batcher.submit` a request of one or more opaque items and await its
results. One loop per batcher takes queued items in arrival order into batches of at
most ``max_batch_size`` items, closing a batch as soon as it is full or ``max_wait_s``
after its first item arrived, and awaits ``process`` on each batch, one at a time.
A request's items may be split across and within batches; its caller gets all its
results, in its order, once the last one is back.

- Admission is bounded in items: a request that does not fit in ``max_queue_size``
  queued items is refused at once with :class:`Overloaded` (and a Retry-After
  estimate); once :meth:`Batcher.close` is called, new requests get :class:`Closed`
  while what is queued still runs (draining).
- A request none of whose items has reached a batch after ``timeout_s`` fails with
  :class:`DeadlineExceeded` and never reaches ``process``.
- A caller that goes away (its task is cancelled) has its queued items dropped
  before their batch runs.
- An exception from ``process`` reaches the callers of that batch and no one else.

No torch and no model here: items and results are opaque, and time comes from an
injected :class:`Clock`, so tests drive the batcher deterministically.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BATCH_SECONDS_SMOOTHING = 0.2  # weight of the latest batch in the running mean of batch durations


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


class Clock(Protocol):
    """Monotonic time in seconds and a way to wait for it."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class BatchListener(Protocol):
    """Receives what a batcher observes (for metrics)."""

    def queue_wait(self, seconds: float) -> None:
        """A request's first item reached a batch ``seconds`` after it was queued."""

    def batch_done(self, size: int, seconds: float) -> None:
        """A batch of ``size`` items went through ``process`` in ``seconds``."""


@dataclass(eq=False)
class _Request(Generic[T, R]):
    """One caller's items, its future and how far its items have got."""

    items: Sequence[T]
    future: asyncio.Future[list[R]]
    queued_at: float
    deadline: float
    results: list[Any] = field(default_factory=list)
    taken: int = 0  # items handed to a batch so far (they leave the queue in order)
    finished: int = 0  # results back so far
    discarded: bool = False  # its queued items no longer count (answered, failed or abandoned)

    @property
    def queued(self) -> int:
        return len(self.items) - self.taken


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
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1:
            raise ValueError(f"max_batch_size and max_queue_size must be >= 1, got {max_batch_size}, {max_queue_size}")
        if not (max_wait_s >= 0 and timeout_s > 0):
            raise ValueError(f"need max_wait_s >= 0 and timeout_s > 0, got {max_wait_s}, {timeout_s}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.timeout_s = timeout_s
        self._process = process
        self._clock = clock or MonotonicClock()
        self._listener = listener
        self._queue: deque[_Request[T, R]] = deque()
        self._depth = 0  # queued items of live requests
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._batch_seconds = 0.0  # running mean of batch durations, for Retry-After

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._depth

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-loop")

    def close(self) -> None:
        """Stop admitting requests; what is queued runs at once, without waiting to fill batches."""
        self._closed = True
        self._wakeup.set()

    async def stop(self) -> None:
        """Close, then wait until every queued and running request is answered."""
        self.close()
        if self._task is not None:
            await self._task

    def retry_after_s(self) -> int:
        """Whole seconds until the current queue is likely to have drained (at least 1)."""
        batches = math.ceil(self._depth / self.max_batch_size)
        return max(1, math.ceil(batches * (self._batch_seconds + self.max_wait_s)))

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Queue ``items`` as one request and return their results, in order."""
        if self._closed:
            raise Closed(f"{self.name}: shutting down, not accepting new work")
        if self._task is None:
            raise RuntimeError(f"{self.name}: submit before start")
        if not items:
            return []
        if len(items) > self.max_queue_size:
            raise ValueError(f"{self.name}: {len(items)} items can never fit a queue of {self.max_queue_size}")
        if self._depth + len(items) > self.max_queue_size:
            raise Overloaded(
                f"{self.name}: queue full ({self._depth} of {self.max_queue_size} items waiting)", self.retry_after_s()
            )
        now = self._clock.now()
        request: _Request[T, R] = _Request(
            items, asyncio.get_running_loop().create_future(), now, now + self.timeout_s, [None] * len(items)
        )
        request.future.add_done_callback(lambda _: self._discard(request))
        self._queue.append(request)
        self._depth += len(items)
        self._wakeup.set()
        timer = asyncio.ensure_future(self._clock.sleep(self.timeout_s))
        try:
            await asyncio.wait((request.future, timer), return_when=asyncio.FIRST_COMPLETED)
            if not request.future.done() and request.taken == 0:
                request.future.set_exception(
                    DeadlineExceeded(f"{self.name}: waited {self.timeout_s:g} s in the queue without being run")
                )
            return await request.future  # a request already (partly) running is answered
        finally:
            timer.cancel()
            request.future.cancel()  # no-op once answered; drops the queued items of a caller that went away

    def _discard(self, request: _Request[T, R]) -> None:
        """Stop counting a request's queued items (idempotent); the loop skips it."""
        if not request.discarded:
            request.discarded = True
            self._depth -= request.queued

    async def _run(self) -> None:
        while True:
            if self._depth == 0:
                self._queue.clear()  # only discarded requests can be left
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill(self._queue[0].queued_at + self.max_wait_s)
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _fill(self, close_at: float) -> None:
        """Wait until a batch is full, the batcher closes, or the clock reaches ``close_at``."""
        while self._depth < self.max_batch_size and not self._closed:
            remaining = close_at - self._clock.now()
            if remaining <= 0:
                return
            self._wakeup.clear()
            woken = asyncio.ensure_future(self._wakeup.wait())
            timer = asyncio.ensure_future(self._clock.sleep(remaining))
            try:
                await asyncio.wait((woken, timer), return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
                timer.cancel()

    def _take(self) -> list[tuple[_Request[T, R], int]]:
        """Up to max_batch_size (request, item index) pairs from the head of the queue."""
        batch: list[tuple[_Request[T, R], int]] = []
        now = self._clock.now()
        while self._queue and len(batch) < self.max_batch_size:
            request = self._queue[0]
            if request.future.done() or request.discarded:
                self._discard(request)
                self._queue.popleft()
                continue
            if request.taken == 0 and now >= request.deadline:
                request.future.set_exception(
                    DeadlineExceeded(f"{self.name}: waited {self.timeout_s:g} s in the queue without being run")
                )
                self._discard(request)
                self._queue.popleft()
                continue
            if request.taken == 0 and self._listener is not None:
                self._listener.queue_wait(now - request.queued_at)
            count = min(request.queued, self.max_batch_size - len(batch))
            batch.extend((request, index) for index in range(request.taken, request.taken + count))
            request.taken += count
            self._depth -= count
            if request.queued == 0:
                self._queue.popleft()
        return batch

    async def _execute(self, batch: list[tuple[_Request[T, R], int]]) -> None:
        """One ``process`` call; results to their requests, or its exception to this batch's requests."""
        started = self._clock.now()
        try:
            results = await self._process([request.items[index] for request, index in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: process returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # whatever it is, it belongs to this batch's callers
            for request in dict.fromkeys(request for request, _ in batch):
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        finally:
            seconds = self._clock.now() - started
            self._batch_seconds += BATCH_SECONDS_SMOOTHING * (seconds - self._batch_seconds)
            if self._listener is not None:
                self._listener.batch_done(len(batch), seconds)
        for (request, index), result in zip(batch, results):
            if request.future.done():
                continue
            request.results[index] = result
            request.finished += 1
            if request.finished == len(request.items):
                request.future.set_result(request.results)
