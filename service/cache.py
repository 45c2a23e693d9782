"""The score cache: one key function and two back ends (in-process LRU, Redis, whose writes
``WriteBehindCache`` takes off the request).

A cached entry is the part of a result that depends only on the latent, the index version, the
bandwidth and the requested descriptors: ``log_density`` (nats) and ``percentile`` (in [0, 1]).
The accept/reject decision is not cached, because a request may override the policy.

Neither back end ever raises from ``get_many``/``set_many``: a cache failure turns into misses
(reads) or skipped writes, is counted in ``errors`` and logged at most once per interval, so a
dead Redis costs at most one short socket timeout and never fails a request.

Counters (read by the gateway, which owns the Prometheus names):

- ``hits``   keys found
- ``misses`` keys not found (including every key of a failed read)
- ``errors`` ``get_many``/``set_many`` calls that could not use the back end
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NotRequired, Protocol, TypedDict

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from latentsieve.redaction import redact
from latentsieve.workers.transport import ScoreSpec

log = logging.getLogger(__name__)

KEY_PREFIX = "ls:v1:"
# Heap bytes per entry on top of the key's length (tracemalloc, CPython 3.11, held to within
# 15% by tests/unit/test_memory_cache.py): the key str object, the OrderedDict slot, the
# (score, expiry) tuple and the private score dict with its floats (each unique); a descriptor
# entry adds its nested dict and each of its values (a name and its percentile are two; the
# "<name>_percentile" strings are made per entry).
ENTRY_OVERHEAD_BYTES = 428
DESCRIPTOR_DICT_BYTES = 141
DESCRIPTOR_VALUE_BYTES = 65
DEFAULT_SOCKET_TIMEOUT_S = 0.25
DEFAULT_RETRY_INTERVAL_S = 0.5
DEFAULT_WARN_INTERVAL_S = 30.0


class CachedScore(TypedDict):
    """The cached part of one result: ``log_density`` in nats, ``percentile`` in [0, 1], and
    for descriptor requests ``{"psi": .., "psi_percentile": .., ...}``."""

    log_density: float
    percentile: float
    descriptors: NotRequired[dict[str, float]]
    error_bound: NotRequired[float]  # nats, certified ivf


class CacheSettings(Protocol):
    """The fields of ``latentsieve.service.settings.Settings`` that choose and size the cache."""

    @property
    def redis_url(self) -> str | None: ...

    @property
    def cache_bytes(self) -> int: ...

    @property
    def cache_ttl_s(self) -> float: ...


def _length_prefixed(part: bytes) -> bytes:
    return len(part).to_bytes(8, "big") + part


@functools.lru_cache(maxsize=256)
def _prefix_digest(spec_bytes: bytes, generator_sha256: str) -> hashlib._Hash:
    """SHA-256 state after the parts every key of one spec and generator shares; callers
    ``copy()`` it, never update it."""
    return hashlib.sha256(
        b"".join(
            _length_prefixed(part)
            for part in (KEY_PREFIX.encode(), spec_bytes, generator_sha256.encode())
        )
    )


def cache_keys(
    spec: ScoreSpec,
    latents: Sequence[bytes] | np.ndarray,
    generator_sha256: str = "",
) -> list[str]:
    """``"ls:v1:<sha256 hex>"`` per latent, over every input that changes a score.

    Every field of ``spec`` enters (``ScoreSpec.key_bytes``: each length-prefixed, so no two
    different inputs share an encoding; ``sigma`` exactly, 1.0 and 1.0000000001 differ;
    descriptors as a set; a certified ivf version's ``max_error`` exactly); descriptor requests
    also carry the generator's sha256. A latent is its bytes as the gateway normalises them
    (one dtype and byte order for every request form): ``bytes`` each, or an ``(n, d)`` array
    whose rows are hashed in place. The shared prefix is hashed once per (spec, generator).
    """
    prefix = _prefix_digest(spec.key_bytes(), generator_sha256)
    if isinstance(latents, np.ndarray) and latents.size:
        # Rows of one array share a length: hash its prefix once, then slice one flat view.
        flat = np.ascontiguousarray(latents).data.cast("B")
        row_bytes = flat.nbytes // len(latents)
        row_prefix = prefix.copy()
        row_prefix.update(row_bytes.to_bytes(8, "big"))
        keys = []
        for start in range(0, flat.nbytes, row_bytes):
            digest = row_prefix.copy()
            digest.update(flat[start : start + row_bytes])
            keys.append(KEY_PREFIX + digest.hexdigest())
        return keys
    if isinstance(latents, np.ndarray):
        latents = [row.tobytes() for row in latents]
    keys = []
    for latent in latents:
        digest = prefix.copy()
        digest.update(_length_prefixed(latent))
        keys.append(KEY_PREFIX + digest.hexdigest())
    return keys


def cache_key(spec: ScoreSpec, latent: bytes) -> str:
    """The key of one latent (see :func:`cache_keys`)."""
    return cache_keys(spec, [latent])[0]


class ScoreCache(Protocol):
    """What the gateway needs from a cache; implementations never raise from get/set."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    @property
    def errors(self) -> int: ...

    async def get_many(self, keys: list[str]) -> list[CachedScore | None]:
        """One entry (or ``None`` for a miss) per key, in order."""
        ...

    async def set_many(self, items: list[tuple[str, CachedScore]]) -> None:
        """Store every ``(key, score)``; failures are counted, not raised."""
        ...

    async def close(self) -> None:
        """Release connections; the cache is unusable afterwards."""
        ...


class _Throttled:
    """Log a warning at most once per ``interval_s`` seconds, with the count suppressed."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, message: str, **fields: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        log.warning(message, extra={**fields, "suppressed": self._suppressed})
        self._last = now
        self._suppressed = 0


class MemoryCache:
    """In-process LRU bounded by the approximate bytes of its keys and values.

    An entry costs ``len(key) + ENTRY_OVERHEAD_BYTES``; inserting past ``max_bytes`` evicts the
    least recently used entries. ``max_bytes <= 0`` disables the cache (every read misses).
    ``ttl_s`` (seconds, ``None`` = forever) bounds how long an entry is served; since a key
    names an immutable index version, expiry only bounds memory, never staleness. A lock makes
    it safe from several threads as well as tasks (no awaits happen while it is held).
    """

    def __init__(self, max_bytes: int, ttl_s: float | None = None) -> None:
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"cache ttl must be > 0 seconds or None, got {ttl_s}")
        self.max_bytes = int(max_bytes)
        self.ttl_s = ttl_s
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.evictions = 0
        self._bytes = 0
        # key -> (score, monotonic expiry time)
        self._entries: OrderedDict[str, tuple[CachedScore, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """Approximate bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def entry_bytes(key: str, score: CachedScore | None = None) -> int:
        """Approximate cost of one entry in bytes (descriptor values add to it)."""
        values = len(score.get("descriptors", {})) if score is not None else 0
        nested = DESCRIPTOR_DICT_BYTES + DESCRIPTOR_VALUE_BYTES * values if values else 0
        return len(key) + ENTRY_OVERHEAD_BYTES + nested

    async def get_many(self, keys: list[str]) -> list[CachedScore | None]:
        now = time.monotonic()
        found: list[CachedScore | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry[1] <= now:
                    self._remove(key)
                    entry = None
                if entry is None:
                    found.append(None)
                    continue
                self._entries.move_to_end(key)
                found.append(_copy(entry[0]))
            hit_count = sum(score is not None for score in found)
            self.hits += hit_count
            self.misses += len(keys) - hit_count
        return found

    async def set_many(self, items: list[tuple[str, CachedScore]]) -> None:
        expires = time.monotonic() + self.ttl_s if self.ttl_s is not None else float("inf")
        with self._lock:
            for key, score in items:
                cost = self.entry_bytes(key, score)
                if cost > self.max_bytes:
                    continue
                if key in self._entries:
                    self._remove(key)
                self._entries[key] = (_copy(score), expires)
                self._bytes += cost
                while self._bytes > self.max_bytes:
                    oldest = next(iter(self._entries))
                    self._remove(oldest)
                    self.evictions += 1

    async def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _remove(self, key: str) -> None:
        score, _ = self._entries.pop(key)
        self._bytes -= self.entry_bytes(key, score)


def _copy(score: CachedScore) -> CachedScore:
    """A private copy, so a caller mutating its result cannot change the cache."""
    copied = score.copy()  # a dict of floats: the shallow copy is enough but for descriptors
    if "descriptors" in score:
        copied["descriptors"] = dict(score["descriptors"])
    return copied


def _encode(score: CachedScore) -> bytes:
    """Compact JSON ``[log_density, percentile]``, ``[.., .., {descriptors}]``, or with a
    certified bound ``[.., .., {descriptors or none}, error_bound]``; ``repr`` floats
    round-trip exactly."""
    values: list[object] = [score["log_density"], score["percentile"]]
    if "descriptors" in score or "error_bound" in score:
        values.append(score.get("descriptors", {}))
    if "error_bound" in score:
        values.append(score["error_bound"])
    return json.dumps(values, separators=(",", ":")).encode()


def _decode(raw: bytes | str) -> CachedScore:
    values = json.loads(raw)
    score = CachedScore(log_density=float(values[0]), percentile=float(values[1]))
    if len(values) > 2 and values[2]:
        score["descriptors"] = {str(k): float(v) for k, v in dict(values[2]).items()}
    if len(values) > 3:
        score["error_bound"] = float(values[3])
    return score


class RedisCache:
    """Scores in Redis: one ``MGET`` per read, one pipelined ``SET ... PX`` batch per write.

    Values are compact JSON ``[log_density, percentile]`` under ``cache_key`` keys, expiring
    after ``ttl_s`` seconds (millisecond precision; ``None`` = no expiry). Socket connect and
    read timeouts are ``socket_timeout_s`` and redis-py's retries are off, so a dead or
    unreachable Redis costs one short timeout. After a failure the cache does not touch Redis
    for ``retry_interval_s`` seconds (reads miss, writes are skipped, both counted in
    ``errors``); the next call after that reconnects, so a restarted Redis is used again.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float | None = 3600.0,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
        warn_interval_s: float = DEFAULT_WARN_INTERVAL_S,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"cache ttl must be > 0 seconds or None, got {ttl_s}")
        self.url = url
        self.on_error = on_error
        self.ttl_ms = max(1, round(ttl_s * 1000)) if ttl_s is not None else None
        self.socket_timeout_s = socket_timeout_s
        self.retry_interval_s = retry_interval_s
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self._down_until = -float("inf")
        self._warn = _Throttled(warn_interval_s)
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            decode_responses=False,
        )

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, operation: str, exc: BaseException | None) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error()
        if exc is not None:
            self._down_until = time.monotonic() + self.retry_interval_s
            self._warn.warning(
                "redis cache unavailable; serving without it",
                operation=operation,
                error=f"{type(exc).__name__}: {exc}",
                url=redact(self.url),
            )

    def _deadline_s(self) -> float:
        # Connect and read each get socket_timeout_s; the outer bound is a safety net only.
        return 4 * self.socket_timeout_s

    async def get_many(self, keys: list[str]) -> list[CachedScore | None]:
        if not keys:
            return []
        if not self._available():
            self._failed("get", None)
            self.misses += len(keys)
            return [None] * len(keys)
        try:
            async with asyncio.timeout(self._deadline_s()):
                raw_values: list[bytes | str | None] = await self._client.mget(keys)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("get", exc)
            self.misses += len(keys)
            return [None] * len(keys)
        found: list[CachedScore | None] = []
        for raw in raw_values:
            score: CachedScore | None = None
            if raw is not None:
                try:
                    score = _decode(raw)
                except (ValueError, TypeError) as exc:
                    self._warn.warning("unreadable redis cache entry", error=str(exc))
            found.append(score)
        hit_count = sum(score is not None for score in found)
        self.hits += hit_count
        self.misses += len(keys) - hit_count
        return found

    async def set_many(self, items: list[tuple[str, CachedScore]]) -> None:
        if not items:
            return
        if not self._available():
            self._failed("set", None)
            return
        try:
            async with asyncio.timeout(self._deadline_s()):
                pipe = self._client.pipeline(transaction=False)
                # execute_command, not set(): redis-py's per-command cost is the whole cost of a
                # large write, and set()'s argument handling is 10-25% of it.
                expiry = ("PX", self.ttl_ms) if self.ttl_ms is not None else ()
                for key, score in items:
                    pipe.execute_command("SET", key, _encode(score), *expiry)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("set", exc)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:
            log.debug("closing the redis cache client failed", extra={"error": str(exc)})


class WriteBehindCache:
    """``inner``'s writes after the answer: ``set_many`` hands its entries to a background task
    and returns, so a request does not wait for them (a pipelined write of 500 Redis entries is
    13-17 ms of redis-py, docs/performance.md).

    - A read of a key whose write is still pending waits for that write first, so this process
      reads its own writes and ``cached`` keeps meaning "found in the shared cache". Another
      gateway sees the entries once ``inner`` has them, milliseconds later (until then it
      computes them again: the same scores, one more GEMM).
    - Writes run one at a time, in the order they were handed over (a later entry of a key
      wins), on one connection at a time.
    - At most ``max_pending`` entries wait: past that, ``set_many`` waits for earlier writes
      first, so a slow or dead back end bounds memory, not just latency.
    - ``close`` waits for every pending write, each bounded by ``inner``'s own timeouts, then
      closes ``inner``.
    - ``inner.set_many`` never raises (the ``ScoreCache`` protocol): a failed write is counted
      in ``inner.errors`` as before.
    """

    def __init__(self, inner: ScoreCache, max_pending: int = 65_536) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.inner = inner
        self.max_pending = max_pending
        self._pending: dict[str, asyncio.Task[None]] = {}  # key -> the write that holds it
        self._last: asyncio.Task[None] | None = None

    @property
    def hits(self) -> int:
        return self.inner.hits

    @property
    def misses(self) -> int:
        return self.inner.misses

    @property
    def errors(self) -> int:
        return self.inner.errors

    @property
    def pending(self) -> int:
        """Entries handed to ``set_many`` and not yet written."""
        return len(self._pending)

    async def get_many(self, keys: list[str]) -> list[CachedScore | None]:
        if self._pending:
            writes = {self._pending[key] for key in keys if key in self._pending}
            if writes:
                await asyncio.wait(writes)  # never cancels the writes, even if this read is
        return await self.inner.get_many(keys)

    async def set_many(self, items: list[tuple[str, CachedScore]]) -> None:
        if not items:
            return
        while self._pending and len(self._pending) + len(items) > self.max_pending:
            await asyncio.wait(set(self._pending.values()), return_when=asyncio.FIRST_COMPLETED)
        entries = [(key, _copy(score)) for key, score in items]
        write = asyncio.create_task(self._write(entries, self._last))
        self._last = write
        self._pending.update((key, write) for key, _ in entries)

    async def _write(
        self, entries: list[tuple[str, CachedScore]], previous: asyncio.Task[None] | None
    ) -> None:
        try:
            if previous is not None:  # in order, one at a time: a later entry of a key wins
                await asyncio.wait({previous})
            await self.inner.set_many(entries)
        except Exception:  # the protocol says never; no request is left to see it if it does
            log.exception("score cache write failed", extra={"entries": len(entries)})
        finally:
            this = asyncio.current_task()
            for key, _ in entries:
                if self._pending.get(key) is this:  # not handed to a later write meanwhile
                    del self._pending[key]

    async def flush(self) -> None:
        """Wait until every write handed over so far has finished."""
        while self._pending:
            await asyncio.wait(set(self._pending.values()))

    async def close(self) -> None:
        await self.flush()
        await self.inner.close()


def make_cache(
    settings: CacheSettings, on_error: Callable[[], None] | None = None
) -> ScoreCache:
    """A ``RedisCache`` (writing behind the answer, ``WriteBehindCache``) when
    ``settings.redis_url`` is set, else a ``MemoryCache``.

    ``settings.cache_bytes`` sizes the in-process cache (bytes); ``settings.cache_ttl_s``
    (seconds, ``<= 0`` = no expiry) applies to both. ``on_error`` is called once per failed
    Redis call (the in-process cache cannot fail).
    """
    ttl_s = settings.cache_ttl_s if settings.cache_ttl_s > 0 else None
    if settings.redis_url:
        return WriteBehindCache(RedisCache(settings.redis_url, ttl_s=ttl_s, on_error=on_error))
    return MemoryCache(settings.cache_bytes, ttl_s=ttl_s)
