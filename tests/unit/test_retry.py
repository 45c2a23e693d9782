"""The one backoff of the loops that retry Redis (workers/retry.py): its schedule, its reset,
and that a loop waiting on it stops when its task is cancelled, even when the Redis call that
was interrupted swallowed the cancellation."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from latentsieve.workers import retry
from latentsieve.workers.retry import Backoff
from latentsieve.workers.stream_worker import StreamWorker, WorkerOptions


class Sleeper:
    """Stands in for the asyncio module inside workers/retry.py: its ``sleep`` only."""

    def __init__(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        self.sleep = sleep


def schedule(backoff: Backoff, failures: int) -> list[float]:
    """The delays of ``failures`` failed attempts in a row (``wait`` without the sleeping)."""
    delays = []
    for _ in range(failures):
        delays.append(backoff.delay_s)
        backoff.failures += 1
    return delays


def test_delays_double_from_the_first_up_to_the_cap() -> None:
    assert schedule(Backoff(first_s=0.05, cap_s=2.0), 8) == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert schedule(Backoff(first_s=0.05, cap_s=1.0), 7) == pytest.approx(
        [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    backoff = Backoff(first_s=0.25, cap_s=0.25)
    assert schedule(backoff, 3) == [0.25, 0.25, 0.25]


def test_a_success_starts_again_and_a_long_outage_stays_at_the_cap() -> None:
    backoff = Backoff(first_s=0.05, cap_s=2.0)
    schedule(backoff, 5)
    backoff.reset()
    assert backoff.delay_s == 0.05
    backoff.failures = 100_000  # days of retries: no overflow, still the cap
    assert backoff.delay_s == 2.0


@pytest.mark.parametrize(("first_s", "cap_s"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_a_schedule_that_cannot_work_is_refused(first_s: float, cap_s: float) -> None:
    with pytest.raises(ValueError, match="first_s"):
        Backoff(first_s=first_s, cap_s=cap_s)


@pytest.mark.anyio
async def test_wait_sleeps_the_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(retry, "asyncio", Sleeper(sleep))
    backoff = Backoff(first_s=0.1, cap_s=0.3)
    for _ in range(4):
        await backoff.wait(RedisConnectionError("down"))
    assert slept == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert backoff.failures == 4


class SwallowingRedisCall:
    """What redis-py can do with a cancellation that reaches it mid-command: answer with a
    connection error instead (the first time; later ones go through, so a test that fails
    can still end its task)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.swallowed = 0

    async def __call__(self) -> None:
        self.entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
            raise RedisConnectionError("Connection closed by server.") from None


@pytest.mark.anyio
async def test_a_loop_stops_on_cancellation_that_redis_swallowed() -> None:
    """A loop that only retries (no check of its own) still ends when cancelled: ``wait`` sees
    that the task was asked to stop and raises instead of sleeping."""
    call = SwallowingRedisCall()
    backoff = Backoff(first_s=0.01, cap_s=0.01)
    attempts = 0

    async def loop() -> None:
        nonlocal attempts
        while True:
            attempts += 1
            try:
                await call()
            except RedisConnectionError as exc:
                await backoff.wait(exc)

    task = asyncio.create_task(loop())
    await asyncio.wait_for(call.entered.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:  # the loop went on: end it for the next test, then fail
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert done and task.cancelled()
    assert (attempts, call.swallowed, backoff.failures) == (1, 1, 0)


@pytest.mark.anyio
async def test_a_loop_stops_when_cancelled_while_it_waits() -> None:
    backoff = Backoff(first_s=60.0, cap_s=60.0)
    waiting = asyncio.create_task(backoff.wait(RedisConnectionError("down")))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)


@pytest.mark.anyio
async def test_worker_loops_back_off_on_redis_errors_and_stop_when_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``StreamWorker._guard``: a failing loop body retries on the schedule (2 s cap), a body
    that works resets it, and cancelling the guard ends it."""
    slept: list[float] = []
    down = RedisConnectionError("down")
    results = itertools.chain([down] * 4, [None], itertools.repeat(down))
    enough = asyncio.Event()

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 11:
            enough.set()
        await asyncio.sleep(0)

    async def body() -> None:
        result = next(results)
        if result is not None:
            raise result
        await asyncio.sleep(0)

    monkeypatch.setattr(retry, "asyncio", Sleeper(sleep))
    worker = StreamWorker(WorkerOptions(store=tmp_path, redis_url="redis://127.0.0.1:1/0",
                                        device="cpu"))
    guard = asyncio.create_task(worker._guard(body))
    await asyncio.wait_for(enough.wait(), 5)
    guard.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(guard, 5)
    await worker.redis.aclose()
    assert slept[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert slept[4:11] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
