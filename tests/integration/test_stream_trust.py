"""Workers treat a job as input (security audit, issue 22), through a real ``redis-server`` with
the worker in this process: a forged job never names a path out of the store, never makes the
worker import a module whose checksum was not verified, never makes it write a key outside the
gateways' reply streams, and never runs on a stream of another model or shard; it is
acknowledged, deleted, counted as an error and recorded once in its stream's dead-letter stream.
Also: a late reply to a deleted reply stream expires, and only jobs of a consumer whose
heartbeat has lapsed are reclaimed (a slow live worker keeps its own)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as redis

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.checksums import sha256_file
from latentsieve.index.manifest import (
    MANIFEST_NAME,
    DescriptorSettings,
    IndexManifest,
    ModuleReference,
)
from latentsieve.index.store import LatentStore
from latentsieve.service.stream_compute import StreamCompute
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.density import log_density_reference
from latentsieve.workers.shard_scoring import ShardQuery
from latentsieve.workers.stream_worker import VERSIONS_KEPT, StreamWorker, WorkerOptions
from latentsieve.workers.streams import (
    GROUP,
    REPLY_TTL_S,
    Job,
    Reply,
    dead_letter_stream,
    job_stream,
    live_key,
)
from latentsieve.workers.transport import QueueLimits, ScoreSpec

pytestmark = pytest.mark.anyio
N, DIM, SIGMA = 300, 6, 1.0
REPLIES = "latentsieve:replies:trusttest"  # a valid gateway reply stream
OLD_VERSION = "19990101T000000000000Z-0badc0de"  # valid, older than every build: never served


@dataclass(frozen=True)
class Planted:
    """What an attacker prepared: a module that must never be imported, a version folder
    outside the store and one inside it, both naming that module as their generator."""

    module: str
    outside: Path  # a complete version of ``plain``, checksums right, outside the store
    inside_version: str  # a version of ``plain`` in the store whose generator checksum is wrong


@pytest.fixture(scope="module")
def training() -> np.ndarray:
    return np.random.default_rng(21).standard_normal((N, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, training: np.ndarray) -> Path:
    root = tmp_path_factory.mktemp("trust") / "store"
    source = root.parent / "latents.npy"
    np.save(source, training)
    for name, shards in (("plain", 1), ("split", 2)):
        build_version(LatentStore(root), BuildOptions(
            model=name, latents_file=source, sigma=str(SIGMA), space="raw",
            calibration_count=50, shards=shards, progress=False,
        ), calibrate_build)
    return root


def plant_version(source: Path, target: Path, module: str, sha256: str) -> None:
    """A copy of version ``source`` at ``target`` whose manifest names ``module:factory`` as
    its generator (with descriptors, so a worker opening shard 0 would build it)."""
    shutil.copytree(source, target)
    np.savez(target / "descriptor_calibration.npz", psi=np.zeros(1), nu=np.zeros(1),
             delta=np.zeros(1))
    manifest = IndexManifest.model_validate_json((source / MANIFEST_NAME).read_bytes())
    planted = manifest.model_copy(update={
        "version": target.name,
        "generator": ModuleReference(spec=f"{module}:factory", source="import", sha256=sha256),
        "descriptors": DescriptorSettings(
            output_dim=1, projection_rows=1, projection_seed=0, delta_directions=1,
            delta_radius=0.1, calibration_count=1, quantiles={},
        ),
    })
    (target / MANIFEST_NAME).write_text(planted.model_dump_json())


@pytest.fixture
def planted(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Planted]:
    module = f"latentsieve_planted_{uuid.uuid4().hex[:10]}"
    source = tmp_path / f"{module}.py"
    source.write_text('"""Planted by a test: importing it is the failure."""\n'
                      "def factory():\n    raise RuntimeError('planted factory called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = store / "plain" / str(LatentStore(store).newest("plain"))
    outside = tmp_path / "outside" / real.name
    plant_version(real, outside, module, sha256_file(source))  # its checksum is right
    inside = store / "plain" / OLD_VERSION
    plant_version(real, inside, module, "0" * 64)
    yield Planted(module, outside, OLD_VERSION)
    shutil.rmtree(inside)


@contextlib.asynccontextmanager
async def worker(store: Path, redis_url: str, **options: object) -> AsyncIterator[StreamWorker]:
    """A StreamWorker for ``plain`` and ``split`` running on this loop until the block ends."""
    settings: dict[str, object] = {"models": ("plain", "split"), "heartbeat_ttl_s": 2.0,
                                   "claim_idle_ms": 300, "max_wait_ms": 5.0, **options}
    running = StreamWorker(WorkerOptions(store=str(store), redis_url=redis_url, **settings))  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(running.run(stop))
    client = redis.Redis.from_url(redis_url)
    try:
        for _ in range(250):  # its first heartbeat on every stream it serves
            live = [await client.zcard(live_key(*pair)) for pair in running.assignments()]
            if all(live):
                break
            await asyncio.sleep(0.02)
        yield running
    finally:
        await client.aclose()
        stop.set()
        await task


def jobs_count(running: StreamWorker, model: str, outcome: str) -> float:
    value = running.metrics.registry.get_sample_value(
        "latentsieve_worker_jobs_total", {"model": model, "outcome": outcome})
    return 0.0 if value is None else value


async def fresh_redis(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    return client


def newest(store: Path, model: str) -> str:
    version = LatentStore(store).newest(model)
    assert version is not None
    return version


# (name, stream model, stream shard, job fields to forge); "{...}" are filled in by the test.
FORGERIES = [
    ("path traversal version", "plain", 0, {"version": "{relative}"}),
    ("absolute version", "plain", 0, {"version": "{outside}"}),
    ("version in the store with a wrong module checksum", "plain", 0,
     {"version": "{inside_version}"}),
    ("reply key outside the prefix", "plain", 0, {"reply": "victim:reply"}),
    ("reply key with a second segment", "plain", 0, {"reply": "latentsieve:replies:gw:victim"}),
    ("reply key to a job stream", "plain", 0, {"reply": "latentsieve:jobs:split:1"}),
    ("model of another stream", "plain", 0, {"model": "split", "version": "{split}"}),
    ("shard of another stream", "split", 0, {"shard": 1}),
]


@pytest.mark.parametrize(("what", "model", "shard", "forged"), FORGERIES,
                         ids=[case[0] for case in FORGERIES])
async def test_a_forged_job_is_dead_lettered_and_nothing_it_names_is_used(
    store: Path, redis_url: str, planted: Planted, caplog: pytest.LogCaptureFixture,
    what: str, model: str, shard: int, forged: dict[str, object],
) -> None:
    client = await fresh_redis(redis_url)
    names = {"outside": planted.outside, "inside_version": planted.inside_version,
             "relative": os.path.relpath(planted.outside, store / "plain"),
             "split": newest(store, "split")}
    fields: dict[str, Any] = {"version": newest(store, model), "reply": REPLIES,
                              "model": model, "shard": shard}
    fields.update({key: value.format(**names) if isinstance(value, str) else value
                   for key, value in forged.items()})
    job = Job(f"forged-{uuid.uuid4().hex[:6]}", fields["reply"], time.time() + 30,
              fields["shard"], ScoreSpec(fields["model"], fields["version"], SIGMA),
              ShardQuery(np.zeros((2, DIM), dtype=np.float32)))
    stream, dead = job_stream(model, shard), dead_letter_stream(model, shard)
    with caplog.at_level(logging.ERROR, logger="latentsieve.workers.stream_worker"):
        async with worker(store, redis_url) as running:
            await client.xadd(stream, job.to_fields())  # type: ignore[arg-type]
            for _ in range(250):
                if await client.xlen(dead) and jobs_count(running, model, "error"):
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # time for a second record, a reply or a reclaim
            assert planted.module not in sys.modules, "the worker imported the planted module"
            assert jobs_count(running, model, "error") == 1, what
            assert jobs_count(running, model, "done") == 0
            assert set(running._loading) <= {"plain", "split"}  # only served models' names
            assert set(running._versions) <= {"plain", "split"}
    records = await client.xrange(dead)
    assert len(records) == 1
    ((_, record),) = records
    assert b"latents" not in record and record[b"reason"] and record[b"worker"]
    assert await client.xlen(stream) == 0  # acknowledged and deleted
    assert (await client.xpending(stream, GROUP))["pending"] == 0
    for key in ("victim:reply", "latentsieve:replies:gw:victim"):
        assert not await client.exists(key)  # nothing written outside the reply prefix
    assert await client.xlen("latentsieve:jobs:split:1") == 0
    if fields["reply"] == REPLIES:  # a valid reply key is told why, never answered "ok"
        replies = [Reply.from_fields(entry) for _, entry in await client.xrange(REPLIES)]
        assert [reply.status for reply in replies] == ["error"]
        assert 0 < await client.pttl(REPLIES) <= REPLY_TTL_S * 1000
    logged = [r for r in caplog.records if r.getMessage() in (
        "malformed job dropped", "job for a version that does not load dead-lettered")]
    assert len(logged) == 1 and logged[0].stream == stream  # type: ignore[attr-defined]
    await client.aclose()


async def test_names_in_jobs_do_not_grow_the_workers_tables(store: Path, redis_url: str) -> None:
    """Jobs naming many versions that do not exist (valid names) leave the worker's tables at
    one entry per served model, each with at most VERSIONS_KEPT versions."""
    client = await fresh_redis(redis_url)
    async with worker(store, redis_url) as running:
        for number in range(12):
            ghost = f"20000101T0000000000{number:02d}Z-0000aaaa"
            job = Job(f"ghost-version-{number}", REPLIES, time.time() + 30, 0,
                      ScoreSpec("plain", ghost, SIGMA),
                      ShardQuery(np.zeros((1, DIM), dtype=np.float32)))
            await client.xadd(job_stream("plain", 0), job.to_fields())  # type: ignore[arg-type]
        for _ in range(250):
            if jobs_count(running, "plain", "error") == 12:
                break
            await asyncio.sleep(0.02)
        assert jobs_count(running, "plain", "error") == 12
        assert set(running._loading) <= {"plain"}
        assert all(len(kept) <= VERSIONS_KEPT for kept in running._versions.values())
    assert await client.xlen(dead_letter_stream("plain", 0)) == 12
    await client.aclose()


async def test_a_late_reply_to_a_deleted_reply_stream_expires(
    store: Path, redis_url: str, training: np.ndarray
) -> None:
    """A gateway keeps its reply stream alive while it runs and deletes it at stop; a reply
    that arrives after that re-creates the stream, which then expires (PTTL > 0, bounded)."""
    client = await fresh_redis(redis_url)
    gateway = StreamCompute(redis_url, dict, QueueLimits(10, 10))
    await gateway.start()
    await client.xadd(gateway.replies, {"stray": "x"})  # the reader reads and deletes it
    await client.pexpire(gateway.replies, 1000)  # about to run out
    await asyncio.sleep(1.5)  # past it: the gateway renews it (every liveness read, 0.5 s)
    assert await client.exists(gateway.replies)
    assert 1000 < await client.pttl(gateway.replies) <= REPLY_TTL_S * 1000
    await gateway.stop()
    assert not await client.exists(gateway.replies)
    query = np.random.default_rng(22).standard_normal((2, DIM)).astype(np.float32)
    late = Job("late", gateway.replies, time.time() + 30, 0,
               ScoreSpec("plain", newest(store, "plain"), SIGMA), ShardQuery(query))
    async with worker(store, redis_url):
        await client.xadd(job_stream("plain", 0), late.to_fields())  # type: ignore[arg-type]
        answer = await client.xread({gateway.replies: "0-0"}, block=5000)
    assert answer, "no late reply"
    reply = Reply.from_fields(answer[0][1][0][1])
    assert reply.status == "ok" and reply.scores is not None
    np.testing.assert_allclose(reply.scores.log_sum,
                               log_density_reference(query, training, SIGMA) + np.log(N),
                               atol=1e-4, rtol=0)
    ttl = await client.pttl(gateway.replies)
    assert 0 < ttl <= REPLY_TTL_S * 1000, ttl  # -1 would be a stream that never goes away
    await client.aclose()


async def test_only_jobs_of_a_consumer_whose_heartbeat_lapsed_are_reclaimed(
    store: Path, redis_url: str, training: np.ndarray
) -> None:
    """``slowpoke`` reads a job and keeps heartbeating: it is only slow, so a worker with
    claim_idle_ms 300 leaves the job alone for many claim rounds. Once slowpoke's heartbeat
    lapses (Redis server time), the worker reclaims the job and answers it."""
    client = await fresh_redis(redis_url)
    stream, live = job_stream("plain", 0), live_key("plain", 0)
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    seconds, micros = await client.time()
    now_ms = seconds * 1000 + micros // 1000
    await client.zadd(live, {"slowpoke|cpu": now_ms + 60_000})
    query = np.random.default_rng(23).standard_normal((1, DIM)).astype(np.float32)
    job = Job("slow", REPLIES, time.time() + 60, 0,
              ScoreSpec("plain", newest(store, "plain"), SIGMA), ShardQuery(query))
    await client.xadd(stream, job.to_fields())  # type: ignore[arg-type]
    taken = await client.xreadgroup(GROUP, "slowpoke", {stream: ">"}, count=1)
    assert taken
    async with worker(store, redis_url, models=("plain",)) as running:
        await asyncio.sleep(2.0)  # about ten claim rounds past claim_idle_ms
        assert jobs_count(running, "plain", "reclaimed") == 0
        (pending,) = await client.xpending_range(stream, GROUP, "-", "+", 10)
        assert pending["consumer"] == b"slowpoke" and pending["times_delivered"] == 1
        assert not await client.exists(REPLIES)
        seconds, micros = await client.time()
        await client.zadd(live, {"slowpoke|cpu": seconds * 1000 + micros // 1000 - 1})
        answer = await client.xread({REPLIES: "0-0"}, block=5000)
        assert answer, "the job of a consumer whose heartbeat lapsed was not reclaimed"
        assert jobs_count(running, "plain", "reclaimed") == 1
    reply = Reply.from_fields(answer[0][1][0][1])
    assert reply.status == "ok" and reply.scores is not None
    np.testing.assert_allclose(reply.scores.log_sum,
                               log_density_reference(query, training, SIGMA) + np.log(N),
                               atol=1e-4, rtol=0)
    assert await client.xlen(stream) == 0
    assert (await client.xpending(stream, GROUP))["pending"] == 0
    await client.aclose()
