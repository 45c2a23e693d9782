"""``--compute workers``: the gateway's side of the Redis Streams transport (workers/streams.py).

A request's uncached latents become one job per shard, XADDed to each shard's stream; one
reader task per gateway process reads this process's reply stream and resolves the waiting
requests; a liveness task reads the workers' heartbeats every ``LIVENESS_INTERVAL_S``, so a
request for a shard with no live worker fails at once (503) instead of at its deadline.
A lost Redis connection fails the requests waiting on it with 503; the tasks reconnect with
backoff, so later requests succeed once Redis is back. Every liveness read also renews the reply
stream's expiry (``REPLY_TTL_S``, which each worker reply sets too): the stream of a gateway
that is gone, or the one a late reply re-creates after ``stop`` deleted it, expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from latentsieve.redaction import redact
from latentsieve.workers.retry import Backoff
from latentsieve.workers.shard_scoring import ShardScores
from latentsieve.workers.streams import (
    REPLY_TTL_S,
    Job,
    JobFailed,
    Reply,
    WorkersUnavailable,
    job_stream,
    live_key,
    reply_stream,
    stopping,
)
from latentsieve.workers.transport import Computed, QueueLimits, Work, merge

log = logging.getLogger(__name__)

LIVENESS_INTERVAL_S = 0.5
REPLY_BLOCK_MS = 1000

# model -> number of shards of the version served now
ShardCounts = Callable[[], dict[str, int]]


@dataclass
class _Waiting:
    """One job awaiting a reply from each of its ``shards``."""

    model: str
    rows: int
    shards: int
    future: asyncio.Future[list[ShardScores]]
    parts: dict[int, ShardScores] = field(default_factory=dict)


class StreamCompute:
    """Sends work to the workers over Redis Streams and merges their shard replies."""

    mode = "workers"

    def __init__(
        self,
        redis_url: str,
        shard_counts: ShardCounts,
        limits: QueueLimits,
        socket_timeout_s: float = 2.0,
    ) -> None:
        self.redis_url = redact(redis_url)  # for messages: the connections keep the password
        self.shard_counts = shard_counts
        self.limits = limits  # latents per request sent and not yet answered
        self.gateway = uuid.uuid4().hex[:16]
        self.replies = reply_stream(self.gateway)
        options = {"socket_connect_timeout": socket_timeout_s, "retry_on_timeout": False}
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=socket_timeout_s, **options  # type: ignore[arg-type]
        )
        # The blocking reader waits up to REPLY_BLOCK_MS on its own connection.
        self._reader = redis.Redis.from_url(
            redis_url, socket_timeout=socket_timeout_s + REPLY_BLOCK_MS / 1000,
            **options,  # type: ignore[arg-type]
        )
        self._waiting: dict[str, _Waiting] = {}
        self._queued: dict[str, int] = {}
        self._live: dict[tuple[str, int], list[str]] = {}  # (model, shard) -> worker devices
        self._redis_error: str | None = "Redis not contacted yet"
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Read heartbeats once (so /readyz is right from the start), then run the tasks."""
        await self._read_liveness()
        self._tasks = [
            asyncio.create_task(self._read_replies(), name="replies"),
            asyncio.create_task(self._watch_liveness(), name="liveness"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_waiting(WorkersUnavailable("the gateway is shutting down"))
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self.replies)
        await self._redis.aclose()
        await self._reader.aclose()

    def queued_by_model(self) -> dict[str, int]:
        """Latents sent and not yet answered, per model (counted once per request)."""
        return dict(self._queued)

    def live_workers(self) -> dict[tuple[str, int], list[str]]:
        """(model, shard) -> the devices of its live workers, as of the last heartbeat read."""
        return dict(self._live)

    def describe(self, model: str, shards: int) -> dict[str, Any]:
        """Each shard's live workers and their devices (the ``compute`` block of /models)."""
        return {
            "mode": self.mode,
            "shards": [
                {"shard": shard, "live_workers": len(self._live.get((model, shard), [])),
                 "devices": sorted(set(self._live.get((model, shard), [])))}
                for shard in range(shards)
            ],
        }

    def missing(self) -> list[str]:
        """What keeps the served models from being scored: Redis unreachable, or
        ``model/shard`` without a live worker."""
        if self._redis_error is not None:
            return [f"Redis at {self.redis_url} ({self._redis_error})"]
        counts = self.shard_counts()
        return [what for model in counts for what in self._missing_shards(model, counts[model])]

    def _missing_shards(self, model: str, shards: int) -> list[str]:
        """Redis unreachable, or the shards of ``model`` (0 .. shards - 1) without a worker."""
        if self._redis_error is not None:
            return [f"Redis at {self.redis_url} ({self._redis_error})"]
        return [
            f"{model} shard {shard}" for shard in range(shards)
            if not self._live.get((model, shard))
        ]

    async def compute(self, work: Work, deadline: float) -> Computed:
        """Send ``work`` to every shard's stream and wait (until ``deadline``, loop time) for
        all replies; 503 (WorkersUnavailable) at once when a shard has no live worker."""
        missing = self._missing_shards(work.model, work.shards)
        if missing:
            raise WorkersUnavailable(
                f"no live worker for {', '.join(missing)}; start 'latentsieve worker' for "
                "it or retry"
            )
        rows = len(work.query)
        self.limits.check(self._queued, work.model, rows)
        loop = asyncio.get_running_loop()
        job_id = uuid.uuid4().hex
        count = work.shards
        waiting = _Waiting(work.model, rows, count, loop.create_future())
        self._waiting[job_id] = waiting
        self._queued[work.model] = self._queued.get(work.model, 0) + rows
        expires = time.time() + (deadline - loop.time())
        try:
            pipe = self._redis.pipeline(transaction=False)
            for shard in range(count):
                job = Job(job_id, self.replies, expires, shard, work.spec.for_shard(shard),
                          work.query)
                pipe.xadd(job_stream(work.model, shard), job.to_fields())  # type: ignore[arg-type]
            await pipe.execute()
        except (RedisError, OSError) as exc:
            self._forget(job_id)
            raise WorkersUnavailable(
                f"Redis at {self.redis_url} is unreachable ({redact(str(exc))})"
            ) from exc
        try:
            async with asyncio.timeout_at(deadline):
                parts = await asyncio.shield(waiting.future)
        finally:
            self._forget(job_id)
        return merge(work, parts)

    def _forget(self, job_id: str) -> None:
        waiting = self._waiting.pop(job_id, None)
        if waiting is None:
            return
        left = self._queued.get(waiting.model, 0) - waiting.rows
        if left > 0:
            self._queued[waiting.model] = left
        else:
            self._queued.pop(waiting.model, None)
        if not waiting.future.done():
            waiting.future.cancel()

    def _fail_waiting(self, error: Exception) -> None:
        for waiting in list(self._waiting.values()):
            if not waiting.future.done():
                waiting.future.set_exception(error)
                waiting.future.exception()  # seen: its request may be gone

    def _resolve(self, reply: Reply) -> None:
        waiting = self._waiting.get(reply.id)
        if waiting is None or waiting.future.done():
            return  # a late or repeated reply (at-least-once compute): the first one counts
        if reply.status != "ok" or reply.scores is None:
            what = (
                "was delivered to workers too many times without an answer (moved to the "
                "dead-letter stream)" if reply.status == "dead_letter"
                else "failed on the worker"
            )
            waiting.future.set_exception(
                JobFailed(f"shard {reply.shard} of the job {what}: {reply.detail}")
            )
            return
        waiting.parts[reply.shard] = reply.scores
        if len(waiting.parts) == waiting.shards:
            waiting.future.set_result([waiting.parts[shard] for shard in range(waiting.shards)])

    async def _read_replies(self) -> None:
        """The one reader of this gateway's reply stream."""
        last = "0-0"
        backoff = Backoff(first_s=0.05, cap_s=1.0)
        while True:
            stopping()
            try:
                answer: Any = await self._reader.xread(
                    {self.replies: last}, count=512, block=REPLY_BLOCK_MS
                )
                backoff.reset()
                for _, entries in answer:
                    ids = []
                    for entry_id, fields in entries:
                        last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        ids.append(entry_id)
                        try:
                            self._resolve(Reply.from_fields(fields))
                        except (KeyError, ValueError) as exc:
                            log.warning("malformed reply", extra={"error": repr(exc)})
                    if ids:
                        await self._redis.xdel(self.replies, *ids)
            except (RedisError, OSError) as exc:
                stopping(exc)
                self._fail_waiting(
                    WorkersUnavailable(f"lost the connection to Redis at {self.redis_url} "
                                       f"({exc}); retry")
                )
                await backoff.wait(exc)

    async def _read_liveness(self) -> None:
        try:
            seconds, micros = await self._redis.time()
            now_ms = seconds * 1000 + micros // 1000
            counts = self.shard_counts()
            keys = [(model, shard) for model, count in counts.items() for shard in range(count)]
            pipe = self._redis.pipeline(transaction=False)
            for model, shard in keys:
                pipe.zremrangebyscore(live_key(model, shard), "-inf", now_ms)
                pipe.zrange(live_key(model, shard), 0, -1)
            pipe.expire(self.replies, REPLY_TTL_S)  # kept alive while this gateway runs
            answers = await pipe.execute()
        except (RedisError, OSError) as exc:
            stopping(exc)
            self._redis_error = str(exc) or type(exc).__name__
            self._live = {}
            self._fail_waiting(
                WorkersUnavailable(f"lost the connection to Redis at {self.redis_url}; retry")
            )
            return
        self._redis_error = None
        self._live = {
            key: [member.decode().split("|", 1)[-1] for member in answers[2 * i + 1]]
            for i, key in enumerate(keys)
        }

    async def _watch_liveness(self) -> None:
        while True:
            stopping()
            await asyncio.sleep(LIVENESS_INTERVAL_S)
            await self._read_liveness()
