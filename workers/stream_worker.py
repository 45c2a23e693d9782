"""``latentsieve worker``: consume scoring jobs from Redis Streams (workers/streams.py).

One process serves the shards it is given of every model in the store (or those named). Its
loops, all on one event loop:

- **read**: XREADGROUP up to ``read_count`` jobs at once from every assigned stream; each job
  goes through the model's ``DynamicBatcher`` (the gateway's own, ``max_batch_size`` and
  ``max_wait_ms``), so jobs from many requests and gateways become one GEMM. The result is
  XADDed to the job's reply stream (with its expiry, workers/streams.py), then the job is
  XACKed and XDELed.
- **claim**: XCLAIM jobs idle longer than ``claim_idle_ms`` in the pending list of a consumer
  whose heartbeat has lapsed (a worker killed mid-batch), never of a live one that is only
  slow (its own, when this process no longer holds them: a reply that could not be written);
  a job delivered more than ``max_deliveries`` times goes to the dead-letter stream and its
  gateway gets a ``dead_letter`` reply at once.
- **heartbeat**: every ``heartbeat_ttl_s / 3`` each (model, shard) gets this worker's expiry
  (Redis server time) in its live set; gateways count the members that have not expired.

Every job is checked against its stream first (``read_job``): its model and shard are the
stream's, its version a version name, its reply key a gateway's reply stream. One that fails
is acknowledged, deleted, counted as an error, logged and recorded in the dead-letter stream:
it never names a file, a module or a key. A version is loaded only through
``LatentStore.load``, which verifies every checksum (module sources included) before anything
is imported; a job whose version fails is answered with the error and dead-lettered too.

Jobs past their deadline are acknowledged and dropped, not computed. Any Redis error (a
restart) sends the loop into backoff; consumer groups are created again when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

import redis.asyncio as redis
from prometheus_client import start_http_server
from redis.exceptions import RedisError, ResponseError

from latentsieve.index.errors import StoreError
from latentsieve.index.store import LatentStore
from latentsieve.workers.batcher import QueueFull
from latentsieve.workers.density import FLOAT64_OPERANDS
from latentsieve.workers.local_compute import ModelBatchers
from latentsieve.workers.modules import ModuleLoadError
from latentsieve.workers.retry import Backoff
from latentsieve.workers.settings import WorkerOptions
from latentsieve.workers.shard_scoring import ShardKey, ShardScorer, open_shards, sum_paths
from latentsieve.workers.streams import (
    GROUP,
    REPLY_TTL_S,
    Fields,
    Reply,
    check_reply_stream,
    dead_letter_stream,
    job_stream,
    live_key,
    parse_job_stream,
    read_job,
    stopping,
)
from latentsieve.workers.transport import QueueLimits
from latentsieve.workers.worker_metrics import WorkerMetrics

log = logging.getLogger(__name__)

VERSIONS_KEPT = 2  # per model: the served version and the one before it (during a roll-out)
PENDING_PAGE = 256  # pending entries read at once when looking for orphaned jobs
# What a dead-letter record keeps of a job: its protocol's text fields, each cut to this length.
RECORD_FIELDS = frozenset(name.encode() for name in (
    "id", "reply", "deadline", "model", "version", "shard", "sigma", "descriptors", "space",
    "shape", "max_error",
))
RECORD_VALUE_BYTES = 256


def _reply_key(fields: Fields) -> str | None:
    """A job's reply key if it is a gateway's reply stream (``check_reply_stream``), else
    None: no other key is ever written."""
    raw = fields.get(b"reply")
    if raw is None:
        return None
    try:
        return check_reply_stream(raw.decode())
    except ValueError:  # UnicodeDecodeError included
        return None


class StreamWorker:
    """One worker process's loops; ``run`` until ``stop`` is set."""

    def __init__(self, options: WorkerOptions, metrics: WorkerMetrics | None = None) -> None:
        self.options = options
        FLOAT64_OPERANDS.limit = options.float64_operand_bytes
        self.metrics = metrics or WorkerMetrics()
        self.store = LatentStore(options.store)
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = redis.Redis.from_url(
            options.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0
        )
        self.batchers = ModelBatchers(
            options.max_batch_size, options.max_wait_ms,
            QueueLimits(options.queue_limit, options.queue_limit), on_batch=self._observe_batch,
        )
        # Keyed by model: a job reaches them only once its model is its stream's (read_job),
        # so both hold at most the served models, each at most VERSIONS_KEPT versions.
        self._versions: dict[str, OrderedDict[str, dict[int, ShardScorer]]] = {}
        self._loading: dict[str, asyncio.Lock] = {}  # one load at a time per model
        self._assigned: list[tuple[str, int]] = []
        self._groups_ready = False
        self._inflight = asyncio.Semaphore(options.read_count * 4)
        self._handling: set[bytes] = set()  # entry ids this process is working on
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics.watch_certified_paths(self.certified_paths)

    # -- what this worker serves ------------------------------------------------------

    def certified_paths(self) -> dict[tuple[str, str], int]:
        """(model, path) -> rows the certified ivf shards this worker holds (every kept
        version) scored by that path. Read by the metrics server's thread: each container is
        copied in one C call before it is walked."""
        totals: dict[tuple[str, str], int] = {}
        for model, kept in list(self._versions.items()):
            for shards in list(kept.values()):
                for path, count in sum_paths(list(shards.values())).items():
                    totals[model, path] = totals.get((model, path), 0) + count
        return totals

    def assignments(self) -> list[tuple[str, int]]:
        """(model, shard) pairs this worker serves: the newest version's shards of every
        model (or those named) that pass the ``--shards`` filter."""
        pairs: list[tuple[str, int]] = []
        for model in self.store.models():
            if self.options.models is not None and model not in self.options.models:
                continue
            version = self.store.newest(model)
            if version is None:
                continue
            count = len(self.store.read_manifest(model, version).shard_layout())
            for shard in range(count):
                if self.options.shards is None or shard in self.options.shards:
                    pairs.append((model, shard))
        return pairs

    async def _scorer(self, model: str, version: str, shard: int) -> ShardScorer:
        """The scorer of one shard of a version, loaded on first use (immutable versions:
        a job names its version, so a roll-out never mixes them)."""
        kept = self._versions.setdefault(model, OrderedDict())
        shards = kept.get(version)
        if shards is not None and shard in shards:
            kept.move_to_end(version)
            return shards[shard]
        lock = self._loading.setdefault(model, asyncio.Lock())
        async with lock:
            shards = kept.get(version)
            if shards is None or shard not in shards:
                served = {s for m, s in self._assigned if m == model} | {shard}
                loaded = await asyncio.to_thread(
                    self.store.load, model, version, True, sorted(served)
                )
                scorers = await asyncio.to_thread(open_shards, loaded, self.options.device)
                shards = {scorer.number: scorer for scorer in scorers}
                kept[version] = shards
                while len(kept) > VERSIONS_KEPT:
                    kept.popitem(last=False)
                log.info("worker loaded version", extra={
                    "model": model, "version": version, "shards": sorted(shards)})
        kept.move_to_end(version)
        return shards[shard]

    def _observe_batch(self, key: ShardKey, size: int, seconds: float) -> None:
        self.metrics.batch_size.labels(model=key.model).observe(size)
        self.metrics.compute_seconds.labels(model=key.model, device=self.options.device).observe(
            seconds
        )

    # -- the loops ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; in-flight jobs finish or are reclaimed by others."""
        self._assigned = await asyncio.to_thread(self.assignments)
        for model, shard in self._assigned:
            self.metrics.serving(model, shard, self.options.device)
        loops = [
            asyncio.create_task(self._guard(self._read_loop), name="read"),
            asyncio.create_task(self._guard(self._claim_loop), name="claim"),
            asyncio.create_task(self._guard(self._heartbeat_loop), name="heartbeat"),
            asyncio.create_task(self._guard(self._refresh_loop), name="refresh"),
        ]
        log.info("worker started", extra={
            "worker": self.name, "device": self.options.device,
            "serving": [f"{m}:{s}" for m, s in self._assigned]})
        try:
            await stop.wait()
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._leave()
            for task in list(self._tasks):
                task.cancel()
            await self.batchers.stop()
            await self.redis.aclose()

    async def _guard(self, body: Callable[[], Awaitable[None]]) -> None:
        """Run one loop forever; a Redis error (restart, outage) backs off and retries."""
        backoff = Backoff(first_s=0.05, cap_s=2.0)
        while True:
            stopping()
            try:
                await body()
                backoff.reset()
            except (RedisError, OSError) as exc:
                stopping(exc)
                self._groups_ready = False
                log.warning("redis error; backing off", extra={
                    "error": str(exc) or type(exc).__name__, "retry_in_s": backoff.delay_s})
                await backoff.wait(exc)

    async def _ensure_groups(self) -> None:
        if self._groups_ready:
            return
        for model, shard in self._assigned:
            try:
                await self.redis.xgroup_create(job_stream(model, shard), GROUP, id="0",
                                               mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    async def _read_loop(self) -> None:
        """One XREADGROUP for every assigned stream, then a task per job."""
        await self._ensure_groups()
        if not self._assigned:
            await asyncio.sleep(1.0)
            return
        streams = {job_stream(model, shard): ">" for model, shard in self._assigned}
        try:
            answer: Any = await self.redis.xreadgroup(
                GROUP, self.name, streams, count=self.options.read_count, block=1000  # type: ignore[arg-type]
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted without our groups
                self._groups_ready = False
                return
            raise
        for stream, entries in answer or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            self._handling.update(entry_id for entry_id, _ in entries)  # held while queued here
            for entry_id, fields in entries:
                await self._inflight.acquire()
                self._spawn(self._handle(name, entry_id, fields, reclaimed=False))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(
        self, stream: str, entry_id: bytes, fields: Fields, reclaimed: bool
    ) -> None:
        """Check one job against its stream, compute it (unless it expired), reply, then
        acknowledge it. A job that fails the check, or whose version does not load, is
        dead-lettered instead (``_give_up``)."""
        model, _ = parse_job_stream(stream)
        self._handling.add(entry_id)
        try:
            try:
                job = read_job(stream, fields)
            except (KeyError, ValueError) as exc:
                await self._give_up(stream, entry_id, fields, f"invalid job: {exc}", "error")
                self.metrics.jobs.labels(model=model, outcome="error").inc()
                log.error("malformed job dropped", extra={
                    "stream": stream, "error": repr(exc), "dead_letter": True})
                return
            if reclaimed:
                self.metrics.jobs.labels(model=model, outcome="reclaimed").inc()
            if job.expired():
                await self._ack(stream, entry_id)
                self.metrics.jobs.labels(model=model, outcome="expired").inc()
                return
            try:
                scorer = await self._scorer(job.model, job.spec.version, job.shard)
            except (StoreError, ModuleLoadError) as exc:  # missing, corrupted, modules changed
                await self._give_up(stream, entry_id, fields, str(exc), "error")
                self.metrics.jobs.labels(model=model, outcome="error").inc()
                log.error("job for a version that does not load dead-lettered", extra={
                    "stream": stream, "version": job.spec.version, "error": str(exc)})
                return
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + (job.deadline - time.time())
                key = ShardKey(job.spec, job.shard, scorer)
                scores = await self.batchers.submit(key, job.query, deadline)
                reply = Reply(job.id, job.shard, "ok", scores)
                outcome = "done"
            except TimeoutError:  # expired while queued: the gateway has answered 504
                await self._ack(stream, entry_id)
                self.metrics.jobs.labels(model=model, outcome="expired").inc()
                return
            except (QueueFull, StoreError, ValueError, RuntimeError) as exc:
                reply = Reply(job.id, job.shard, "error", detail=str(exc))
                outcome = "error"
            # The reply first, the acknowledgement only once it is written: Redis runs every
            # command of a pipeline even when an earlier one fails, so one round trip for
            # both could acknowledge a job whose answer was never written.
            pipe = self.redis.pipeline(transaction=False)
            self._queue_reply(pipe, job.reply, reply)
            await pipe.execute()
            await self._ack(stream, entry_id)
            self.metrics.jobs.labels(model=model, outcome=outcome).inc()
        except (RedisError, OSError) as exc:
            # Unacknowledged: this worker reclaims it after claim_idle_ms (another one does
            # once this one's heartbeat lapses). If only the acknowledgement failed, the job is
            # computed and answered again; the gateway ignores a reply it has already had.
            log.warning("could not reply; the job stays pending", extra={"error": str(exc)})
        finally:
            self._handling.discard(entry_id)
            self._inflight.release()

    @staticmethod
    def _queue_reply(pipe: Any, reply_key: str, reply: Reply) -> None:
        """Queue ``reply`` on ``pipe`` with its stream's expiry: a gateway keeps its own stream
        alive, so only the stream of a gateway that is gone (or one a late reply re-creates
        after its gateway deleted it) runs out, REPLY_TTL_S after its last reply."""
        pipe.xadd(reply_key, reply.to_fields())
        pipe.pexpire(reply_key, REPLY_TTL_S * 1000)

    async def _ack(self, stream: str, entry_id: bytes) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(stream, GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    async def _claim_loop(self) -> None:
        """Take over jobs idle past ``claim_idle_ms`` that no live worker holds (``_orphans``);
        dead-letter the over-delivered."""
        await asyncio.sleep(max(self.options.claim_idle_ms / 2000, 0.05))
        await self._ensure_groups()
        for model, shard in self._assigned:
            stream = job_stream(model, shard)
            try:
                orphans = await self._orphans(model, shard, stream)
                if not orphans:
                    continue
                # XCLAIM checks the idle time again: of two workers, only one takes each job.
                answer: Any = await self.redis.xclaim(
                    stream, GROUP, self.name, self.options.claim_idle_ms, list(orphans)
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    self._groups_ready = False
                    return
                raise
            for entry in answer:
                entry_id, fields = entry[0], entry[1]
                if entry_id is None or not fields or entry_id in self._handling:
                    continue  # deleted meanwhile, or already ours
                deliveries = orphans.get(entry_id, 0) + 1  # XCLAIM delivered it once more
                if deliveries > self.options.max_deliveries:
                    detail = (
                        f"delivered {deliveries} times (limit {self.options.max_deliveries}); "
                        f"see {dead_letter_stream(model, shard)}"
                    )
                    await self._give_up(stream, entry_id, fields, detail, "dead_letter",
                                        deliveries)
                    self.metrics.jobs.labels(model=model, outcome="dead_letter").inc()
                    log.error("job dead-lettered", extra={"model": model, "shard": shard,
                                                          "deliveries": deliveries})
                    continue
                self._handling.add(entry_id)
                await self._inflight.acquire()
                self._spawn(self._handle(stream, entry_id, fields, reclaimed=True))

    async def _orphans(self, model: str, shard: int, stream: str) -> dict[bytes, int]:
        """Entries of ``stream`` pending longer than ``claim_idle_ms`` that no live worker is
        working on, with their deliveries so far: those of a consumer whose heartbeat in
        ``live_key(model, shard)`` has lapsed (Redis server time; a slow live worker keeps
        its jobs), and this worker's own that this process no longer holds."""
        seconds, micros = await self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        members: Any = await self.redis.zrangebyscore(live_key(model, shard), f"({now_ms}", "+inf")
        live = {member.decode(errors="replace").rsplit("|", 1)[0] for member in members}
        live.discard(self.name)
        orphans: dict[bytes, int] = {}
        start = "-"
        while len(orphans) < self.options.read_count:
            page: Any = await self.redis.xpending_range(
                stream, GROUP, min=start, max="+", count=PENDING_PAGE,
                idle=self.options.claim_idle_ms,
            )
            for entry in page:
                consumer = entry["consumer"].decode(errors="replace")
                if consumer not in live and entry["message_id"] not in self._handling:
                    orphans[entry["message_id"]] = int(entry["times_delivered"])
            if len(page) < PENDING_PAGE:
                break
            start = "(" + page[-1]["message_id"].decode()
        return dict(list(orphans.items())[: self.options.read_count])

    async def _give_up(
        self, stream: str, entry_id: bytes, fields: Fields, detail: str,
        status: Literal["error", "dead_letter"], deliveries: int | None = None,
    ) -> None:
        """Record a job in its stream's dead-letter stream (its protocol fields, never its
        latents), tell its gateway when its reply key is a gateway's reply stream (no other key
        is written), then acknowledge and delete it."""
        model, shard = parse_job_stream(stream)
        record: dict[Any, Any] = {
            key: value[:RECORD_VALUE_BYTES] for key, value in fields.items()
            if key in RECORD_FIELDS
        }
        record.update({"stream_id": entry_id, "worker": self.name, "reason": detail})
        if deliveries is not None:
            record["deliveries"] = str(deliveries)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(dead_letter_stream(model, shard), record, maxlen=10_000, approximate=True)
        reply_key = _reply_key(fields)
        if reply_key is not None and b"id" in fields:
            reply = Reply(fields[b"id"].decode(errors="replace"), shard, status, detail=detail)
            self._queue_reply(pipe, reply_key, reply)
        recorded, *replied = await pipe.execute(raise_on_error=False)
        if isinstance(recorded, Exception):
            raise recorded  # not recorded: the job stays pending and comes back
        if replied and isinstance(replied[0], Exception):  # the record is what counts
            log.warning("could not tell the gateway", extra={"error": str(replied[0])})
        await self._ack(stream, entry_id)

    async def _heartbeat_loop(self) -> None:
        ttl_ms = int(self.options.heartbeat_ttl_s * 1000)
        seconds, micros = await self.redis.time()
        expiry = seconds * 1000 + micros // 1000 + ttl_ms
        pipe = self.redis.pipeline(transaction=False)
        member = f"{self.name}|{self.options.device}"
        for model, shard in self._assigned:
            pipe.zadd(live_key(model, shard), {member: expiry})
        await pipe.execute()
        await asyncio.sleep(self.options.heartbeat_ttl_s / 3)

    async def _leave(self) -> None:
        """Remove this worker from the live sets at a clean shutdown."""
        member = f"{self.name}|{self.options.device}"
        with contextlib.suppress(RedisError, OSError):
            pipe = self.redis.pipeline(transaction=False)
            for model, shard in self._assigned:
                pipe.zrem(live_key(model, shard), member)
            await pipe.execute()

    async def _refresh_loop(self) -> None:
        """Pick up models and shards added to the store since the start."""
        await asyncio.sleep(self.options.refresh_interval_s)
        try:
            assigned = await asyncio.to_thread(self.assignments)
        except (OSError, StoreError) as exc:
            log.warning("cannot list the store", extra={"error": str(exc)})
            return
        if assigned != self._assigned:
            for model, shard in sorted(set(assigned) - set(self._assigned)):
                self.metrics.serving(model, shard, self.options.device)
            self._assigned = assigned
            self._groups_ready = False


def serve_metrics(metrics: WorkerMetrics, port: int | None, host: str = "127.0.0.1") -> None:
    """The worker's ``/metrics`` on ``host:port`` (prometheus_client's own HTTP server).

    Loopback unless the operator names an address: the metrics carry no secret, but every
    other host has no business reading them (compose opens 0.0.0.0 inside its network)."""
    if port is not None:
        start_http_server(port, addr=host, registry=metrics.registry)


async def run_worker(options: WorkerOptions, metrics_port: int | None = None,
                     stop: asyncio.Event | None = None,
                     metrics_host: str = "127.0.0.1") -> None:
    """Run one worker until SIGINT/SIGTERM (or ``stop``); ``/metrics`` on
    ``metrics_host:metrics_port`` when a port is given."""
    import signal

    metrics = WorkerMetrics()
    serve_metrics(metrics, metrics_port, metrics_host)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    await StreamWorker(options, metrics).run(stop)
