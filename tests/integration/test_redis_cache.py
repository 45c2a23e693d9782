"""``RedisCache`` against a real ``redis-server`` on loopback: roundtrip, TTL, Redis down/up;
``WriteBehindCache`` over it: writes after the answer, read-your-writes, backpressure, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from conftest import free_port, start_redis

from latentsieve.service.cache import (
    CachedScore,
    RedisCache,
    WriteBehindCache,
    _Throttled,
    cache_key,
    make_cache,
)
from latentsieve.service.settings import Settings
from latentsieve.workers.transport import ScoreSpec

pytestmark = pytest.mark.anyio

class RedisProcess:
    """One ``redis-server`` without persistence on a fixed loopback port, stopped and started
    again by the tests (``conftest.start_redis``)."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_redis(self.folder, self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="module")
def _redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(free_port(), tmp_path_factory.mktemp("redis-cache"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def key(i: int) -> str:
    return cache_key(ScoreSpec("digits-vae", "v0001", 1.5), i.to_bytes(4, "little"))


def score(i: int) -> CachedScore:
    return CachedScore(log_density=-1234.5678901234567 - i, percentile=(i % 100) / 99)


async def test_roundtrip_counts_and_stored_format(_redis_server: RedisProcess) -> None:
    cache = RedisCache(_redis_server.url, ttl_s=60)
    try:
        items = [(key(i), score(i)) for i in range(500)]
        await cache.set_many(items)
        found = await cache.get_many([key(i) for i in range(495, 505)])
        assert found == [score(i) for i in range(495, 500)] + [None] * 5
        assert (cache.hits, cache.misses, cache.errors) == (5, 5, 0)
        assert await cache.get_many([]) == []
        raw = redis.Redis(port=_redis_server.port)
        assert raw.get(key(3)) == b"[-1237.5678901234567,0.030303030303030304]"
        assert 59_000 < raw.pttl(key(3)) <= 60_000
        raw.close()
    finally:
        await cache.close()


async def test_descriptors_and_certified_bounds_roundtrip(_redis_server: RedisProcess) -> None:
    """Every entry form comes back as stored: plain, with descriptors, with a certified bound,
    and with both (a bound without descriptors keeps its place in the stored array)."""
    forms = [
        score(1),
        CachedScore(log_density=-2.5, percentile=0.25, descriptors={"psi": 1.5, "nu": 3.0}),
        CachedScore(log_density=-3.5, percentile=0.5, error_bound=0.0125),
        CachedScore(log_density=-4.5, percentile=0.75, descriptors={"delta": 0.5},
                    error_bound=0.03125),
    ]
    keys = [key(20_000 + i) for i in range(len(forms))]
    cache = RedisCache(_redis_server.url, ttl_s=60)
    try:
        await cache.set_many(list(zip(keys, forms, strict=True)))
        assert await cache.get_many(keys) == forms
        raw = redis.Redis(port=_redis_server.port)
        assert raw.get(keys[2]) == b"[-3.5,0.5,{},0.0125]"
        raw.close()
    finally:
        await cache.close()


async def test_unreadable_entry_is_a_miss(_redis_server: RedisProcess) -> None:
    raw = redis.Redis(port=_redis_server.port)
    raw.set(key(10_001), b"not json")
    raw.close()
    cache = RedisCache(_redis_server.url)
    try:
        assert await cache.get_many([key(10_001)]) == [None]
        assert (cache.hits, cache.misses) == (0, 1)
    finally:
        await cache.close()


async def test_entries_expire_after_ttl(_redis_server: RedisProcess) -> None:
    cache = RedisCache(_redis_server.url, ttl_s=1)
    try:
        await cache.set_many([(key(20_000), score(1))])
        assert await cache.get_many([key(20_000)]) == [score(1)]
        await anyio.sleep(1.2)
        assert await cache.get_many([key(20_000)]) == [None]
    finally:
        await cache.close()


async def test_redis_down_means_misses_then_recovers(
    _redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="latentsieve.service.cache")
    cache = RedisCache(_redis_server.url, ttl_s=60, retry_interval_s=0.2)
    try:
        await cache.set_many([(key(30_000), score(7))])
        assert await cache.get_many([key(30_000)]) == [score(7)]

        _redis_server.stop()
        for _ in range(3):
            started = time.monotonic()
            assert await cache.get_many([key(30_000), key(30_001)]) == [None, None]
            await cache.set_many([(key(30_002), score(2))])
            assert time.monotonic() - started < 1.0
        assert cache.errors == 6
        assert cache.misses == 6
        assert len(caplog.records) == 1  # one warning per warn interval, not one per request

        _redis_server.start()
        deadline = time.monotonic() + 5
        await cache.set_many([(key(30_003), score(3))])
        while await cache.get_many([key(30_003)]) != [score(3)]:
            assert time.monotonic() < deadline, "the cache did not reconnect to a restarted Redis"
            await anyio.sleep(0.1)
            await cache.set_many([(key(30_003), score(3))])
        errors = cache.errors
        await cache.set_many([(key(30_004), score(4))])
        assert await cache.get_many([key(30_004)]) == [score(4)]
        assert cache.errors == errors
    finally:
        _redis_server.stop()
        _redis_server.start()
        await cache.close()


async def test_unresponsive_redis_costs_one_short_timeout() -> None:
    """A peer that accepts TCP but never answers (a hung Redis) must not stall a request."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        # The gateway's own construction, with its defaults (no timeout passed here): a
        # longer default timeout would show as a stall.
        settings = Settings(store=Path("unused"), redis_url=f"redis://127.0.0.1:{port}/0")
        cache = make_cache(settings)
        assert isinstance(cache, WriteBehindCache)
        assert isinstance(cache.inner, RedisCache)
        try:
            started = time.monotonic()
            assert await cache.get_many([key(1)]) == [None]
            await cache.set_many([(key(1), score(1))])
            await cache.flush()
            assert time.monotonic() - started < 1.0
            assert cache.errors == 2
        finally:
            await cache.close()


async def test_a_failing_redis_is_tried_once_then_left_alone() -> None:
    """A peer that accepts and hangs up at once: one connection per failed call (redis-py's
    retries are off), none while the cache backs off, and every miss counted."""
    connections = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backing_off = RedisCache(f"redis://127.0.0.1:{port}/0", retry_interval_s=60)
    every_time = RedisCache(f"redis://127.0.0.1:{port}/0", retry_interval_s=0)
    try:
        assert await backing_off.get_many([key(1), key(2), key(3)]) == [None] * 3
        assert (connections, backing_off.errors, backing_off.misses) == (1, 1, 3)
        assert await backing_off.get_many([key(4), key(5)]) == [None] * 2
        await backing_off.set_many([(key(6), score(6))])
        assert (connections, backing_off.errors, backing_off.misses) == (1, 3, 5)

        for _ in range(2):
            assert await every_time.get_many([key(7), key(8)]) == [None] * 2
        assert (connections, every_time.errors, every_time.misses) == (3, 2, 4)
    finally:
        server.close()
        await backing_off.close()
        await every_time.close()


async def test_a_redis_that_never_accepts_costs_the_connect_timeout() -> None:
    """A full accept queue drops new connections (a firewalled or overloaded host): the
    connect itself must give up after the socket timeout, not redis-py's 5 s default (the
    outer deadline of 4 timeouts is only a safety net)."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(3):  # fill the queue; further SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        cache = RedisCache(f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.25)
        try:
            started = time.monotonic()
            assert await cache.get_many([key(1)]) == [None]
            assert time.monotonic() - started < 0.75
        finally:
            await cache.close()
            for filler in fillers:
                filler.close()


def test_warnings_are_throttled_and_count_what_they_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="latentsieve.service.cache")
    throttled = _Throttled(0.3)
    for attempt in range(3):
        throttled.warning("redis down", attempt=attempt)
    time.sleep(0.35)
    throttled.warning("redis down", attempt=3)
    throttled.warning("redis down", attempt=4)
    time.sleep(0.35)
    throttled.warning("redis down", attempt=5)
    records = [(r.getMessage(), r.attempt, r.suppressed) for r in caplog.records]  # type: ignore[attr-defined]
    assert records == [("redis down", 0, 0), ("redis down", 3, 2), ("redis down", 5, 1)]


async def test_write_behind_answers_before_the_write_and_reads_its_own_writes(
    _redis_server: RedisProcess,
) -> None:
    """``set_many`` returns with the write still pending; a read of pending keys waits for
    their write, so it finds them in Redis."""
    cache = WriteBehindCache(RedisCache(_redis_server.url, ttl_s=60))
    raw = redis.Redis(port=_redis_server.port)
    try:
        items = [(key(40_000 + i), score(i)) for i in range(500)]
        await cache.set_many(items)
        assert cache.pending == 500
        assert raw.get(key(40_000)) is None  # not written yet: nothing awaited the write
        found = await cache.get_many([key(40_000 + i) for i in range(495, 505)])
        assert found == [score(i) for i in range(495, 500)] + [None] * 5
        assert (cache.hits, cache.misses, cache.errors) == (5, 5, 0)
        assert raw.get(key(40_003)) == b"[-1237.5678901234567,0.030303030303030304]"
        await cache.flush()
        assert cache.pending == 0
    finally:
        raw.close()
        await cache.close()


async def test_write_behind_bounds_what_waits_and_close_writes_it(
    _redis_server: RedisProcess,
) -> None:
    """Past ``max_pending`` a write waits for earlier ones; a later write of a key wins over
    an earlier one; ``close`` finishes every pending write before it returns."""
    cache = WriteBehindCache(RedisCache(_redis_server.url, ttl_s=60), max_pending=10)
    for start in range(0, 40, 8):
        await cache.set_many([(key(50_000 + i), score(i)) for i in range(start, start + 8)])
        assert cache.pending <= 10
    for i in range(20):  # each its own write, in flight together: the last one wins
        await cache.set_many([(key(50_000), score(i)), (key(50_001 + i), score(i))])
    assert await cache.get_many([key(50_000)]) == [score(19)]
    await cache.set_many([(key(50_100), score(3))])
    await cache.close()
    assert cache.pending == 0
    raw = redis.Redis(port=_redis_server.port)
    try:
        assert raw.get(key(50_039)) is not None
        assert raw.get(key(50_100)) == b"[-1237.5678901234567,0.030303030303030304]"
    finally:
        raw.close()


async def test_write_behind_to_a_dead_redis_counts_the_error() -> None:
    """A write that fails in the background is counted like a failed write in the request,
    and a read after it misses."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        cache = WriteBehindCache(RedisCache(f"redis://127.0.0.1:{port}/0", retry_interval_s=0))
        try:
            await cache.set_many([(key(1), score(1))])
            assert (cache.pending, cache.errors) == (1, 0)
            assert await cache.get_many([key(1)]) == [None]  # after the failed write
            assert (cache.pending, cache.errors, cache.misses) == (0, 2, 1)
        finally:
            await cache.close()
        with pytest.raises(ValueError, match="max_pending"):
            WriteBehindCache(cache.inner, max_pending=0)
