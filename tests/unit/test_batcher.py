"""The dynamic batcher: merging, deadlines, back-pressure and failure isolation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from latentsieve.workers.batcher import DynamicBatcher, QueueFull

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Block:
    """The smallest typed batch: an array along its first axis."""

    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def take(self, start: int, stop: int) -> Block:
        return Block(self.values[start:stop])

    @classmethod
    def concat(cls, parts: Sequence[Block]) -> Block:
        return cls(np.concatenate([part.values for part in parts]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.values

    def __mul__(self, factor: float) -> Block:
        return Block(self.values * factor)

    def __add__(self, offset: float) -> Block:
        return Block(self.values + offset)


class Recorder:
    """compute(key, rows) -> rows * 2 + key, recording every call."""

    def __init__(self, delay_s: float = 0.0, fail_key: str | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.delay_s = delay_s
        self.fail_key = fail_key
        self.release = threading.Event()
        self.release.set()

    def __call__(self, key: str, rows: Block) -> Block:
        self.release.wait(5)
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        self.calls.append((key, len(rows)))
        if key == self.fail_key:
            raise RuntimeError("boom")
        return rows * 2 + len(key)


def rows(count: int, value: float) -> Block:
    return Block(np.full((count, 3), value))


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    yield Recorder()


async def test_concurrent_submits_share_one_compute(recorder: Recorder) -> None:
    batcher: DynamicBatcher[str, Block, Block] = DynamicBatcher(recorder, 64, 50.0, 1000)
    batcher.start()
    try:
        results = await asyncio.gather(
            *(batcher.submit("a", rows(2, float(i)), deadline()) for i in range(10))
        )
    finally:
        await batcher.stop()
    assert recorder.calls == [("a", 20)]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, rows(2, float(i)) * 2 + 1)


async def test_batches_are_capped_and_keys_kept_apart() -> None:
    recorder = Recorder()
    sizes: list[tuple[str, int]] = []
    batcher: DynamicBatcher[str, Block, Block] = DynamicBatcher(
        recorder, 5, 50.0, 1000, on_batch=lambda key, size, _seconds: sizes.append((key, size))
    )
    batcher.start()
    try:
        results = await asyncio.gather(
            *(batcher.submit("a", rows(2, i), deadline()) for i in range(6)),
            *(batcher.submit("bb", rows(1, i), deadline()) for i in range(3)),
            batcher.submit("a", rows(9, 7.0), deadline()),
        )
    finally:
        await batcher.stop()
    a_sizes = [size for key, size in recorder.calls if key == "a"]
    b_sizes = [size for key, size in recorder.calls if key == "bb"]
    assert sum(a_sizes) == 21 and sum(b_sizes) == 3
    # Items are never split: 2+2 per batch under a cap of 5, the 9-row item alone.
    assert sorted(a_sizes) == [4, 4, 4, 9]
    assert b_sizes == [3]
    assert sorted(sizes) == sorted(recorder.calls)
    np.testing.assert_array_equal(results[6], rows(1, 0) * 2 + 2)
    np.testing.assert_array_equal(results[-1], rows(9, 7.0) * 2 + 1)


async def test_full_batch_does_not_wait_for_the_window() -> None:
    recorder = Recorder()
    batcher: DynamicBatcher[str, Block, Block] = DynamicBatcher(recorder, 4, 10_000.0, 1000)
    batcher.start()
    try:
        async with asyncio.timeout(2):
            await asyncio.gather(*(batcher.submit("a", rows(1, 0), deadline()) for _ in range(4)))
    finally:
        await batcher.stop()
    assert recorder.calls == [("a", 4)]


async def test_expired_items_are_dropped_not_computed() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batcher: DynamicBatcher[str, Block, Block] = DynamicBatcher(recorder, 1, 0.0, 1000)
    batcher.start()
    try:
        # The first batch blocks in compute; the second item expires while it waits.
        first = asyncio.create_task(batcher.submit("a", rows(1, 1), deadline()))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await batcher.submit("a", rows(1, 2), deadline(0.05))
        assert batcher.queued == 1
        recorder.release.set()
        await first
        third = await batcher.submit("a", rows(1, 3), deadline())
    finally:
        await batcher.stop()
    assert recorder.calls == [("a", 1), ("a", 1)]
    np.testing.assert_array_equal(third, rows(1, 3) * 2 + 1)
    assert batcher.queued == 0


async def test_queue_full_refuses_without_queueing() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batcher: DynamicBatcher[str, Block, Block] = DynamicBatcher(recorder, 100, 200.0, 5)
    batcher.start()
    try:
        waiting = asyncio.create_task(batcher.submit("a", rows(4, 1), deadline()))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await batcher.submit("a", rows(2, 1), deadline())
        with pytest.raises(QueueFull):
            await batcher.submit("b", rows(6, 1), deadline())
        assert batcher.queued == 4
        assert batcher.queued_by_key() == {"a": 4}
        small = asyncio.create_task(batcher.submit("a", rows(1, 1), deadline()))
        recorder.release.set()
        await asyncio.gather(waiting, small)
    finally:
        await batcher.stop()
    assert recorder.calls == [("a", 5)]


async def test_compute_error_fails_only_its_batch() -> None:
    recorder = Recorder(fail_key="bad")
    batcher: DynamicBatcher[str, Block, Block] = DynamicBatcher(recorder, 64, 20.0, 1000)
    batcher.start()
    try:
        outcomes = await asyncio.gather(
            batcher.submit("bad", rows(1, 1), deadline()),
            batcher.submit("bad", rows(2, 1), deadline()),
            batcher.submit("ok", rows(1, 1), deadline()),
            return_exceptions=True,
        )
        after = await batcher.submit("bad2", rows(1, 5), deadline())
    finally:
        await batcher.stop()
    assert isinstance(outcomes[0], RuntimeError) and isinstance(outcomes[1], RuntimeError)
    assert isinstance(outcomes[2], Block)
    np.testing.assert_array_equal(after, rows(1, 5) * 2 + 4)
    assert ("bad", 3) in recorder.calls


async def test_wrong_result_length_is_an_error() -> None:
    batcher: DynamicBatcher[str, Block, Block] = DynamicBatcher(
        lambda key, r: r.take(0, 1), 64, 0.0, 1000
    )
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="compute returned 1 rows for 2"):
            await batcher.submit("a", rows(2, 1), deadline())
        assert len(await batcher.submit("a", rows(1, 1), deadline())) == 1
    finally:
        await batcher.stop()


async def test_stop_cancels_waiting_items() -> None:
    batcher: DynamicBatcher[str, Block, Block] = DynamicBatcher(Recorder(), 64, 60_000.0, 1000)
    batcher.start()
    waiting = asyncio.create_task(batcher.submit("a", rows(1, 1), deadline(60)))
    await asyncio.sleep(0.01)
    await batcher.stop()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert batcher.queued == 0


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), 0, 1.0, 10)


async def test_every_model_batcher_reports_queue_changes() -> None:
    """``ModelBatchers`` hands its callbacks to each model's batcher: with ``serve --workers N``
    the shared queue-depth gauge is written from ``on_queue_change``."""
    from latentsieve.workers.local_compute import ModelBatchers
    from latentsieve.workers.transport import QueueLimits

    changed: list[int] = []
    batchers = ModelBatchers(8, 1.0, QueueLimits(100, 50),
                             on_queue_change=lambda: changed.append(1))
    try:
        for model in ("a", "b"):
            batcher = batchers.of(model)
            assert batcher.on_queue_change is batchers.on_queue_change
            assert batcher.queue_limit == 50
        assert set(batchers.queued_by_model()) == {"a", "b"}
    finally:
        await batchers.stop()
