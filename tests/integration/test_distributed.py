"""``serve --compute workers`` in front of real ``latentsieve worker`` processes over a real
``redis-server``: work spreads over two workers, a ``kill -9`` under load loses no request, a
Redis restart is survived, small requests are coalesced, a 2-shard index scores as the
unsharded one, and the 429, 503, 504 (expired job) and dead-letter paths answer as documented.
Every expected score is the float64 equation (1), never the service's own engine."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from conftest import free_port, start_redis
from servers import Server, Worker, running_server, start_worker

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.store import LatentStore
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.density import log_density_reference
from latentsieve.workers.streams import GROUP, dead_letter_stream, job_stream

PLAIN, SPLIT = "plain", "split"
N, DIM, SIGMA = 3000, 12, 1.5
TOLERANCE = 1e-4  # nats, docs/contract.md §1
FAST = ("--claim-idle-ms", "1000", "--heartbeat-ttl", "1.5", "--max-wait-ms", "5")


def clustered(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM)) * 4
    return (centres[rng.integers(0, 20, count)] + rng.standard_normal((count, DIM))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def training() -> np.ndarray:
    return clustered(N, 0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, training: np.ndarray) -> Path:
    """One dataset built twice: unsharded (``plain``) and as two shards (``split``)."""
    root = tmp_path_factory.mktemp("distributed") / "store"
    source = root.parent / "latents.npy"
    np.save(source, training)
    for name, shards in ((PLAIN, 1), (SPLIT, 2)):
        options = BuildOptions(
            model=name, latents_file=source, sigma=str(SIGMA), space="raw",
            calibration_count=400, shards=shards, progress=False,
        )
        build_version(LatentStore(root), options, calibrate_build)
    return root


@dataclass
class Cluster:
    """A Redis, workers and a gateway in front of them."""

    store: Path
    redis_url: str
    redis: subprocess.Popen[bytes]
    redis_port: int
    workdir: Path
    workers: list[Worker]
    gateway: Server | None = None

    def add_worker(self, *args: str) -> Worker:
        log = self.workdir / f"worker-{len(self.workers)}.log"
        worker = start_worker(self.store, self.redis_url, log, *FAST, *args)
        self.workers.append(worker)
        return worker

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)


@contextlib.contextmanager
def cluster(
    store: Path, workdir: Path, workers: int, env: dict[str, str] | None = None,
    worker_args: tuple[str, ...] = (), prepare: Callable[[Cluster], None] | None = None,
) -> Iterator[Cluster]:
    """Redis, ``workers`` workers and a gateway; ``prepare`` runs before the gateway starts."""
    port = free_port()
    process = start_redis(workdir, port)
    url = f"redis://127.0.0.1:{port}/0"
    running = Cluster(store, url, process, port, workdir, [])
    try:
        for _ in range(workers):
            running.add_worker(*worker_args)
        if prepare is not None:
            prepare(running)
        with running_server(
            store, 600.0, workdir / "gateway.log",
            env={"LATENTSIEVE_REQUEST_TIMEOUT_S": "30", **(env or {})},
            args=("--compute", "workers", "--redis", url),
        ) as gateway:
            running.gateway = gateway
            yield running
    finally:
        for worker in running.workers:
            worker.stop()
        running.redis.terminate()  # the one running now: a test may have restarted it
        running.redis.wait(timeout=10)


@pytest.fixture(scope="module")
def pair(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(store, tmp_path_factory.mktemp("pair"), workers=2) as running:
        yield running


def score(gateway: Server, model: str, latents: np.ndarray, **extra: object) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/score", json={"model": model, "latents": latents.tolist(), **extra},
        timeout=60,
    )


def metric_sum(text: str, name: str, labels: str = ".*") -> float:
    pattern = rf"^{re.escape(name)}\{{{labels}\}} (\S+)$"
    return sum(float(value) for value in re.findall(pattern, text, flags=re.MULTILINE))


def test_two_workers_take_work_and_scores_match_float64(
    pair: Cluster, training: np.ndarray
) -> None:
    assert pair.gateway is not None
    queries = clustered(64, 1)
    expected = log_density_reference(queries, training, SIGMA)

    def one(row: int) -> float:
        response = score(pair.gateway, PLAIN, queries[row : row + 1])  # type: ignore[arg-type]
        assert response.status_code == 200, response.text
        return float(response.json()["results"][0]["log_density"])

    with ThreadPoolExecutor(16) as pool:
        got = np.array(list(pool.map(one, range(len(queries)))))
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    done = [
        metric_sum(w.metrics(), "latentsieve_worker_jobs_total", 'model="plain",outcome="done"')
        for w in pair.workers
    ]
    assert all(count > 0 for count in done), done
    models = httpx.get(f"{pair.gateway.url}/models", timeout=10).json()["models"]
    split = {m["name"]: m for m in models}[SPLIT]
    assert split["shards"] == 2 and split["compute"]["mode"] == "workers"
    assert [s["live_workers"] for s in split["compute"]["shards"]] == [2, 2]
    assert split["compute"]["shards"][0]["devices"] == ["cpu"]


def test_two_shards_score_as_one_index(pair: Cluster, training: np.ndarray) -> None:
    assert pair.gateway is not None
    queries = clustered(40, 2)
    for sigma in (SIGMA, 0.6):  # the build's sigma, and one calibrated through the shards
        plain = score(pair.gateway, PLAIN, queries, sigma=sigma).json()["results"]
        split = score(pair.gateway, SPLIT, queries, sigma=sigma).json()["results"]
        expected = log_density_reference(queries, training, sigma)
        for results in (plain, split):
            got = np.array([row["log_density"] for row in results])
            np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
        # Same leave-one-out calibration rows, summed across shards: the same percentiles.
        assert [row["percentile"] for row in plain] == [row["percentile"] for row in split]


def test_concurrent_small_requests_are_coalesced(pair: Cluster) -> None:
    assert pair.gateway is not None
    before = [(metric_sum(w.metrics(), "latentsieve_batch_size_sum", 'model="split"'),
               metric_sum(w.metrics(), "latentsieve_batch_size_count", 'model="split"'))
              for w in pair.workers]
    queries = clustered(96, 3)

    def one(row: int) -> int:
        return score(pair.gateway, SPLIT, queries[row : row + 1]).status_code  # type: ignore[arg-type]

    with ThreadPoolExecutor(32) as pool:
        assert set(pool.map(one, range(len(queries)))) == {200}
    latents = batches = 0.0
    for worker, (sum_before, count_before) in zip(pair.workers, before, strict=True):
        text = worker.metrics()
        latents += metric_sum(text, "latentsieve_batch_size_sum", 'model="split"') - sum_before
        batches += metric_sum(text, "latentsieve_batch_size_count", 'model="split"') - count_before
    assert latents == 2 * len(queries)  # every latent computed once on each of the 2 shards
    assert latents / batches > 1.0, (latents, batches)  # requests carry 1 latent each


def test_kill_9_of_a_worker_under_load_loses_no_request(
    store: Path, training: np.ndarray, tmp_path: Path
) -> None:
    queries = clustered(256, 4)
    expected = log_density_reference(queries, training, SIGMA)
    with cluster(store, tmp_path, workers=2) as running:
        assert running.gateway is not None
        gateway = running.gateway
        stop = threading.Event()
        failures: list[str] = []
        answered = [0]

        def client(offset: int) -> None:
            with httpx.Client(base_url=gateway.url, timeout=60) as http:
                row = offset
                while not stop.is_set():
                    batch = queries[row % len(queries) : row % len(queries) + 4]
                    response = http.post("/score", json={"model": SPLIT,
                                                         "latents": batch.tolist()})
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text}")
                        continue
                    got = np.array([r["log_density"] for r in response.json()["results"]])
                    want = expected[row % len(queries) : row % len(queries) + 4]
                    if not np.allclose(got, want, atol=TOLERANCE, rtol=0):
                        failures.append(f"scores off by {np.abs(got - want).max()}")
                    answered[0] += 1
                    row += 32

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        victim = running.workers[0]
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        before_kill = answered[0]
        time.sleep(4.0)  # past claim_idle_ms and the heartbeat TTL: the survivor carries on
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
        survivor = running.workers[1].metrics()
    assert not failures, failures[:3]
    assert before_kill > 0 and answered[0] > before_kill
    print("reclaimed by the survivor:", metric_sum(
        survivor, "latentsieve_worker_jobs_total", 'model="split",outcome="reclaimed"'))
    assert metric_sum(survivor, "latentsieve_worker_jobs_total", 'model="split",outcome="done"')


def test_redis_restart_is_survived(store: Path, tmp_path: Path) -> None:
    queries = clustered(4, 5)
    with cluster(store, tmp_path, workers=1) as running:
        assert running.gateway is not None
        assert score(running.gateway, PLAIN, queries).status_code == 200
        running.redis.terminate()
        running.redis.wait(timeout=10)
        started = time.monotonic()
        during = score(running.gateway, PLAIN, queries)
        assert during.status_code == 503, during.text
        assert "Redis" in during.json()["detail"]
        assert time.monotonic() - started < 5  # fails fast, not at the 30 s deadline
        running.redis = start_redis(tmp_path, running.redis_port)
        deadline = time.monotonic() + 30
        while True:
            after = score(running.gateway, PLAIN, queries)
            if after.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert after.status_code == 200, after.text
        # Ready again within a few liveness reads. (Seen once on a loaded machine: 503 just
        # after the first 200; the cause was not pinned down, so a lasting one names itself.)
        deadline = time.monotonic() + 10
        while (ready := httpx.get(f"{running.gateway.url}/readyz", timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.2)
        # Both processes survived the outage: no restart was needed.
        assert running.gateway.process.poll() is None
        assert running.workers[0].process.poll() is None


def test_no_live_worker_is_503_at_once(store: Path, tmp_path: Path) -> None:
    queries = clustered(2, 6)
    with cluster(store, tmp_path, workers=1) as running:
        assert running.gateway is not None
        running.workers[0].stop()  # a clean exit removes its heartbeat
        deadline = time.monotonic() + 5
        while httpx.get(f"{running.gateway.url}/readyz", timeout=5).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ready = httpx.get(f"{running.gateway.url}/readyz", timeout=5)
        assert ready.status_code == 503 and "plain shard 0" in ready.json()["detail"]
        started = time.monotonic()
        refused = score(running.gateway, PLAIN, queries)
        assert refused.status_code == 503 and "no live worker" in refused.json()["detail"]
        assert time.monotonic() - started < 2
        gauges = httpx.get(f"{running.gateway.url}/metrics", timeout=5).text
        assert 'latentsieve_live_workers{model="split",shard="1"} 0.0' in gauges


def test_queue_cap_is_429_and_expired_jobs_are_dropped(store: Path, tmp_path: Path) -> None:
    env = {"LATENTSIEVE_MODEL_QUEUE_LIMIT": "4", "LATENTSIEVE_REQUEST_TIMEOUT_S": "1"}
    with cluster(store, tmp_path, workers=1, env=env,
                 worker_args=("--heartbeat-ttl", "30")) as running:
        assert running.gateway is not None
        gateway, worker = running.gateway, running.workers[0]
        worker.process.send_signal(signal.SIGSTOP)  # holds no job; its heartbeat stays live
        try:
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(score, gateway, PLAIN, clustered(3, 7))
                time.sleep(0.3)
                second = score(gateway, PLAIN, clustered(3, 8))
                assert second.status_code == 429, second.text
                assert second.headers["retry-after"] == "1"
                assert "plain" in second.json()["detail"]
                assert first.result().status_code == 504  # nobody computed it in time
        finally:
            worker.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while True:
            text = worker.metrics()
            expired = metric_sum(text, "latentsieve_worker_jobs_total",
                                 r'model="plain",outcome="expired"')
            if expired >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert expired == 1
        assert metric_sum(text, "latentsieve_worker_jobs_total",
                          r'model="plain",outcome="done"') == 0
        assert metric_sum(text, "latentsieve_batch_size_count", 'model="plain"') == 0


def ghost_worker(running: Cluster) -> None:
    """A worker that registered, will read a job and die: heartbeats for every shard (valid
    for a minute, until the test lets one lapse as a dead worker's does) and the consumer
    groups, written straight to Redis."""
    client = running.client()
    seconds, micros = client.time()
    expiry = seconds * 1000 + micros // 1000 + 60_000
    for model, shard in ((PLAIN, 0), (SPLIT, 0), (SPLIT, 1)):
        client.zadd(f"latentsieve:live:{model}:{shard}", {"ghost|cpu": expiry})
        client.xgroup_create(job_stream(model, shard), GROUP, id="0", mkstream=True)


def test_a_job_delivered_too_often_is_dead_lettered_and_its_caller_told(
    store: Path, tmp_path: Path
) -> None:
    with cluster(store, tmp_path, workers=0, prepare=ghost_worker) as running:
        assert running.gateway is not None
        client = running.client()
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            pending = pool.submit(score, running.gateway, PLAIN, clustered(2, 9))
            taken: list[object] = []
            while not taken and time.monotonic() - started < 10:  # delivery 1 of at most 1
                taken = client.xreadgroup(GROUP, "ghost", {job_stream(PLAIN, 0): ">"},
                                          count=10, block=200) or []
            assert taken, "the gateway never queued the job"
            client.zrem(f"latentsieve:live:{PLAIN}:0", "ghost|cpu")  # dead: heartbeat lapses
            worker = running.add_worker("--max-deliveries", "1", "--claim-idle-ms", "300")
            response = pending.result()
            elapsed = time.monotonic() - started
        assert response.status_code == 502, response.text
        assert "dead-letter" in response.json()["detail"]
        assert elapsed < 25  # at once once claimed, not at the 30 s request timeout
        assert client.xlen(dead_letter_stream(PLAIN, 0)) == 1
        text = worker.metrics()
        assert metric_sum(text, "latentsieve_worker_jobs_total",
                          r'model="plain",outcome="dead_letter"') == 1
        assert metric_sum(text, "latentsieve_worker_jobs_total",
                          r'model="plain",outcome="done"') == 0
