"""The dynamic batcher, driven deterministically: a fake model that waits on an event, a fake clock."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence

import pytest

from service.batcher import Batcher, Closed, DeadlineExceeded, Overloaded, Unavailable

HUGE = 1e6  # seconds: a wait or timeout that never expires unless a test says so
TEST_TIMEOUT_S = 10  # real seconds before a wait for the batcher counts as a failure


def bounded(test: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """Fail a test that has not finished after TEST_TIMEOUT_S real seconds (a broken batcher hangs)."""

    @functools.wraps(test)
    async def run() -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            await test()

    return run


class FakeTimer:
    """A callback due at ``wake_at`` on a :class:`FakeClock`."""

    def __init__(self, clock: FakeClock, wake_at: float, callback: Callable[[], None]) -> None:
        self.clock, self.wake_at, self.callback = clock, wake_at, callback

    def cancel(self) -> None:
        if self in self.clock.timers:
            self.clock.timers.remove(self)


class FakeClock:
    """Time that moves only when ``advance`` is called; timers fire when it passes their deadline."""

    def __init__(self) -> None:
        self.time = 0.0
        self.timers: list[FakeTimer] = []
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self.time

    def call_later(self, seconds: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self, self.time + seconds, callback)
        self.timers.append(timer)
        self._changed.set()
        return timer

    def advance(self, seconds: float) -> None:
        self.time += seconds
        for timer in sorted(self.timers, key=lambda timer: timer.wake_at):
            if timer.wake_at <= self.time and timer in self.timers:
                self.timers.remove(timer)
                timer.callback()

    def deadlines(self) -> list[float]:
        """When the pending timers fire, in order."""
        return sorted(timer.wake_at for timer in self.timers)

    async def until_sleeping(self, count: int) -> None:
        """Return once ``count`` timers are pending (each submit has a deadline; a filling batch, one more)."""
        async with asyncio.timeout(TEST_TIMEOUT_S):
            while len(self.timers) < count:
                self._changed.clear()
                await self._changed.wait()


class Boom(Exception):
    pass


class FakeModel:
    """Records every batch, waits for ``release``, then returns item * 10 (or raises on ``failing`` calls)."""

    def __init__(self, released: bool = False, failing: Sequence[int] = ()) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        if released:
            self.release.set()
        self.failing = set(failing)
        self._called = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        call = len(self.batches)
        self.batches.append(list(items))
        self._called.set()
        await self.release.wait()
        if call in self.failing:
            raise Boom(f"call {call}")
        return [item * 10 for item in items]

    async def until_called(self, count: int) -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            while len(self.batches) < count:
                self._called.clear()
                await self._called.wait()


class RecordingListener:
    def __init__(self) -> None:
        self.waits: list[float] = []
        self.sizes: list[int] = []

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def batch_done(self, size: int, seconds: float) -> None:
        self.sizes.append(size)


def make(
    model: FakeModel,
    clock: FakeClock,
    *,
    max_batch_size: int = 4,
    max_wait_s: float = HUGE,
    max_queue_size: int = 100,
    timeout_s: float = HUGE,
) -> Batcher[int, int]:
    batcher: Batcher[int, int] = Batcher(
        model,
        max_batch_size=max_batch_size,
        max_wait_s=max_wait_s,
        max_queue_size=max_queue_size,
        timeout_s=timeout_s,
        clock=clock,
    )
    batcher.start()
    return batcher


def submit(batcher: Batcher[int, int], *items: int) -> asyncio.Task[list[int]]:
    return asyncio.ensure_future(batcher.submit(list(items)))


@bounded
async def test_a_full_batch_runs_at_once_and_a_partial_one_waits() -> None:
    clock, model, listener = FakeClock(), FakeModel(released=True), RecordingListener()
    batcher: Batcher[int, int] = Batcher(
        model, max_batch_size=4, max_wait_s=HUGE, max_queue_size=100, timeout_s=HUGE, clock=clock, listener=listener
    )
    batcher.start()
    first = [submit(batcher, i) for i in range(3)]
    await clock.until_sleeping(4)  # three timeouts and the batch waiting to fill
    assert model.batches == []
    assert batcher.depth == 3
    last = submit(batcher, 3)
    assert await asyncio.gather(*first, last) == [[0], [10], [20], [30]]
    assert model.batches == [[0, 1, 2, 3]]
    assert clock.time == 0  # the size trigger, not time
    assert listener.sizes == [4] and listener.waits == [0, 0, 0, 0]
    await batcher.stop()


@bounded
async def test_a_batch_closes_max_wait_after_its_first_item() -> None:
    clock, model = FakeClock(), FakeModel(released=True)
    batcher = make(model, clock, max_batch_size=8, max_wait_s=0.25)
    tasks = [submit(batcher, 1), submit(batcher, 2)]
    await clock.until_sleeping(3)
    assert clock.deadlines() == [0.25, HUGE, HUGE]  # the batch wakes max_wait after its first item
    clock.advance(0.125)
    assert model.batches == []
    clock.advance(0.125)
    assert await asyncio.gather(*tasks) == [[10], [20]]
    assert model.batches == [[1, 2]]
    await batcher.stop()


@bounded
async def test_max_batch_size_one_turns_batching_off() -> None:
    clock, model = FakeClock(), FakeModel(released=True)
    batcher = make(model, clock, max_batch_size=1)
    assert await asyncio.gather(*(submit(batcher, i) for i in range(3))) == [[0], [10], [20]]
    assert model.batches == [[0], [1], [2]]
    await batcher.stop()


@bounded
async def test_requests_are_split_across_and_within_batches_in_order() -> None:
    clock, model = FakeClock(), FakeModel(released=True)
    batcher = make(model, clock, max_batch_size=3)
    five, two = submit(batcher, 0, 1, 2, 3, 4), submit(batcher, 5, 6)  # both queued before the loop runs
    assert await five == [0, 10, 20, 30, 40]
    await clock.until_sleeping(2)  # 6 waits for company: one timeout, one filling batch
    assert not two.done()
    await batcher.stop()  # drains
    assert await two == [50, 60]
    assert model.batches == [[0, 1, 2], [3, 4, 5], [6]]


@bounded
async def test_an_exception_reaches_every_caller_of_its_batch_and_no_one_else() -> None:
    clock, model = FakeClock(), FakeModel(failing=[0])
    batcher = make(model, clock, max_batch_size=2)
    failing = [submit(batcher, 1), submit(batcher, 2)]
    await model.until_called(1)
    later = [submit(batcher, 3), submit(batcher, 4)]
    await clock.until_sleeping(4)
    model.release.set()
    for task in failing:
        with pytest.raises(Boom):
            await task
    assert await asyncio.gather(*later) == [[30], [40]]
    assert model.batches == [[1, 2], [3, 4]]
    await batcher.stop()


@bounded
async def test_a_failed_part_of_a_split_request_drops_its_remaining_items() -> None:
    clock, model = FakeClock(), FakeModel(released=True, failing=[0])
    batcher = make(model, clock, max_batch_size=2)
    with pytest.raises(Boom):
        await batcher.submit([1, 2, 3])
    probe = submit(batcher, 9)
    await clock.until_sleeping(2)
    assert batcher.depth == 1  # only the probe: item 3 was dropped
    await batcher.stop()
    assert await probe == [90]
    assert model.batches == [[1, 2], [9]]


@bounded
async def test_a_cancelled_waiter_is_dropped_while_the_others_succeed() -> None:
    clock, model = FakeClock(), FakeModel()
    batcher = make(model, clock, max_batch_size=2)
    running = [submit(batcher, 1), submit(batcher, 2)]
    await model.until_called(1)
    queued = [submit(batcher, 3), submit(batcher, 4), submit(batcher, 5)]
    await clock.until_sleeping(5)
    assert batcher.depth == 3
    queued[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued[1]
    assert batcher.depth == 2
    model.release.set()
    assert await asyncio.gather(*running, queued[0], queued[2]) == [[10], [20], [30], [50]]
    assert model.batches == [[1, 2], [3, 5]]
    await batcher.stop()


@bounded
async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    clock, model = FakeClock(), FakeModel()
    batcher = make(model, clock, max_batch_size=1, max_queue_size=3)
    running = submit(batcher, 0)
    await model.until_called(1)
    queued = [submit(batcher, i) for i in (1, 2, 3)]
    await clock.until_sleeping(4)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit([4])
    assert refused.value.retry_after_s >= 1
    queued[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued[0]
    with pytest.raises(Overloaded):
        await batcher.submit([5, 6])  # 2 + 2 > 3: counted in items, not requests
    fits = submit(batcher, 7)
    model.release.set()
    assert await asyncio.gather(running, queued[1], queued[2], fits) == [[0], [20], [30], [70]]
    assert [item for batch in model.batches for item in batch] == [0, 2, 3, 7]
    await batcher.stop()


@bounded
async def test_a_request_past_its_deadline_fails_without_reaching_the_model() -> None:
    clock, model = FakeClock(), FakeModel()
    batcher = make(model, clock, max_batch_size=1, timeout_s=1.0)
    running = submit(batcher, 1)
    await model.until_called(1)
    waiting = submit(batcher, 2)
    await clock.until_sleeping(2)
    clock.advance(1.0)  # both deadlines pass: only the queued request fails
    with pytest.raises(DeadlineExceeded):
        await waiting
    assert batcher.depth == 0
    model.release.set()
    assert await running == [10]  # already running: answered
    await batcher.stop()
    assert model.batches == [[1]]


@bounded
async def test_shutdown_refuses_new_work_and_drains_queued_and_running_work() -> None:
    clock, model = FakeClock(), FakeModel()
    batcher = make(model, clock, max_batch_size=2)
    running = [submit(batcher, 1), submit(batcher, 2)]
    await model.until_called(1)
    queued = [submit(batcher, 3)]  # would wait forever for a second item
    await clock.until_sleeping(3)
    batcher.close()
    stopping = asyncio.ensure_future(batcher.stop())
    with pytest.raises(Closed):
        await batcher.submit([4])
    model.release.set()
    assert await asyncio.gather(*running, *queued) == [[10], [20], [30]]
    await stopping
    assert model.batches == [[1, 2], [3]]
    assert clock.time == 0


@bounded
async def test_a_process_returning_the_wrong_number_of_results_fails_its_batch() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: Batcher[int, int] = Batcher(short, max_batch_size=2, max_wait_s=0, max_queue_size=4, timeout_s=HUGE)
    batcher.start()
    with pytest.raises(RuntimeError, match="1 results for 2 items"):
        await batcher.submit([1, 2])
    await batcher.stop()


@bounded
async def test_the_real_clock_closes_batches_too() -> None:
    model = FakeModel(released=True)
    batcher: Batcher[int, int] = Batcher(model, max_batch_size=64, max_wait_s=0.005, max_queue_size=64, timeout_s=10)
    batcher.start()
    assert await asyncio.gather(submit(batcher, 1), submit(batcher, 2)) == [[10], [20]]
    assert model.batches == [[1, 2]]
    await batcher.stop()


@bounded
async def test_edge_cases_of_submit() -> None:
    model = FakeModel(released=True)
    batcher: Batcher[int, int] = Batcher(model, max_batch_size=2, max_wait_s=0, max_queue_size=2, timeout_s=1)
    with pytest.raises(RuntimeError, match="before start"):
        await batcher.submit([1])
    batcher.start()
    assert await batcher.submit([]) == []
    with pytest.raises(ValueError, match="can never fit"):
        await batcher.submit([1, 2, 3])
    await batcher.stop()
    assert model.batches == []


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch_size": 0},
        {"max_queue_size": 0},
        {"max_wait_s": -1.0},
        {"timeout_s": 0.0},
        {"max_wait_s": float("nan")},
    ],
)
def test_invalid_options_are_refused(options: dict[str, float]) -> None:
    values = {"max_batch_size": 1, "max_wait_s": 0.0, "max_queue_size": 1, "timeout_s": 1.0, **options}
    with pytest.raises(ValueError):
        Batcher(FakeModel(), **values)  # type: ignore[arg-type]


class FailingListener(RecordingListener):
    """A listener that raises on its first ``batch_done``: a failure of the loop while a batch is answered."""

    def batch_done(self, size: int, seconds: float) -> None:
        super().batch_done(size, seconds)
        if len(self.sizes) == 1:
            raise RuntimeError("injected loop failure")


@bounded
async def test_a_failed_loop_answers_every_request_it_held_then_restarts() -> None:
    model, listener = FakeModel(), FailingListener()
    batcher: Batcher[int, int] = Batcher(
        model, max_batch_size=2, max_wait_s=0, max_queue_size=10, timeout_s=HUGE, listener=listener,
        restart_delay_s=0.05,
    )
    batcher.start()
    running = submit(batcher, 1, 2)
    await model.until_called(1)
    queued = submit(batcher, 3)
    await asyncio.sleep(0)
    assert batcher.depth == 1 and batcher.healthy
    model.release.set()
    for task in (running, queued):  # the batch in flight and the queue: all answered
        with pytest.raises(Unavailable) as failed:
            await task
        assert failed.value.retry_after_s >= 1
    assert not batcher.healthy and batcher.depth == 0
    with pytest.raises(Unavailable, match="restarting"):
        await batcher.submit([4])
    async with asyncio.timeout(TEST_TIMEOUT_S):
        while not batcher.healthy:
            await asyncio.sleep(0.01)
    assert await batcher.submit([5, 6]) == [50, 60]
    assert model.batches == [[1, 2], [5, 6]]
    await batcher.stop()


@bounded
async def test_a_cancelled_request_leaves_the_queue_at_once_even_mid_fill() -> None:
    clock, model = FakeClock(), FakeModel(released=True)
    batcher = make(model, clock, max_batch_size=4, max_wait_s=1.0)
    first = submit(batcher, 1)
    await clock.until_sleeping(2)  # its deadline and the filling batch (due at 1.0)
    clock.advance(0.5)
    second = submit(batcher, 2, 3)
    await clock.until_sleeping(3)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert batcher.depth == 2
    await asyncio.sleep(0)
    assert 1.5 in clock.deadlines()  # the batch now waits on its new oldest item
    clock.advance(0.5)
    assert not second.done()
    clock.advance(0.5)
    assert await second == [20, 30]
    assert model.batches == [[2, 3]]
    await batcher.stop()
