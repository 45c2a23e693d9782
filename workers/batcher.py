"""Dynamic batching: concurrent requests for the same key become one compute call.

A request becomes a future in a per-key queue; one asyncio loop takes the oldest key, waits
until it holds ``max_batch_size`` rows or its oldest item has waited ``max_wait_ms``, runs
``compute(key, rows)`` once in a worker thread and hands each future its slice of the result.
Items past their deadline are dropped, not computed. Transport-agnostic: the in-process
gateway and a Redis worker feed it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, Self, TypeVar

log = logging.getLogger(__name__)


class Sliced(Protocol):
    """A typed batch along its first axis, counted and sliced (LitServe's ``unbatch``): what a
    compute call returns; ``workers.shard_scoring`` has the ones the service uses."""

    def __len__(self) -> int: ...

    def take(self, start: int, stop: int) -> Self: ...


class Rows(Sliced, Protocol):
    """A batch the batcher also concatenates (LitServe's ``batch``): what requests submit."""

    @classmethod
    def concat(cls, parts: Sequence[Self]) -> Self: ...


K = TypeVar("K", bound=Hashable)
Q = TypeVar("Q", bound=Rows)
R = TypeVar("R", bound=Sliced)


class QueueFull(Exception):
    """More rows are queued than ``queue_limit`` allows; the caller should retry later."""


@dataclass
class _Item(Generic[Q, R]):
    rows: Q
    deadline: float  # loop.time() seconds
    enqueued: float
    future: asyncio.Future[R] = field(repr=False)


def _retrieve(future: asyncio.Future[R]) -> None:
    """Mark a future's exception as seen: its caller may have timed out and gone."""
    if not future.cancelled():
        future.exception()


class DynamicBatcher(Generic[K, Q, R]):
    """Merge concurrent ``submit`` calls per key into compute calls of at most
    ``max_batch_size`` rows (one item larger than that is computed alone)."""

    def __init__(
        self,
        compute: Callable[[K, Q], R],
        max_batch_size: int,
        max_wait_ms: float,
        queue_limit: int,
        on_batch: Callable[[K, int, float], None] | None = None,
        on_queue_change: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_limit < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size, queue_limit must be >= 1 and max_wait_ms >= 0")
        self.compute = compute
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self.on_batch = on_batch
        self.on_queue_change = on_queue_change
        self._pending: dict[K, deque[_Item[Q, R]]] = {}
        self._queued_rows: dict[K, int] = {}
        self._queued = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Rows waiting to be computed, all keys together."""
        return self._queued

    def queued_by_key(self) -> dict[K, int]:
        """Rows waiting per key."""
        return dict(self._queued_rows)

    def start(self) -> None:
        """Start the collecting loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop the loop; queued items fail with CancelledError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for items in self._pending.values():
            for item in items:
                if not item.future.done():
                    item.future.cancel()
        self._pending.clear()
        self._queued_rows.clear()
        self._queued = 0
        self._queue_changed()

    async def submit(self, key: K, rows: Q, deadline: float) -> R:
        """Queue ``rows`` (n of them) and wait for compute's n result rows for them.

        ``deadline`` is in ``loop.time()`` seconds; past it this raises TimeoutError.
        Raises QueueFull when the queued rows would exceed ``queue_limit``.
        """
        count = len(rows)
        if count == 0:
            raise ValueError("submit needs at least one row")
        if self._queued + count > self.queue_limit:
            raise QueueFull(
                f"{self._queued} rows queued, {count} more would pass the limit "
                f"of {self.queue_limit}"
            )
        loop = asyncio.get_running_loop()
        item: _Item[Q, R] = _Item(rows, deadline, loop.time(), loop.create_future())
        item.future.add_done_callback(_retrieve)
        self._pending.setdefault(key, deque()).append(item)
        self._queued_rows[key] = self._queued_rows.get(key, 0) + count
        self._queued += count
        self._queue_changed()
        self._wake.set()
        async with asyncio.timeout_at(deadline):
            return await asyncio.shield(item.future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            key = min(self._pending, key=lambda k: self._pending[k][0].enqueued)
            ready_at = self._pending[key][0].enqueued + self.max_wait_s
            while self._queued_rows.get(key, 0) < self.max_batch_size:
                remaining = ready_at - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._wake.wait()
            batch = self._take(key, loop.time())
            self._queue_changed()
            if batch:
                await self._compute(key, batch)

    def _queue_changed(self) -> None:
        if self.on_queue_change is not None:
            self.on_queue_change()

    def _take(self, key: K, now: float) -> list[_Item[Q, R]]:
        """Pop up to ``max_batch_size`` rows of live items for ``key``; drop expired ones."""
        items = self._pending.get(key)
        batch: list[_Item[Q, R]] = []
        size = 0
        while items:
            item = items[0]
            count = len(item.rows)
            expired = item.deadline <= now or item.future.done()
            if not expired and batch and size + count > self.max_batch_size:
                break
            items.popleft()
            self._queued_rows[key] -= count
            self._queued -= count
            if expired:
                if not item.future.done():
                    item.future.set_exception(TimeoutError("deadline passed while queued"))
                continue
            batch.append(item)
            size += count
        if not items:
            self._pending.pop(key, None)
            self._queued_rows.pop(key, None)
        return batch

    async def _compute(self, key: K, batch: list[_Item[Q, R]]) -> None:
        rows = type(batch[0].rows).concat([item.rows for item in batch])
        try:
            started = time.perf_counter()
            result = await asyncio.to_thread(self.compute, key, rows)
            seconds = time.perf_counter() - started
            if len(result) != len(rows):
                raise RuntimeError(f"compute returned {len(result)} rows for {len(rows)}")
        except Exception as exc:
            # One failing batch fails only its own requests; the loop goes on.
            log.warning("batch compute failed", extra={"rows": len(rows), "error": repr(exc)})
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(key, len(rows), seconds)
        start = 0
        for item in batch:
            stop = start + len(item.rows)
            if not item.future.done():
                item.future.set_result(result.take(start, stop))
            start = stop
