"""Redis's ACL users of the compose stack on a real ``redis-server`` (issue 22, finding 4).

The server loads the ACL file that ``docker/redis/write-acl.sh`` writes from
``docker/redis/users.acl.template``, as docker-compose.yml's Redis does, and nothing else:
without a user and password nothing runs; the ``worker`` user runs the streams protocol and
nothing administrative, on ``latentsieve:*`` keys only; the ``gateway`` user runs what the
gateway and its score cache run. One test scores through a real gateway (in process) and a real
worker with their own users, so a command added to either side without its ACL grant fails here
rather than in a deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from conftest import ServeApp, free_port, start_redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.store import LatentStore
from latentsieve.service.cache import RedisCache, cache_key
from latentsieve.service.settings import Settings
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.stream_worker import StreamWorker, WorkerOptions
from latentsieve.workers.streams import GROUP, dead_letter_stream, job_stream, live_key
from latentsieve.workers.transport import ScoreSpec

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker" / "redis" / "write-acl.sh"
TEMPLATE = ROOT / "docker" / "redis" / "users.acl.template"
PASSWORDS = {
    "REDIS_GATEWAY_PASSWORD": "gateway-secret-0123456789abcdef",
    "REDIS_WORKER_PASSWORD": "worker-secret-0123456789abcdef",
}


@dataclass(frozen=True)
class AclRedis:
    """A running redis-server with the compose users: one URL per way of connecting."""

    port: int
    acl_file: Path

    def url(self, user: str | None = None, password: str | None = None) -> str:
        if user is None:
            return f"redis://127.0.0.1:{self.port}/0"
        if password is None:
            password = PASSWORDS[f"REDIS_{user.upper()}_PASSWORD"]
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    def client(self, user: str | None = None, password: str | None = None) -> redis.Redis:
        return redis.Redis.from_url(self.url(user, password), socket_timeout=5)


def write_acl(out: Path, **passwords: str) -> subprocess.CompletedProcess[str]:
    """``sh docker/redis/write-acl.sh TEMPLATE OUT`` with only ``passwords`` in the
    environment (no command after it: nothing is started)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("REDIS_")}
    return subprocess.run(["sh", str(SCRIPT), str(TEMPLATE), str(out)], env={**env, **passwords},
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    folder = tmp_path_factory.mktemp("redis-acl")
    acl_file = folder / "users.acl"
    written = write_acl(acl_file, **PASSWORDS)
    assert written.returncode == 0, written.stderr
    port = free_port()
    process = start_redis(folder, port, ["--aclfile", str(acl_file)])
    try:
        yield AclRedis(port, acl_file)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_acl_file_holds_hashes_and_no_password(acl_redis: AclRedis) -> None:
    text = acl_redis.acl_file.read_text()
    assert acl_redis.acl_file.stat().st_mode & 0o077 == 0  # umask 077: the redis user's only
    for name, password in PASSWORDS.items():
        assert password not in text
        assert "#" + hashlib.sha256(password.encode()).hexdigest() in text, name
    assert "#{" not in text and not [line for line in text.splitlines()
                                     if not line.startswith("user ")]


@pytest.mark.parametrize("password", ["", "too-short", "has@an-url-character-in-it",
                                      "has a space in it, and more"])
def test_write_acl_refuses_a_missing_or_unfit_password(tmp_path: Path, password: str) -> None:
    out = tmp_path / "users.acl"
    done = write_acl(out, **{**PASSWORDS, "REDIS_WORKER_PASSWORD": password})
    assert done.returncode == 1 and "REDIS_WORKER_PASSWORD" in done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    missing = write_acl(out, REDIS_WORKER_PASSWORD=PASSWORDS["REDIS_WORKER_PASSWORD"])
    assert missing.returncode == 1 and "REDIS_GATEWAY_PASSWORD" in missing.stderr


def raw_replies(port: int, *commands: tuple[str, ...]) -> list[bytes]:
    """The first line of Redis's reply to each command, sent as RESP arrays on one plain
    connection (no client library: nothing is sent first, no HELLO, no AUTH)."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        for words in commands:
            encoded = [word.encode() for word in words]
            sock.sendall(b"*%d\r\n" % len(encoded) + b"".join(
                b"$%d\r\n%s\r\n" % (len(word), word) for word in encoded))
            replies.append(reader.readline().rstrip())
    return replies


def test_without_credentials_nothing_runs(acl_redis: AclRedis) -> None:
    commands = [("PING",), ("FLUSHALL",), ("SET", "latentsieve:x", "1"), ("CONFIG", "GET", "*"),
                ("XADD", job_stream("m", 0), "*", "id", "forged"), ("ACL", "WHOAMI")]
    replies = raw_replies(acl_redis.port, *commands)
    assert all(reply.startswith(b"-NOAUTH") for reply in replies), replies
    # The default user is off, whatever the password; each user has its own password.
    refused = raw_replies(acl_redis.port, ("AUTH", "anything-at-all-123"),
                          ("AUTH", "default", "anything-at-all-123"),
                          ("AUTH", "worker", PASSWORDS["REDIS_GATEWAY_PASSWORD"]), ("PING",))
    assert all(reply.startswith(b"-WRONGPASS") for reply in refused[:3]), refused
    assert refused[3].startswith(b"-NOAUTH")
    for user, password in (("worker", PASSWORDS["REDIS_GATEWAY_PASSWORD"]),
                           ("gateway", PASSWORDS["REDIS_WORKER_PASSWORD"]), (None, None)):
        client = acl_redis.client(user, password)
        with pytest.raises(AuthenticationError):
            client.ping()
        client.close()


def test_the_compose_healthcheck_authenticates(acl_redis: AclRedis) -> None:
    """docker-compose.yml's Redis probe, pointed at this server's port."""
    if shutil.which("redis-cli") is None:  # installed with redis-server (redis-tools)
        pytest.fail("redis-cli is not installed (make system-deps installs it)")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    kind, probe = compose["services"]["redis"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    probe = probe.replace("$$", "$").replace("redis-cli", f"redis-cli -p {acl_redis.port}", 1)
    base = {name: value for name, value in os.environ.items() if not name.startswith("REDIS")}
    healthy = subprocess.run(["sh", "-c", probe], env={**base, **PASSWORDS}, timeout=30,
                             check=False)
    assert healthy.returncode == 0
    wrong = {**PASSWORDS, "REDIS_WORKER_PASSWORD": "not-the-password-0123"}
    unhealthy = subprocess.run(["sh", "-c", probe], env={**base, **wrong}, timeout=30,
                               check=False, capture_output=True)
    assert unhealthy.returncode != 0


def test_the_worker_user_runs_the_streams_protocol_and_nothing_else(acl_redis: AclRedis) -> None:
    gateway, worker = acl_redis.client("gateway"), acl_redis.client("worker")
    jobs, replies = job_stream("acl", 0), "latentsieve:replies:acl-test"
    # What workers/stream_worker.py runs, in its order.
    assert worker.ping()
    seconds, _ = worker.time()
    assert seconds > 0
    worker.xgroup_create(jobs, GROUP, id="0", mkstream=True)
    with pytest.raises(ResponseError, match="BUSYGROUP"):  # a second worker: the group exists
        worker.xgroup_create(jobs, GROUP, id="0", mkstream=True)
    entry = gateway.xadd(jobs, {"id": "j1", "reply": replies})
    answer = worker.xreadgroup(GROUP, "w1", {jobs: ">"}, count=8, block=100)
    assert answer[0][1][0][0] == entry
    assert worker.xadd(replies, {"id": "j1", "status": "ok"})
    assert worker.pexpire(replies, 60_000)
    assert worker.xack(jobs, GROUP, entry) == 1 and worker.xdel(jobs, entry) == 1
    assert worker.zadd(live_key("acl", 0), {"w1|cpu": 2**50}) == 1
    assert worker.zrangebyscore(live_key("acl", 0), "(0", "+inf") == [b"w1|cpu"]
    stuck = gateway.xadd(jobs, {"id": "j2", "reply": replies})
    worker.xreadgroup(GROUP, "w1", {jobs: ">"}, count=8)
    pending = worker.xpending_range(jobs, GROUP, min="-", max="+", count=8, idle=0)
    assert [entry["message_id"] for entry in pending] == [stuck]
    claimed = worker.xclaim(jobs, GROUP, "w2", 0, [stuck])
    assert [found for found, _ in claimed] == [stuck]
    assert worker.xadd(dead_letter_stream("acl", 0), {"id": "j2"}, maxlen=10, approximate=True)
    worker.xack(jobs, GROUP, stuck)
    worker.xdel(jobs, stuck)
    assert worker.zrem(live_key("acl", 0), "w1|cpu") == 1
    # Nothing administrative, no other command, no key outside latentsieve:*.
    refused = [
        ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "save", ""),
        ("KEYS", "*"), ("SCAN", "0"), ("EVAL", "return 1", "0"),
        ("ACL", "LIST"), ("CLIENT", "LIST"), ("MODULE", "LIST"), ("SCRIPT", "FLUSH"),
        ("REPLICAOF", "127.0.0.1", "1"), ("SAVE",), ("INFO",), ("MONITOR",),
        ("XGROUP", "DESTROY", jobs, GROUP), ("DEL", jobs), ("SET", "latentsieve:x", "1"),
        ("GET", "latentsieve:x"), ("XADD", "elsewhere", "*", "a", "b"),
        ("XREADGROUP", "GROUP", GROUP, "w1", "STREAMS", "elsewhere", ">"),
        ("MGET", cache_key(ScoreSpec("m", "v", 1.0), b"x")),
    ]
    for command in refused:
        with pytest.raises(NoPermissionError):
            worker.execute_command(*command)
    gateway.delete(replies)
    gateway.close()
    worker.close()


def test_the_gateway_user_runs_what_the_gateway_runs(acl_redis: AclRedis) -> None:
    gateway = acl_redis.client("gateway")
    jobs, replies = job_stream("acl-gw", 0), "latentsieve:replies:acl-gw"
    # service/stream_compute.py
    assert gateway.ping()
    gateway.time()
    gateway.xadd(jobs, {"id": "j"})
    acl_redis.client("worker").xadd(replies, {"id": "j"})
    answer = gateway.xread({replies: "0-0"}, count=512, block=100)
    assert gateway.xdel(replies, answer[0][1][0][0]) == 1
    assert gateway.zremrangebyscore(live_key("acl-gw", 0), "-inf", 0) == 0
    assert gateway.zrange(live_key("acl-gw", 0), 0, -1) == []
    gateway.xadd(replies, {"keep": "alive"})
    assert gateway.expire(replies, 3600)
    assert gateway.delete(replies, jobs) == 2
    # service/cache.py: MGET, and SET ... PX under its own prefix.
    key = cache_key(ScoreSpec("m", "v", 1.0), b"latent")
    assert gateway.set(key, b"[1.0,0.5]", px=60_000)
    assert gateway.mget([key, key + "0"]) == [b"[1.0,0.5]", None]
    refused = [
        ("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCAN", "0"),
        ("EVAL", "return 1", "0"), ("ACL", "LIST"), ("CLIENT", "LIST"), ("SHUTDOWN", "NOSAVE"),
        ("XREADGROUP", "GROUP", GROUP, "g", "STREAMS", jobs, ">"),
        ("XGROUP", "DESTROY", jobs, GROUP), ("SET", "elsewhere", "1"),
        ("MGET", "elsewhere"), ("XADD", "elsewhere", "*", "a", "b"),
    ]
    for command in refused:
        with pytest.raises(NoPermissionError):
            gateway.execute_command(*command)
    gateway.delete(key)
    gateway.close()


N, DIM = 300, 4


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("acl-store") / "store"
    source = root.parent / "latents.npy"
    np.save(source, np.random.default_rng(5).standard_normal((N, DIM)).astype(np.float32))
    build_version(LatentStore(root), BuildOptions(
        model="plain", latents_file=source, sigma="1.0", space="raw", calibration_count=200,
        progress=False,
    ), calibrate_build)
    return root


@contextlib.asynccontextmanager
async def running_worker(acl_redis: AclRedis, store: Path) -> AsyncIterator[StreamWorker]:
    """A StreamWorker of this loop as the ``worker`` user, once its heartbeat is in Redis (read
    as the gateway reads it: the worker user has no ZRANGE)."""
    worker = StreamWorker(WorkerOptions(
        store=str(store), redis_url=acl_redis.url("worker"), heartbeat_ttl_s=2.0,
        claim_idle_ms=300, max_wait_ms=2.0,
    ))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        client = aioredis.Redis.from_url(acl_redis.url("gateway"))
        for _ in range(250):
            if await client.zrange(live_key("plain", 0), 0, -1):
                break
            await asyncio.sleep(0.02)
        await client.aclose()
        yield worker
    finally:
        stop.set()
        await task


@pytest.mark.anyio
async def test_gateway_and_worker_score_as_their_users(
    acl_redis: AclRedis, store: Path, serve: ServeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """One request computed by the worker and cached, one answered from the cache, and not one
    Redis error on either side (any NOPERM would be logged, or turn /readyz or the request
    into a 503)."""
    caplog.set_level(logging.WARNING)
    latents = np.random.default_rng(6).standard_normal((5, DIM)).tolist()
    settings = Settings(store=store, redis_url=acl_redis.url("gateway"), compute="workers",
                        reload_interval_s=60.0)
    async with (
        running_worker(acl_redis, store) as worker,
        serve(settings) as client,
    ):
        await asyncio.sleep(1.0)  # the claim loop has looked for orphans (XPENDING) a few times
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        first = await client.post("/score", json={"model": "plain", "latents": latents})
        second = await client.post("/score", json={"model": "plain", "latents": latents})
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert [row["cached"] for row in first.json()["results"]] == [False] * 5
        assert [row["cached"] for row in second.json()["results"]] == [True] * 5
        assert second.json()["results"] == [{**row, "cached": True}
                                            for row in first.json()["results"]]
        for _ in range(100):  # a worker counts a job once acknowledged: maybe after the answer
            done = worker.metrics.registry.get_sample_value(
                "latentsieve_worker_jobs_total", {"model": "plain", "outcome": "done"})
            if done:
                break
            await asyncio.sleep(0.02)
        assert done == 1
        metrics = (await client.get("/metrics")).text
        assert "latentsieve_cache_errors_total 0.0" in metrics.splitlines()
    pending = acl_redis.client("worker").xpending(job_stream("plain", 0), GROUP)
    assert pending["pending"] == 0  # acknowledged
    problems = [record.getMessage() for record in caplog.records
                if record.name.startswith("latentsieve") and record.levelno >= logging.WARNING]
    assert problems == []


def test_the_score_cache_counts_no_error_as_the_gateway_user(acl_redis: AclRedis) -> None:
    """``RedisCache`` on its own as the gateway user: a write and a read, no error counted."""
    cache = RedisCache(acl_redis.url("gateway"), ttl_s=60)

    async def round_trip() -> list[object]:
        key = cache_key(ScoreSpec("m", "v", 0.5), b"row")
        await cache.set_many([(key, {"log_density": -1.5, "percentile": 0.25})])
        found = await cache.get_many([key])
        await cache.close()
        return list(found)

    assert asyncio.run(round_trip()) == [{"log_density": -1.5, "percentile": 0.25}]
    assert cache.errors == 0
