"""The in-process score cache: the shipped hand-written ``MemoryCache`` (an ``OrderedDict`` LRU,
service/cache.py) against the same class on cachetools' ``TTLCache``/``LRUCache``
(``CachetoolsMemoryCache`` below: same behaviour, passes tests/unit/test_memory_cache.py), in
one process. The numbers decided to keep the hand-written one (issue 20; docs/performance.md).

    python benchmarks/bench_cache.py            # the cache section of docs/performance.md
    python benchmarks/bench_cache.py --quick    # fewer rounds, same table, page untouched

Workload: the gateway's calls, ``get_many``/``set_many`` of 500 keys (``"ls:v1:" + 64 hex``,
plain two-float scores), on a cache sized like the service's default (64 MiB, ttl 3600 s) and
on one without a ttl:

- *hit*: ``get_many`` of 500 keys that are all cached (each hit is copied out, as served);
- *miss*: ``get_many`` of 500 keys that are not;
- *set, room*: ``set_many`` of 500 new keys into a cache with room for them;
- *set, full*: ``set_many`` of 500 new keys into a full cache (each insert evicts one entry).

Times are microseconds per call, the best of ``--rounds`` rounds of ``--calls`` calls each,
the two implementations interleaved round by round. For scale, the last rows time what a
request of 500 latents costs before the cache is asked: SHA-256 over the 500 latents' bytes
(d = 512 float32, the least ``cache_keys`` does). Memory: bytes held per entry (tracemalloc,
50,000 entries) against what ``MemoryCache.entry_bytes`` counts for it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import cachetools
import numpy as np
from cachetools import LRUCache, TTLCache
from report import PAGE, write_section  # benchmarks/ is on sys.path when run as a script

from latentsieve.service.cache import CachedScore, MemoryCache, _copy

BATCH = 500
MIB = 1 << 20
TTL_S = 3600.0
SLOWDOWN_LIMIT = 1.2  # cachetools replaces the hand-written cache only within this, on hits


# A stored entry: a private copy of the score and its cost in bytes (``entry_bytes``).
_Entry = tuple[CachedScore, int]


class _LRU(LRUCache[str, _Entry]):
    """cachetools' LRU, counting the entries it evicts to make room."""

    evictions = 0

    def popitem(self) -> tuple[str, _Entry]:
        item = super().popitem()
        self.evictions += 1
        return item


class _TTL(TTLCache[str, _Entry]):
    """cachetools' LRU with a per-entry time to live, counting the entries it evicts to make
    room (expired entries it drops are not evictions)."""

    evictions = 0

    def popitem(self) -> tuple[str, _Entry]:
        item = super().popitem()
        self.evictions += 1
        return item


class CachetoolsMemoryCache:
    """The candidate: ``MemoryCache`` on cachetools, same public behaviour (byte bound, ttl,
    lock, hit/miss/eviction counters, private copies).

    An entry costs ``len(key) + ENTRY_OVERHEAD_BYTES``; inserting past ``max_bytes`` evicts the
    least recently used entries. ``max_bytes <= 0`` disables the cache (every read misses).
    ``ttl_s`` (seconds, ``None`` = forever) bounds how long an entry is served; since a key
    names an immutable index version, expiry only bounds memory, never staleness. The store is
    cachetools' ``TTLCache`` (or ``LRUCache`` without a ttl) sized by each entry's cost; a lock
    makes it safe from several threads as well as tasks (no awaits happen while it is held).
    """

    def __init__(self, max_bytes: int, ttl_s: float | None = None) -> None:
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"cache ttl must be > 0 seconds or None, got {ttl_s}")
        self.max_bytes = int(max_bytes)
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0
        self.errors = 0
        capacity = max(0, self.max_bytes)
        self._entries: _LRU | _TTL = (
            _LRU(capacity, getsizeof=_entry_cost) if ttl_s is None
            else _TTL(capacity, ttl_s, timer=time.monotonic, getsizeof=_entry_cost)
        )
        self._lock = threading.Lock()

    @property
    def evictions(self) -> int:
        """Entries evicted to make room for newer ones (expired entries are not counted)."""
        return self._entries.evictions

    @property
    def size_bytes(self) -> int:
        """Approximate bytes held now (expired entries are dropped first)."""
        with self._lock:
            return int(self._entries.currsize)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    entry_bytes = staticmethod(MemoryCache.entry_bytes)

    async def get_many(self, keys: list[str]) -> list[CachedScore | None]:
        found: list[CachedScore | None] = []
        hit_count = 0
        with self._lock:
            entries = self._entries
            if isinstance(entries, _TTL):
                entries.expire()  # an expired entry frees its bytes once it is due
            for key in keys:
                entry = entries.get(key)  # a hit becomes the most recently used
                if entry is None:
                    found.append(None)
                else:
                    found.append(_copy(entry[0]))
                    hit_count += 1
            self.hits += hit_count
            self.misses += len(keys) - hit_count
        return found

    async def set_many(self, items: list[tuple[str, CachedScore]]) -> None:
        with self._lock:
            entries = self._entries
            for key, score in items:
                cost = self.entry_bytes(key, score)
                if cost > self.max_bytes:
                    continue  # cachetools would raise; an oversized entry is not cached
                entries.pop(key, None)  # a replaced entry is not an eviction
                entries[key] = (_copy(score), cost)

    async def close(self) -> None:
        with self._lock:
            self._entries.clear()


def _entry_cost(entry: _Entry) -> int:
    return entry[1]


IMPLEMENTATIONS: dict[str, Callable[[int, float | None], Any]] = {
    "hand-written (shipped)": MemoryCache,
    "cachetools (candidate)": CachetoolsMemoryCache,
}


def key(i: int) -> str:
    return "ls:v1:" + hashlib.sha256(i.to_bytes(8, "little")).hexdigest()


def score(i: int) -> CachedScore:
    return CachedScore(log_density=-float(i) - 0.125, percentile=(i % 1000) / 1000)


def items(start: int, count: int) -> list[tuple[str, CachedScore]]:
    return [(key(i), score(i)) for i in range(start, start + count)]


def per_call_us(calls: list[Callable[[], Awaitable[None]]]) -> float:
    """Microseconds per call over ``calls``, awaited one after another in one event loop."""

    async def loop() -> float:
        start = time.perf_counter()
        for call in calls:
            await call()
        return (time.perf_counter() - start) / len(calls) * 1e6

    return asyncio.run(loop())


def workloads(cache: Any, full: Any, calls: int) -> dict[str, list[Callable[[], Awaitable[None]]]]:
    """Each workload's ``calls`` calls on a warm ``cache`` and a ``full`` one, every argument
    built before the clock starts."""
    cached = [k for k, _ in items(5_000, BATCH)]
    absent = [k for k, _ in items(10**9, BATCH)]
    fresh = iter(range(10**6, 10**9, BATCH))
    return {
        "get_many, 500 hits": [partial(cache.get_many, cached)] * calls,
        "get_many, 500 misses": [partial(cache.get_many, absent)] * calls,
        "set_many, 500 new keys, room": [
            partial(cache.set_many, items(next(fresh), BATCH)) for _ in range(calls)],
        "set_many, 500 new keys, full": [
            partial(full.set_many, items(next(fresh), BATCH)) for _ in range(calls)],
    }


def time_workloads(rounds: int, calls: int) -> dict[tuple[str, str, str], float]:
    """{(ttl label, workload, implementation): best microseconds per call}."""
    best: dict[tuple[str, str, str], float] = {}
    warm = 20_000
    entry = MemoryCache.entry_bytes(key(0))
    for _ in range(rounds):
        for ttl_label, ttl in (("ttl 3600 s", TTL_S), ("no ttl", None)):
            for name, make in IMPLEMENTATIONS.items():
                cache = make(64 * MIB, ttl)  # the service's default size: room to spare
                asyncio.run(cache.set_many(items(0, warm)))
                full = make((warm + BATCH) * entry, ttl)  # every later insert evicts one
                asyncio.run(full.set_many(items(0, warm + BATCH)))
                for workload, runs in workloads(cache, full, calls).items():
                    slot = (ttl_label, workload, name)
                    best[slot] = min(best.get(slot, float("inf")), per_call_us(runs))
                assert len(full) == warm + BATCH and full.evictions == calls * BATCH
    return best


def hashing_us(rounds: int, calls: int) -> float:
    """SHA-256 of 500 latents of 512 float32 each, one digest per latent (microseconds)."""
    latents = np.random.default_rng(0).standard_normal((BATCH, 512), dtype=np.float32)
    rows = [row.tobytes() for row in latents]
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            for row in rows:
                hashlib.sha256(row).hexdigest()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def bytes_per_entry(make: Callable[[int, float | None], Any], count: int = 50_000) -> float:
    """Heap bytes a cache holds per entry (tracemalloc): the key string it keeps, its own slots
    and its private copy of the score; the caller's score dicts are freed before measuring."""
    cache = make(1 << 40, TTL_S)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    entries = items(0, count)
    asyncio.run(cache.set_many(entries))
    del entries
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 50 calls; no page")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    rounds, calls = (3, 50) if args.quick else (args.rounds, args.calls)
    load_before = os.getloadavg()[0]
    best = time_workloads(rounds, calls)
    hashed = hashing_us(rounds, calls)
    memory = {name: bytes_per_entry(make) for name, make in IMPLEMENTATIONS.items()}
    counted = MemoryCache.entry_bytes(key(0))
    baseline, new = IMPLEMENTATIONS
    lines = [
        "| cache | workload | hand-written (shipped) us | cachetools us "
        "| cachetools / hand-written |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    hit_ratio = 0.0
    for ttl_label, workload, name in best:
        if name != baseline:
            continue
        old, now = best[(ttl_label, workload, baseline)], best[(ttl_label, workload, new)]
        ratio = now / old
        if workload.startswith("get_many, 500 hits") and ttl_label.startswith("ttl"):
            hit_ratio = ratio
        lines.append(f"| {ttl_label} | {workload} | {old:,.0f} | {now:,.0f} | {ratio:.2f}x |")
    lines.append(f"| - | SHA-256 of the 500 latents (512 float32 each), for scale | "
                 f"{hashed:,.0f} | {hashed:,.0f} | - |")
    lines.append(f"| ttl 3600 s | heap bytes per entry (entry_bytes counts {counted}) | "
                 f"{memory[baseline]:,.0f} | {memory[new]:,.0f} | "
                 f"{memory[new] / memory[baseline]:.2f}x |")
    now_utc = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    header = (
        "## In-process score cache (`MemoryCache`)\n\n"
        f"Generated by `python benchmarks/bench_cache.py` on {now_utc} UTC; "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), Python "
        f"{platform.python_version()}, cachetools {cachetools.__version__}; 1-minute load "
        f"average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after. Microseconds "
        f"per call, best of {rounds} rounds of {calls} calls, the two interleaved; workloads in "
        "the benchmark's docstring. *hand-written*: the shipped `MemoryCache` (an "
        "`OrderedDict` LRU); *cachetools*: the same class on `TTLCache`/`LRUCache`, in the "
        "benchmark.\n\n"
    )
    verdict = (
        f"\ncachetools costs {hit_ratio:.2f}x the hand-written cache on the cached-hit path "
        f"(the limit for replacing it: {SLOWDOWN_LIMIT}x).\n"
    )
    table = header + "\n".join(lines) + "\n" + verdict
    print(table)
    if not args.quick:
        write_section("cache", table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
