"""``latentsieve serve --processes 2``: two real gateway processes (uvicorn's) on one loopback
port, one ``/metrics`` summing both, SIGHUP restarting both on the new version, nothing left
behind on exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import Server, running_server
from test_uvicorn import build_small_version

from latentsieve.demo import ensure_demo_index, index_latents
from latentsieve.index.store import LatentStore
from latentsieve.service.main import PROCESS_READY_TIMEOUT_S, store_log_density_buckets
from latentsieve.service.metrics import le_label

MODEL = "digits-vae"
CLIENTS, REQUESTS_EACH, SEEDS_EACH = 8, 12, 3


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("metrics")
    (folder / "counter_1.db").write_bytes(b"stale")  # from an earlier run: must be removed
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, metrics_dir: Path) -> Iterator[Server]:
    """Two gateway processes on a private demo store that poll only every 10 minutes."""
    store = tmp_path_factory.mktemp("serve") / "store"
    ensure_demo_index(store)
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with running_server(
        store, 600.0, log, processes=2, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    ) as server:
        yield server


def not_access_lines(log: str) -> str:
    """The server log without its access lines: what uvicorn and the app said (a failure's
    message; 20 requests' access lines would push it out)."""
    return "\n".join(line for line in log.splitlines() if '"latentsieve.access"' not in line)


def process_pids(server: Server) -> set[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(server.process.pid), "-f", "multiprocessing.spawn"],
        capture_output=True, text=True, check=False,
    ).stdout
    return {int(pid) for pid in out.split()}


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}(\{{{labels}\}})? (\S+)$" if labels else rf"^{name} (\S+)$"
    total = 0.0
    for match in re.finditer(pattern, text, flags=re.MULTILINE):
        total += float(match.groups()[-1])
    return total


def test_two_processes_serve_and_metrics_count_every_request(
    server: Server, metrics_dir: Path
) -> None:
    pids = process_pids(server)
    assert len(pids) == 2
    deadline = time.monotonic() + 60  # /readyz answered once the first process was ready
    while True:
        files = {path.name for path in metrics_dir.glob("*.db")}
        writers = {int(name.rsplit("_", 1)[1][:-3]) for name in files
                   if name.startswith("counter_")}
        if writers == pids or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "counter_1.db" not in files
    assert writers == pids

    failures: list[str] = []

    def client(offset: int) -> None:
        # A connection per request: the processes share the listening socket.
        for index in range(REQUESTS_EACH):
            first = 1_000 * offset + SEEDS_EACH * index
            seeds = list(range(first, first + SEEDS_EACH))
            try:
                response = httpx.post(
                    f"{server.url}/score", json={"model": MODEL, "seeds": seeds}, timeout=30
                )
                assert response.status_code == 200, response.text
                assert [r["seed"] for r in response.json()["results"]] == seeds
            except (AssertionError, httpx.HTTPError) as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures[:3]

    requests, latents = CLIENTS * REQUESTS_EACH, CLIENTS * REQUESTS_EACH * SEEDS_EACH
    deadline = time.monotonic() + 10  # score histograms are flushed every second
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        counted = {
            "requests": metric(text, "latentsieve_request_duration_seconds_count",
                               r'route="/score",status="200"'),
            "decisions": metric(text, "latentsieve_decisions_total", ".*"),
            "cache": metric(text, "latentsieve_cache_requests_total", ".*"),
            "scores": metric(text, "latentsieve_score_log_density_count", ".*"),
            "percentiles": metric(text, "latentsieve_score_percentile_count", ".*"),
        }
        expected = {"requests": requests, "decisions": latents, "cache": latents,
                    "scores": latents, "percentiles": latents}
        if counted == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counted == expected
    assert metric(text, "latentsieve_queue_depth", f'model="{MODEL}"') == 0
    assert metric(text, "latentsieve_index_latents", ".*") == len(index_latents())
    # One set of score buckets, fixed by the parent from the store: what one process derives.
    bounds = re.findall(r'^latentsieve_score_log_density_bucket\{le="([^"]+)"', text, re.M)
    assert bounds == [le_label(b) for b in store_log_density_buckets(server.store)] + [
        "+Inf"
    ]


def versions_seen(server: Server, count: int) -> set[str]:
    """The digits-vae versions of ``count`` concurrent ``GET /models``, each on its own
    connection, so that both processes answer some of them; "no answer" for a connection that
    a process closed while uvicorn restarted it (the caller asks again)."""
    seen: list[str] = []

    def ask() -> None:
        try:
            models = httpx.get(f"{server.url}/models", timeout=10).json()["models"]
        except httpx.TransportError:
            seen.append("no answer")
            return
        seen.append({m["name"]: m for m in models}[MODEL]["index_version"])

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return set(seen)


def test_sighup_reaches_every_process(server: Server, tmp_path: Path) -> None:
    before = LatentStore(server.store).newest(MODEL)
    new = build_small_version(server.store, tmp_path)
    assert new != before
    pids = process_pids(server)  # before the signal: uvicorn starts each replacement at once
    assert len(pids) == 2
    server.process.send_signal(signal.SIGHUP)
    # One by one, each new process imports torch and loads the store before the next restarts:
    # seconds each when idle, tens of seconds on a busy 2-core machine.
    deadline = time.monotonic() + 90
    while True:
        seen = versions_seen(server, 16)
        if seen == {new} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert seen == {new}
    # uvicorn replaced the processes one by one (its SIGHUP: the new one ready, then the old one
    # stopped); an old one may still be finishing its shutdown for a moment.
    deadline = time.monotonic() + 30
    while True:
        now = process_pids(server)
        if (len(now) == 2 and now.isdisjoint(pids)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(now) == 2 and now.isdisjoint(pids), (pids, now)


def test_a_dead_process_is_replaced(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ensure_demo_index(store)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # info: uvicorn's supervisor says when a child died and when its replacement started
    with running_server(store, 600.0, tmp_path / "serve.log", processes=2,
                        env={"TMPDIR": str(scratch), "LATENTSIEVE_LOG_LEVEL": "info"}) as server:
        pids = process_pids(server)
        assert len(pids) == 2
        assert [path.name[:20] for path in scratch.iterdir()] == ["latentsieve-metrics-"]
        victim, survivor = min(pids), max(pids)
        os.kill(victim, signal.SIGKILL)
        # The survivor accepts every connection from the shared socket meanwhile.
        for _ in range(20):
            response = httpx.post(
                f"{server.url}/score", json={"model": MODEL, "seeds": [1]}, timeout=30
            )
            assert response.status_code == 200
        # Usually within a second. But uvicorn's supervisor pings each process in turn and
        # waits up to its health-check timeout (PROCESS_READY_TIMEOUT_S, 120 s) for the answer,
        # and a process killed while a ping is out never answers: uvicorn's parent keeps the
        # child's end of the pipe open, so it sees no EOF either. CI hit that window twice.
        deadline = time.monotonic() + PROCESS_READY_TIMEOUT_S + 30
        while time.monotonic() < deadline:
            now = process_pids(server)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.2)
        # uvicorn replaced it
        assert len(now) == 2 and survivor in now and victim not in now, (
            pids, now, not_access_lines(server.log.read_text())[-4000:]
        )
    assert server.process.returncode == 0
    for pid in now:
        assert not Path(f"/proc/{pid}").exists()
    assert list(scratch.iterdir()) == []  # the temporary metrics folder is gone
