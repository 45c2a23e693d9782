"""``MemoryCache``: byte-bounded LRU, hit/miss counters, TTL, and ``make_cache`` selection."""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import pytest

from latentsieve.service.cache import (
    DESCRIPTOR_DICT_BYTES,
    DESCRIPTOR_VALUE_BYTES,
    CachedScore,
    MemoryCache,
    RedisCache,
    WriteBehindCache,
    make_cache,
)

pytestmark = pytest.mark.anyio


def key(i: int) -> str:
    return f"ls:v1:{i:064x}"


def score(i: int) -> CachedScore:
    return CachedScore(log_density=-float(i) - 0.125, percentile=i / 100)


ENTRY = MemoryCache.entry_bytes(key(0))


async def test_roundtrip_and_counters() -> None:
    cache = MemoryCache(100 * ENTRY)
    await cache.set_many([(key(i), score(i)) for i in range(3)])
    found = await cache.get_many([key(0), key(9), key(2), key(8)])
    assert found == [score(0), None, score(2), None]
    assert (cache.hits, cache.misses, cache.errors) == (2, 2, 0)
    assert await cache.get_many([]) == []
    assert (cache.hits, cache.misses) == (2, 2)


async def test_returned_scores_are_copies() -> None:
    cache = MemoryCache(10 * ENTRY)
    await cache.set_many([(key(1), score(1))])
    first = await cache.get_many([key(1)])
    assert first[0] is not None
    first[0]["log_density"] = 0.0
    assert await cache.get_many([key(1)]) == [score(1)]


async def test_evicts_least_recently_used_by_bytes() -> None:
    cache = MemoryCache(3 * ENTRY)
    await cache.set_many([(key(i), score(i)) for i in range(3)])
    assert len(cache) == 3 and cache.size_bytes == 3 * ENTRY
    await cache.get_many([key(0)])  # key 0 is now the most recently used
    await cache.set_many([(key(3), score(3))])
    assert cache.size_bytes <= cache.max_bytes
    assert await cache.get_many([key(1)]) == [None]
    assert await cache.get_many([key(0), key(2), key(3)]) == [score(0), score(2), score(3)]
    assert cache.evictions == 1


async def test_bound_counts_key_length() -> None:
    cache = MemoryCache(10 * ENTRY)
    long_key = "ls:v1:" + "x" * (4 * ENTRY)
    await cache.set_many([(key(i), score(i)) for i in range(10)])
    await cache.set_many([(long_key, score(99))])
    assert cache.size_bytes <= cache.max_bytes
    assert len(cache) == 10 - 5 + 1  # the long key displaced five ordinary entries
    assert await cache.get_many([long_key]) == [score(99)]


async def test_overwrite_does_not_double_count() -> None:
    cache = MemoryCache(10 * ENTRY)
    for _ in range(5):
        await cache.set_many([(key(1), score(2))])
    assert cache.size_bytes == ENTRY and len(cache) == 1
    assert await cache.get_many([key(1)]) == [score(2)]


async def test_zero_bytes_disables_and_oversized_entries_are_skipped() -> None:
    disabled = MemoryCache(0)
    await disabled.set_many([(key(1), score(1))])
    assert await disabled.get_many([key(1)]) == [None]
    small = MemoryCache(ENTRY - 1)
    await small.set_many([(key(1), score(1))])
    assert len(small) == 0 and small.size_bytes == 0


async def test_ttl_expiry() -> None:
    cache = MemoryCache(10 * ENTRY, ttl_s=0.05)
    await cache.set_many([(key(1), score(1))])
    assert await cache.get_many([key(1)]) == [score(1)]
    time.sleep(0.06)
    assert await cache.get_many([key(1)]) == [None]
    assert cache.size_bytes == 0
    with pytest.raises(ValueError, match="ttl"):
        MemoryCache(10, ttl_s=0)


async def test_concurrent_tasks_keep_the_bound() -> None:
    cache = MemoryCache(50 * ENTRY)

    async def writer(offset: int) -> None:
        for i in range(200):
            await cache.set_many([(key(offset + i), score(i))])
            await cache.get_many([key(offset + i - 1)])

    async with anyio.create_task_group() as group:
        for offset in range(0, 8000, 1000):
            group.start_soon(writer, offset)
    assert len(cache) == 50 and cache.size_bytes == 50 * ENTRY
    assert cache.hits + cache.misses == 8 * 200


@dataclass
class _Settings:
    redis_url: str | None
    cache_bytes: int = 1 << 20
    cache_ttl_s: float = 60.0


async def test_make_cache_picks_the_backend() -> None:
    memory = make_cache(_Settings(redis_url=None))
    assert isinstance(memory, MemoryCache) and memory.max_bytes == 1 << 20
    assert memory.ttl_s == 60.0
    redis = make_cache(_Settings(redis_url="redis://127.0.0.1:1/0", cache_ttl_s=0))
    assert isinstance(redis, WriteBehindCache)  # Redis writes wait for no answer
    assert isinstance(redis.inner, RedisCache) and redis.inner.ttl_ms is None
    await redis.close()
    await memory.close()


def described(i: int) -> CachedScore:
    """A score with its three descriptors, as a descriptor request caches it."""
    found = score(i)
    found["descriptors"] = {"psi": 0.5 + i, "nu": 3.0, "delta": 0.25}
    return found


async def test_descriptor_values_are_counted_and_freed() -> None:
    cost = MemoryCache.entry_bytes(key(0), described(0))
    assert cost == ENTRY + DESCRIPTOR_DICT_BYTES + 3 * DESCRIPTOR_VALUE_BYTES
    cache = MemoryCache(100 * ENTRY)
    await cache.set_many([(key(i), described(i)) for i in range(4)])
    assert cache.size_bytes == 4 * cost
    await cache.set_many([(key(0), score(0))])  # replaced by a plain entry: its values freed
    assert cache.size_bytes == 3 * cost + ENTRY
    tight = MemoryCache(2 * cost)
    await tight.set_many([(key(i), described(i)) for i in range(5)])
    assert len(tight) == 2 and tight.size_bytes == 2 * cost  # evictions free what they cost


async def test_an_oversized_entry_is_skipped_and_the_rest_are_cached() -> None:
    cache = MemoryCache(ENTRY)  # room for exactly one plain entry, not a described one
    await cache.set_many([(key(1), described(1)), (key(2), score(2))])
    assert await cache.get_many([key(1), key(2)]) == [None, score(2)]
    assert cache.size_bytes == ENTRY


async def test_returned_descriptors_are_copies() -> None:
    cache = MemoryCache(10 * ENTRY)
    await cache.set_many([(key(1), described(1))])
    (first,) = await cache.get_many([key(1)])
    assert first is not None
    first["descriptors"]["psi"] = -1.0
    assert await cache.get_many([key(1)]) == [described(1)]


@pytest.mark.parametrize("descriptors", [0, 1, 3])
async def test_entry_bytes_is_what_an_entry_holds(descriptors: int) -> None:
    """``entry_bytes`` within 15% of the heap an entry really holds (tracemalloc: the key
    string, the cache's slot, tuple and private copy), plain and with descriptors."""
    import tracemalloc

    names = ("psi", "nu", "delta")[:descriptors]

    def entry(i: int) -> CachedScore:
        found = score(i)
        if names:
            found["descriptors"] = {**{n: 0.5 + i for n in names},
                                    **{f"{n}_percentile": 0.25 for n in names}}
        return found

    count = 5_000
    cache = MemoryCache(1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        items = [(key(i), entry(i)) for i in range(count)]
        await cache.set_many(items)
        del items  # the caller's score dicts; the cache keeps the keys and its copies
        held = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    counted = MemoryCache.entry_bytes(key(0), entry(0))
    assert 0.85 <= held / counted <= 1.15, (held, counted)


async def test_write_behind_logs_a_failing_write_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A back end that breaks the never-raise rule: the failure is logged, the entries are no
    longer pending, and later writes still land."""

    class Broken(MemoryCache):
        fail = True

        async def set_many(self, items: list[tuple[str, CachedScore]]) -> None:
            if self.fail:
                raise RuntimeError("disk on fire")
            await super().set_many(items)

    inner = Broken(100 * ENTRY)
    cache = WriteBehindCache(inner)
    await cache.set_many([(key(1), score(1))])
    assert await cache.get_many([key(1)]) == [None]  # waited for the failed write
    assert cache.pending == 0
    assert any("score cache write failed" in r.getMessage() for r in caplog.records)
    inner.fail = False
    await cache.set_many([(key(2), score(2))])
    assert await cache.get_many([key(2)]) == [score(2)]
    await cache.close()
