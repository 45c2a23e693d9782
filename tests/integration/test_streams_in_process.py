"""The Redis Streams transport with gateway and worker in this process (same event loop), over
a real ``redis-server``: quick to run, and what a mutation run can see (the process tests in
test_distributed.py run the installed code). Expected scores are float64 equation (1)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as redis
from conftest import free_port, start_redis

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.store import LatentStore
from latentsieve.service.cache import cache_keys
from latentsieve.service.settings import Settings
from latentsieve.service.stream_compute import StreamCompute
from latentsieve.workers import streams
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.density import log_density_reference
from latentsieve.workers.local_compute import LocalCompute, ModelBatchers
from latentsieve.workers.shard_scoring import (
    ShardKey,
    ShardQuery,
    ShardScorer,
    ShardScores,
    open_shards,
)
from latentsieve.workers.stream_worker import StreamWorker, WorkerOptions
from latentsieve.workers.streams import GROUP, Job, Reply, dead_letter_stream, job_stream, live_key
from latentsieve.workers.transport import QueueLimits, ScoreSpec, Work

pytestmark = pytest.mark.anyio
N, DIM, SIGMA = 600, 6, 1.2
PCA_DIM = 3


@pytest.fixture(scope="module")
def training() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((N, DIM)).astype(np.float32) * 2


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, training: np.ndarray) -> Path:
    root = tmp_path_factory.mktemp("streams") / "store"
    source = root.parent / "latents.npy"
    np.save(source, training)
    for name, shards in (("plain", 1), ("split", 3)):
        build_version(LatentStore(root), BuildOptions(
            model=name, latents_file=source, sigma=str(SIGMA), space="raw",
            calibration_count=200, shards=shards, progress=False,
        ), calibrate_build)
    build_version(LatentStore(root), BuildOptions(  # certified ivf: bounds through the streams
        model="lists", latents_file=source, sigma=str(SIGMA), space="raw", kind="ivf", nlist=8,
        calibration_count=200, shards=2, progress=False,
    ), calibrate_build)
    build_version(LatentStore(root), BuildOptions(  # scored in a 3-dim PCA space
        model="projected", latents_file=source, sigma=str(SIGMA), pca=PCA_DIM,
        calibration_count=200, progress=False,
    ), calibrate_build)
    return root


@contextlib.asynccontextmanager
async def worker(store: Path, redis_url: str, **options: object) -> AsyncIterator[StreamWorker]:
    """A StreamWorker running as a task of this loop until the block ends."""
    defaults: dict[str, object] = {"heartbeat_ttl_s": 2.0, "claim_idle_ms": 300,
                                   "max_wait_ms": 5.0}
    running = StreamWorker(WorkerOptions(
        store=str(store), redis_url=redis_url, **{**defaults, **options},  # type: ignore[arg-type]
    ))
    last = live_key(*running.assignments()[-1])
    stop = asyncio.Event()
    task = asyncio.create_task(running.run(stop))
    try:
        client = redis.Redis.from_url(redis_url)
        for _ in range(200):  # its first heartbeat on the last stream it serves
            if await client.zcard(last):
                break
            await asyncio.sleep(0.02)
        await client.aclose()
        yield running
    finally:
        stop.set()
        await task


def jobs_count(running: StreamWorker, model: str, outcome: str) -> float:
    """``latentsieve_worker_jobs_total{model, outcome}`` as the worker's /metrics shows it."""
    value = running.metrics.registry.get_sample_value(
        "latentsieve_worker_jobs_total", {"model": model, "outcome": outcome}
    )
    return 0.0 if value is None else value


async def counted(running: StreamWorker, model: str, outcome: str, value: float) -> float:
    """``jobs_count`` once it reaches ``value`` (or after 2 s): a worker counts a job after
    acknowledging it, which may be after its gateway has answered."""
    for _ in range(100):
        if jobs_count(running, model, outcome) >= value:
            break
        await asyncio.sleep(0.02)
    return jobs_count(running, model, outcome)


def settings(store: Path, redis_url: str, **extra: object) -> Settings:
    return Settings(store=store, redis_url=redis_url, compute="workers",  # type: ignore[arg-type]
                    reload_interval_s=60.0, cache_bytes=0, **extra)


async def test_sharded_and_plain_scores_match_float64_through_the_streams(
    store: Path, redis_url: str, serve: object, training: np.ndarray
) -> None:
    queries = np.random.default_rng(4).standard_normal((9, DIM)).astype(np.float32)
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()  # no heartbeat left by an earlier test's worker
    await client_redis.aclose()
    async with (
        worker(store, redis_url) as running,
        serve(settings(store, redis_url)) as client,  # type: ignore[operator]
    ):
        for sigma in (SIGMA, 0.4):  # 0.4: the calibration is scored through the workers too
            answers = await asyncio.gather(*(
                client.post("/score", json={"model": model, "latents": queries.tolist(),
                                            "sigma": sigma})
                for model in ("plain", "split")
            ))
            expected = log_density_reference(queries, training, sigma)
            percentiles = []
            for answer in answers:
                assert answer.status_code == 200, answer.text
                got = np.array([r["log_density"] for r in answer.json()["results"]])
                np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
                percentiles.append([r["percentile"] for r in answer.json()["results"]])
            assert percentiles[0] == percentiles[1]
        # Latents go to the workers as sent; the shard projects them (a PCA model).
        loaded = LatentStore(store).load("projected")
        assert loaded.projection is not None
        mean, components = loaded.projection
        for sigma in (SIGMA, 0.5):  # 0.5: leave-one-out rows, already projected, recalibrated
            projected = await client.post("/score", json={
                "model": "projected", "latents": queries.tolist(), "sigma": sigma})
            assert projected.status_code == 200, projected.text
            want = log_density_reference((queries - mean) @ components.T,
                                         (training - mean) @ components.T, sigma)
            got = np.array([r["log_density"] for r in projected.json()["results"]])
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        # A certified ivf model in 2 shards: each worker reply carries its shard's bounds, for
        # the bound asked, and the gateway merges the intervals.
        for max_error, sigma in ((0.3, SIGMA), (0.0, SIGMA), (0.05, 0.5)):
            answer = await client.post("/score", json={
                "model": "lists", "latents": queries.tolist(), "sigma": sigma,
                "max_error": max_error})
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            got = np.array([r["log_density"] for r in results])
            bounds = np.array([r["error_bound"] for r in results])
            want = log_density_reference(queries, training, sigma)
            assert np.all(bounds <= max(max_error, 1e-6))
            assert np.all(np.abs(got - want) <= bounds + 1e-6)  # float32 storage rounding
        # The cost model's decision, on the worker's own /metrics: every row of each of the
        # three requests, on both shards (calibration at sigma 0.5 adds more).
        rows = sum(running.metrics.registry.get_sample_value(
            "latentsieve_certified_rows", {"model": "lists", "path": path}) or 0.0
            for path in ("bounds", "probed", "dense", "bailed"))
        assert rows >= 3 * len(queries) * 2
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        assert [s["live_workers"] for s in models["split"]["compute"]["shards"]] == [1, 1, 1]
        assert (await client.get("/readyz")).status_code == 200
        done = await counted(running, "split", "done", 3 * 2)
        assert done >= 3 * 2  # every request and calibration block, on each of 3 shards


async def test_without_a_worker_requests_and_readyz_are_503(
    store: Path, redis_url: str, serve: object
) -> None:
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    await client_redis.aclose()
    async with serve(settings(store, redis_url)) as client:  # type: ignore[operator]
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "no live worker" in ready.json()["detail"]
        refused = await client.post("/score", json={"model": "plain", "latents": [[0.0] * DIM]})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "no live worker for plain shard 0" in refused.json()["detail"]


async def ghost_heartbeats(redis_url: str) -> redis.Redis:
    """A clean Redis with a live heartbeat (a minute) for every shard and the consumer groups,
    as a worker that is about to read jobs and die would leave them."""
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    seconds, micros = await client.time()
    expiry = seconds * 1000 + micros // 1000 + 60_000
    for model, shard in (("plain", 0), ("split", 0), ("split", 1), ("split", 2), ("projected", 0),
                         ("lists", 0), ("lists", 1)):
        await client.zadd(f"latentsieve:live:{model}:{shard}", {"ghost|cpu": expiry})
        await client.xgroup_create(job_stream(model, shard), GROUP, id="0", mkstream=True)
    return client


async def test_a_job_delivered_too_often_is_dead_lettered(
    store: Path, redis_url: str, serve: object
) -> None:
    client_redis = await ghost_heartbeats(redis_url)
    body = {"model": "plain", "latents": [[0.5] * DIM]}
    async with serve(settings(store, redis_url, request_timeout_s=20.0)) as client:  # type: ignore[operator]
        request = asyncio.create_task(client.post("/score", json=body))
        taken: list[object] = []
        for _ in range(100):  # the ghost reads the job (delivery 1 of at most 1) and dies
            taken = await client_redis.xreadgroup(GROUP, "ghost", {job_stream("plain", 0): ">"},
                                                  count=1, block=50)
            if taken:
                break
        assert taken
        await client_redis.zrem(live_key("plain", 0), "ghost|cpu")  # dead: its heartbeat lapses
        async with worker(store, redis_url, max_deliveries=1) as running:
            response = await asyncio.wait_for(request, 15)
            assert await counted(running, "plain", "dead_letter", 1) == 1
    assert response.status_code == 502 and "dead-letter" in response.json()["detail"]
    assert await client_redis.xlen(dead_letter_stream("plain", 0)) == 1
    # What an operator finds there: the job without its latents, where it came from, how often
    # it was delivered and which worker gave up; the caller's 502 names the stream.
    ((_, record),) = await client_redis.xrange(dead_letter_stream("plain", 0))
    assert b"latents" not in record and record[b"model"] == b"plain"
    assert record[b"stream_id"] == taken[0][1][0][0]  # type: ignore[index]
    assert int(record[b"deliveries"]) >= 2 and record[b"worker"]
    assert dead_letter_stream("plain", 0) in response.json()["detail"]
    assert await client_redis.xlen(job_stream("plain", 0)) == 0  # acknowledged and deleted
    await client_redis.aclose()


async def test_a_job_a_dead_consumer_held_is_reclaimed_and_answered(
    store: Path, redis_url: str, serve: object, training: np.ndarray
) -> None:
    # A consumer reads the job and dies (its heartbeat lapses); a live worker claims it once it
    # has been idle past claim_idle_ms (its second delivery, within max_deliveries 2) and
    # computes it.
    client_redis = await ghost_heartbeats(redis_url)
    latent = np.full((1, DIM), 0.5, dtype=np.float32)
    async with serve(settings(store, redis_url, request_timeout_s=20.0)) as client:  # type: ignore[operator]
        request = asyncio.create_task(
            client.post("/score", json={"model": "plain", "latents": latent.tolist()}))
        taken: list[object] = []
        for _ in range(100):
            taken = await client_redis.xreadgroup(GROUP, "ghost", {job_stream("plain", 0): ">"},
                                                  count=1, block=50)
            if taken:
                break
        assert taken
        await client_redis.zrem(live_key("plain", 0), "ghost|cpu")  # dead: its heartbeat lapses
        async with worker(store, redis_url, max_deliveries=2) as running:
            response = await asyncio.wait_for(request, 15)
            assert jobs_count(running, "plain", "reclaimed") == 1
            assert await counted(running, "plain", "done", 1) == 1
            assert jobs_count(running, "plain", "dead_letter") == 0
            sample = running.metrics.registry.get_sample_value
            assert sample("latentsieve_batch_size_count", {"model": "plain"}) == 1
            assert sample("latentsieve_batch_size_sum", {"model": "plain"}) == 1
            assert sample("latentsieve_compute_seconds_count",
                          {"model": "plain", "device": "cpu"}) == 1
    assert response.status_code == 200, response.text
    got = response.json()["results"][0]["log_density"]
    assert abs(got - log_density_reference(latent, training, SIGMA)[0]) <= 1e-4
    assert await client_redis.xlen(dead_letter_stream("plain", 0)) == 0
    assert await client_redis.xlen(job_stream("plain", 0)) == 0  # acknowledged and deleted
    await client_redis.aclose()


async def test_a_worker_serves_the_models_and_shards_it_is_given(
    store: Path, redis_url: str
) -> None:
    def serves(**options: object) -> list[tuple[str, int]]:
        return StreamWorker(WorkerOptions(
            store=str(store), redis_url=redis_url, **options)).assignments()  # type: ignore[arg-type]

    assert serves() == [("lists", 0), ("lists", 1), ("plain", 0), ("projected", 0),
                        ("split", 0), ("split", 1), ("split", 2)]
    assert serves(shards=(1,)) == [("lists", 1), ("split", 1)]
    assert serves(models=("split", "plain"), shards=(0, 2)) == [
        ("plain", 0), ("split", 0), ("split", 2)]
    assert serves(models=("nothing-here",)) == []


async def test_a_worker_checks_the_files_it_opens(
    store: Path, redis_url: str, serve: object, tmp_path: Path
) -> None:
    # The gateway opens no shard files; the worker verifies the ones it maps. One flipped byte
    # in a shard file: the request fails with the file named, and nothing is scored from it.
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    version = LatentStore(copy).newest("plain")
    assert version is not None
    damaged = copy / "plain" / version / "index.faiss"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    await client_redis.aclose()
    async with (
        worker(copy, redis_url, models=("plain",)) as running,
        serve(settings(copy, redis_url, request_timeout_s=20.0)) as client,  # type: ignore[operator]
    ):
        response = await client.post("/score", json={"model": "plain", "latents": [[0.1] * DIM]})
        assert response.status_code == 502, response.text
        assert "index.faiss: checksum mismatch" in response.json()["detail"]
        assert await counted(running, "plain", "error", 1) == 1
        assert jobs_count(running, "plain", "done") == 0


async def test_a_malformed_job_is_acknowledged_counted_and_logged(
    store: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    stream = job_stream("plain", 0)
    with caplog.at_level(logging.ERROR, logger="latentsieve.workers.stream_worker"):
        async with worker(store, redis_url, models=("plain",)) as running:
            await client_redis.xadd(stream, {"id": "j-1", "shape": "not,a,shape"})
            for _ in range(250):
                if jobs_count(running, "plain", "error") and not await client_redis.xlen(stream):
                    break
                await asyncio.sleep(0.02)
            assert jobs_count(running, "plain", "error") == 1
            assert jobs_count(running, "plain", "done") == 0
            assert await client_redis.xlen(stream) == 0  # acknowledged and deleted, not retried
            assert (await client_redis.xpending(stream, GROUP))["pending"] == 0
    dropped = [r for r in caplog.records if r.getMessage() == "malformed job dropped"]
    assert len(dropped) == 1 and dropped[0].stream == stream  # type: ignore[attr-defined]
    assert "ValueError" in dropped[0].error or "KeyError" in dropped[0].error  # type: ignore[attr-defined]
    await client_redis.aclose()


async def test_a_job_past_its_deadline_is_dropped_not_computed(
    store: Path, redis_url: str, serve: object
) -> None:
    client_redis = await ghost_heartbeats(redis_url)
    body = {"model": "plain", "latents": [[0.25] * DIM]}
    async with serve(settings(store, redis_url, request_timeout_s=0.3)) as client:  # type: ignore[operator]
        response = await client.post("/score", json=body)
        assert response.status_code == 504, response.text
        assert await client_redis.xlen(job_stream("plain", 0)) == 1  # nobody took it
        async with worker(store, redis_url) as running:
            for _ in range(100):
                if not await client_redis.xlen(job_stream("plain", 0)):
                    break
                await asyncio.sleep(0.02)
            assert jobs_count(running, "plain", "expired") == 1
            assert jobs_count(running, "plain", "done") == 0
    assert await client_redis.xlen(job_stream("plain", 0)) == 0
    await client_redis.aclose()


async def test_a_worker_scores_the_version_a_job_names(
    tmp_path: Path, redis_url: str
) -> None:
    """During a roll-out a gateway may still send the previous version: the worker loads and
    scores that one, not the newest (float64 reference over each version's own latents)."""
    store = tmp_path / "store"
    rng = np.random.default_rng(5)
    versions = []
    for count in (300, 400):
        source = tmp_path / f"v{count}.npy"
        np.save(source, rng.standard_normal((count, DIM)).astype(np.float32))
        built = build_version(LatentStore(store), BuildOptions(
            model="rolling", latents_file=source, sigma="1.0", space="raw",
            calibration_count=50, progress=False,
        ), calibrate_build)
        versions.append((built.name, np.load(source)))
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    query = rng.standard_normal((3, DIM)).astype(np.float32)
    async with worker(store, redis_url, models=("rolling",)):
        for number, (version, _) in enumerate(versions):
            job = Job(f"job-{number}", "latentsieve:replies:test", time.time() + 30, 0,
                      ScoreSpec("rolling", version, 1.0), ShardQuery(query))
            await client_redis.xadd(job_stream("rolling", 0), job.to_fields())  # type: ignore[arg-type]
        replies: dict[str, Reply] = {}
        last = "0-0"
        for _ in range(200):
            answer = await client_redis.xread({"latentsieve:replies:test": last}, block=50)
            for _, entries in answer:
                for entry_id, fields in entries:
                    last = entry_id
                    reply = Reply.from_fields(fields)
                    replies[reply.id] = reply
            if len(replies) == 2:
                break
    for number, (_, latents) in enumerate(versions):
        reply = replies[f"job-{number}"]
        assert reply.status == "ok" and reply.scores is not None, reply.detail
        expected = log_density_reference(query, latents, 1.0) + np.log(len(latents))
        np.testing.assert_allclose(reply.scores.log_sum, expected, atol=1e-4, rtol=0)
    await client_redis.aclose()


def queue_depths(metrics_text: str) -> dict[str, float]:
    """``latentsieve_queue_depth{model}`` from a /metrics page."""
    found = {}
    for line in metrics_text.splitlines():
        if line.startswith("latentsieve_queue_depth{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('model="')[1].split('"')[0]] = float(value)
    return found


async def test_the_gateway_keeps_its_books_and_ignores_stray_replies(
    store: Path, redis_url: str, serve: object, training: np.ndarray
) -> None:
    """After answered, timed-out and concurrent requests the gateway's queue is empty again (a
    leak would end in spurious 429s), a reply for a job nobody waits for (a late duplicate
    after a reclaim) leaves the reply reader working, and each gateway reads its own stream."""
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    queries = np.random.default_rng(8).standard_normal((5, DIM)).astype(np.float32)
    try:
        async with worker(store, redis_url), serve(settings(  # type: ignore[operator]
            store, redis_url, model_queue_limit=len(queries) * 3)) as client:
            answers = await asyncio.gather(*(
                client.post("/score", json={"model": model, "latents": (queries + i).tolist()})
                for i in range(3) for model in ("plain", "split")
            ))
            assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
            (replies,) = [key async for key in client_redis.scan_iter("latentsieve:replies:*")]
            stray = Reply("no-such-job", 0, "ok", ShardScores(np.zeros(1), {}))
            await client_redis.xadd(replies, stray.to_fields())  # type: ignore[arg-type]
            await client_redis.xadd(replies, Reply("gone", 0, "error", None, "x").to_fields())  # type: ignore[arg-type]
            later = await client.post("/score", json={"model": "plain",
                                                      "latents": (queries - 7).tolist()})
            assert later.status_code == 200, later.text
            np.testing.assert_allclose(
                [r["log_density"] for r in later.json()["results"]],
                log_density_reference(queries - 7, training, SIGMA), atol=1e-4, rtol=0)
            depths = queue_depths((await client.get("/metrics")).text)
            assert depths == {"plain": 0.0, "split": 0.0, "projected": 0.0, "lists": 0.0}
            # The whole model queue at once still fits: nothing was left counted.
            full = await client.post("/score", json={
                "model": "split", "latents": np.tile(queries + 20, (3, 1)).tolist()})
            assert full.status_code == 200, full.text
    finally:
        await client_redis.aclose()


async def test_two_gateways_read_their_own_reply_streams(redis_url: str) -> None:
    counts = dict
    first = StreamCompute(redis_url, counts, QueueLimits(10, 10))
    second = StreamCompute(redis_url, counts, QueueLimits(10, 10))
    assert first.replies != second.replies
    assert first.replies.startswith("latentsieve:replies:") and first.gateway in first.replies


async def test_a_silent_redis_is_reported_not_waited_for() -> None:
    """A Redis that accepts connections and never answers: the gateway transport starts within
    its socket timeouts, says Redis is what is missing, and stops."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        compute = StreamCompute(url, lambda: {"plain": 1}, QueueLimits(10, 10),
                                socket_timeout_s=0.3)
        await asyncio.wait_for(compute.start(), timeout=5)
        try:
            (missing,) = compute.missing()
            assert missing.startswith(f"Redis at {url}")
        finally:
            await asyncio.wait_for(compute.stop(), timeout=10)


async def test_readiness_is_per_model_and_expired_heartbeats_do_not_count(
    store: Path, redis_url: str, serve: object
) -> None:
    """A worker serving only ``plain`` makes ``plain`` answerable while ``split`` (no worker)
    gets 503 and so does /readyz; a heartbeat whose expiry (Redis server time) has passed is no
    worker at all."""
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    seconds, micros = await client_redis.time()
    now_ms = seconds * 1000 + micros // 1000
    await client_redis.zadd("latentsieve:live:projected:0", {"stale|cpu": now_ms - 1500})
    body = {"latents": [[0.25] * DIM]}
    try:
        async with serve(settings(store, redis_url, request_timeout_s=3.0)) as client:  # type: ignore[operator]
            stale = await client.post("/score", json={"model": "projected", **body})
            assert stale.status_code == 503, stale.text
            async with worker(store, redis_url, models=("plain",)):
                for _ in range(50):  # the gateway reads heartbeats every 0.5 s
                    plain = await client.post("/score", json={"model": "plain", **body})
                    if plain.status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                assert plain.status_code == 200, plain.text
                split = await client.post("/score", json={"model": "split", **body})
                assert split.status_code == 503 and "split shard 0" in split.json()["detail"]
                assert (await client.get("/readyz")).status_code == 503
    finally:
        await client_redis.aclose()


async def test_a_job_that_expires_in_the_workers_queue_is_dropped_not_computed(
    store: Path, redis_url: str
) -> None:
    """Read in time, the job waits in the worker's batcher for a batch to fill (max_wait_ms 2 s)
    and its deadline passes there: it is acknowledged and counted expired, never computed, and
    no reply is sent (the gateway has already answered 504)."""
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    replies, stream = "latentsieve:replies:expiry", job_stream("plain", 0)
    version = LatentStore(store).newest("plain")
    assert version is not None
    async with worker(store, redis_url, models=("plain",), max_wait_ms=2000.0) as running:
        sent = time.monotonic()
        job = Job("late", replies, time.time() + 0.8, 0, ScoreSpec("plain", version, SIGMA),
                  ShardQuery(np.zeros((2, DIM), dtype=np.float32)))
        await client_redis.xadd(stream, job.to_fields())  # type: ignore[arg-type]
        for _ in range(200):
            if jobs_count(running, "plain", "expired"):
                break
            await asyncio.sleep(0.02)
        assert jobs_count(running, "plain", "expired") == 1
        assert time.monotonic() - sent < 2.0  # dropped at its deadline, not after the wait
        await asyncio.sleep(max(0.0, 2.4 - (time.monotonic() - sent)))  # past max_wait_ms
        assert jobs_count(running, "plain", "done") == 0
        computed = running.metrics.registry.get_sample_value(
            "latentsieve_batch_size_count", {"model": "plain"})
        assert computed == 0
        assert await client_redis.xlen(replies) == 0
        assert await client_redis.xlen(stream) == 0  # acknowledged and deleted
        assert (await client_redis.xpending(stream, GROUP))["pending"] == 0
    await client_redis.aclose()


async def test_descriptors_travel_through_the_streams(
    store_root: Path, redis_url: str, serve: object
) -> None:
    """psi, nu and delta asked of a model with a generator come back from its worker (shard 0
    computes them) equal to the embedded engine's, with the same log densities."""
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    await client_redis.aclose()
    latents = np.random.default_rng(11).standard_normal((3, 8)).astype(np.float32)
    body = {"model": "digits-vae", "latents": latents.tolist(),
            "descriptors": ["psi", "nu", "delta"]}
    local = Settings(store=store_root, reload_interval_s=60.0, cache_bytes=0)
    async with serve(local) as client:  # type: ignore[operator]
        embedded = await client.post("/score", json=body)
    assert embedded.status_code == 200, embedded.text
    async with (
        worker(store_root, redis_url, models=("digits-vae",)),
        serve(settings(store_root, redis_url, request_timeout_s=30.0)) as client,  # type: ignore[operator]
    ):
        remote = await client.post("/score", json=body)
    assert remote.status_code == 200, remote.text
    for got, want in zip(remote.json()["results"], embedded.json()["results"], strict=True):
        assert set(got["descriptors"]) == set(want["descriptors"]) >= {"psi", "nu", "delta"}
        for name in want["descriptors"]:
            assert got["descriptors"][name] == pytest.approx(want["descriptors"][name],
                                                             rel=1e-4, abs=1e-6)
        assert got["log_density"] == pytest.approx(want["log_density"], abs=1e-4)


async def test_a_redis_restart_is_survived_by_gateway_and_worker(
    store: Path, tmp_path: Path, serve: object, training: np.ndarray
) -> None:
    """Redis goes away under a running gateway and worker: requests fail fast with 503 naming
    Redis, and once a fresh Redis (no streams, no groups) is back on the same port the worker
    re-creates its group and heartbeat and the gateway answers again, float64-exact."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(tmp_path, port)
    latents = np.random.default_rng(12).standard_normal((2, DIM)).astype(np.float32)
    body = {"model": "plain", "latents": latents.tolist()}
    try:
        async with (
            worker(store, url, models=("plain",)) as running,
            serve(settings(store, url, request_timeout_s=10.0)) as client,  # type: ignore[operator]
        ):
            assert (await client.post("/score", json=body)).status_code == 200
            # Acknowledged (after its reply) before Redis goes, or the restart loses the ack.
            assert await counted(running, "plain", "done", 1) == 1
            server.terminate()
            server.wait(timeout=10)
            started = time.monotonic()
            during = await client.post("/score", json=body)
            assert during.status_code == 503 and "Redis" in during.json()["detail"], during.text
            assert time.monotonic() - started < 5
            server = start_redis(tmp_path, port)
            after = during
            for _ in range(150):
                after = await client.post("/score", json=body)
                if after.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert after.status_code == 200, after.text
            np.testing.assert_allclose(
                [r["log_density"] for r in after.json()["results"]],
                log_density_reference(latents, training, SIGMA), atol=1e-4, rtol=0)
            assert await counted(running, "plain", "done", 2) == 2
            fresh = redis.Redis.from_url(url)
            groups = await fresh.xinfo_groups(job_stream("plain", 0))
            await fresh.aclose()
            assert [group["name"] for group in groups] == [GROUP.encode()]
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(("limits", "second"), [
    ({"model_queue_limit": 4}, "plain"),   # the model's own cap
    ({"queue_limit": 4}, "split"),         # the gateway's cap over every model
])
async def test_a_full_queue_is_429_with_retry_after(
    store: Path, redis_url: str, serve: object, limits: dict[str, int], second: str
) -> None:
    """Three latents wait for a worker that never reads (a live ghost); two more would pass the
    cap of four: 429 at once with Retry-After, and the waiting request is unaffected."""
    client_redis = await ghost_heartbeats(redis_url)
    rows = np.random.default_rng(13).standard_normal((5, DIM)).astype(np.float32)
    async with serve(settings(store, redis_url, request_timeout_s=1.0, **limits)) as client:  # type: ignore[operator]
        waiting = asyncio.create_task(
            client.post("/score", json={"model": "plain", "latents": rows[:3].tolist()}))
        for _ in range(100):  # its job is in the stream: its three latents are queued
            if await client_redis.xlen(job_stream("plain", 0)):
                break
            await asyncio.sleep(0.02)
        started = time.monotonic()
        refused = await client.post("/score", json={"model": second,
                                                    "latents": rows[3:].tolist()})
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert "queued" in refused.json()["detail"] and "4" in refused.json()["detail"]
        assert (await waiting).status_code == 504  # nobody computed it; not refused
        again = await client.post("/score", json={"model": second, "latents": rows[3:].tolist()})
        assert again.status_code == 504, again.text  # the books are clear: queued, not refused
    await client_redis.aclose()


async def test_heartbeats_stay_fresh_and_leave_with_the_worker(
    store: Path, redis_url: str
) -> None:
    """A worker's heartbeat expires one TTL after Redis's clock and is renewed well before
    that, so its live entry never lapses while it runs; a clean stop removes it at once."""
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    live = live_key("plain", 0)
    async with worker(store, redis_url, models=("plain",), heartbeat_ttl_s=0.6):
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            seconds, micros = await client_redis.time()
            now_ms = seconds * 1000 + micros // 1000
            entries = await client_redis.zrange(live, 0, -1, withscores=True)
            assert len(entries) == 1, entries
            ((member, expiry),) = entries
            assert member.endswith(b"|cpu")
            assert now_ms < expiry <= now_ms + 600 + 50, (expiry - now_ms)
            await asyncio.sleep(0.05)
    assert await client_redis.zcard(live) == 0  # gone before its TTL would have run out
    await client_redis.aclose()


async def test_a_worker_stops_cleanly_while_redis_is_down(store: Path, tmp_path: Path) -> None:
    port = free_port()
    server = start_redis(tmp_path, port)
    try:
        async with worker(store, f"redis://127.0.0.1:{port}/0", models=("plain",)):
            server.terminate()
            server.wait(timeout=10)
            await asyncio.sleep(0.2)
        # Leaving the block stopped the worker: its goodbye to Redis failed and was let go.
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_a_model_published_after_the_start_is_served(
    store: Path, redis_url: str, tmp_path: Path
) -> None:
    """The worker re-reads the store every refresh_interval_s: a model built while it runs gets
    its consumer group and its jobs answered, float64-exact."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    rng = np.random.default_rng(14)
    latents = rng.standard_normal((200, DIM)).astype(np.float32)
    query = rng.standard_normal((2, DIM)).astype(np.float32)
    replies = "latentsieve:replies:late"
    async with worker(copy, redis_url, refresh_interval_s=0.2):
        source = tmp_path / "late.npy"
        np.save(source, latents)
        version = build_version(LatentStore(copy), BuildOptions(
            model="late", latents_file=source, sigma="1.0", space="raw", calibration_count=50,
            progress=False), calibrate_build).name
        for _ in range(150):  # picked up: it heartbeats for the new model
            if await client_redis.zcard(live_key("late", 0)):
                break
            await asyncio.sleep(0.02)
        job = Job("late-1", replies, time.time() + 30, 0, ScoreSpec("late", version, 1.0),
                  ShardQuery(query))
        await client_redis.xadd(job_stream("late", 0), job.to_fields())  # type: ignore[arg-type]
        answer = await client_redis.xread({replies: "0-0"}, block=5000)
        assert answer, "no reply for the new model's job"
        reply = Reply.from_fields(answer[0][1][0][1])
        assert reply.status == "ok" and reply.scores is not None, reply.detail
        expected = log_density_reference(query, latents, 1.0) + np.log(len(latents))
        np.testing.assert_allclose(reply.scores.log_sum, expected, atol=1e-4, rtol=0)
    await client_redis.aclose()


async def test_a_job_whose_reply_cannot_be_written_is_retried_then_dead_lettered(
    store: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The reply stream's key holds a string, so every XADD of a reply fails: the job stays
    pending, the same worker reclaims it after claim_idle_ms, and past max_deliveries it goes
    to the dead-letter stream (at-least-once: a failed reply is never a lost job)."""
    client_redis = redis.Redis.from_url(redis_url)
    await client_redis.flushdb()
    replies = "latentsieve:replies:broken"
    await client_redis.set(replies, "not a stream")
    version = LatentStore(store).newest("plain")
    assert version is not None
    job = Job("unanswerable", replies, time.time() + 30, 0, ScoreSpec("plain", version, SIGMA),
              ShardQuery(np.zeros((1, DIM), dtype=np.float32)))
    with caplog.at_level(logging.WARNING, logger="latentsieve.workers.stream_worker"):
        async with worker(store, redis_url, models=("plain",), max_deliveries=2) as running:
            await client_redis.xadd(job_stream("plain", 0), job.to_fields())  # type: ignore[arg-type]
            for _ in range(250):
                if await client_redis.xlen(dead_letter_stream("plain", 0)):
                    break
                await asyncio.sleep(0.02)
            assert await client_redis.xlen(dead_letter_stream("plain", 0)) == 1
            assert jobs_count(running, "plain", "reclaimed") >= 1
            assert jobs_count(running, "plain", "done") == 0
    failed = [r for r in caplog.records if r.getMessage().startswith("could not reply")]
    assert len(failed) >= 2 and "WRONGTYPE" in failed[0].error  # type: ignore[attr-defined]
    assert await client_redis.xlen(job_stream("plain", 0)) == 0
    await client_redis.aclose()


@dataclasses.dataclass(frozen=True)
class DummySpec(ScoreSpec):
    """``ScoreSpec`` with one field more, added the way a contributor adds one: nothing else
    in the transports, the wire form or the cache key is edited for it."""

    dummy: str | None = None


async def test_a_field_added_to_the_spec_reaches_the_worker_and_the_cache_key(
    store: Path, redis_url: str, training: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The field travels from the ``Work`` through each transport to every shard's batch key
    (in process, and over the wire to a worker that decodes jobs with the new spec), and it
    changes the cache key."""
    monkeypatch.setattr(streams, "ScoreSpec", DummySpec)  # the worker's job decoder
    seen: list[ScoreSpec] = []
    score = ShardScorer.score

    def recording(self: ShardScorer, key: ShardKey, query: ShardQuery) -> ShardScores:
        seen.append(key.spec)
        return score(self, key, query)

    monkeypatch.setattr(ShardScorer, "score", recording)
    loaded = LatentStore(store).load("split")
    spec = DummySpec("split", loaded.manifest.version, SIGMA, dummy="added")
    latents = np.random.default_rng(8).standard_normal((3, DIM)).astype(np.float32)
    expected = log_density_reference(latents, training, SIGMA)
    loop = asyncio.get_running_loop()

    local = LocalCompute(ModelBatchers(64, 1.0, QueueLimits(100, 100)))
    try:
        work = Work(spec, ShardQuery(latents), N, 3, open_shards(loaded))
        computed = await local.compute(work, loop.time() + 30)
    finally:
        await local.stop()
    np.testing.assert_allclose(computed.log_density, expected, atol=1e-4, rtol=0)
    assert [(type(got), got.dummy) for got in seen] == [(DummySpec, "added")] * 3
    seen.clear()

    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    await client.aclose()
    async with worker(store, redis_url, models=("split",)):
        gateway = StreamCompute(redis_url, lambda: {"split": 3}, QueueLimits(100, 100))
        await gateway.start()
        try:
            computed = await gateway.compute(Work(spec, ShardQuery(latents), N, 3),
                                             loop.time() + 30)
        finally:
            await gateway.stop()
    np.testing.assert_allclose(computed.log_density, expected, atol=1e-4, rtol=0)
    assert sorted((type(got), got.dummy) for got in seen) == [(DummySpec, "added")] * 3

    keys = {cache_keys(dataclasses.replace(spec, dummy=value), latents)[0]
            for value in (None, "added", "other")}
    assert len(keys) == 3
