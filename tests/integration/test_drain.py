"""Stopping and restarting ``latentsieve serve`` with requests in flight (service/drain.py):
every request gets an answer in the contract's shape, none a dropped connection or a plain 500.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import running_server
from test_uvicorn import build_small_version
from test_workers import process_pids

from latentsieve.demo import ensure_demo_indexes

MODEL = "digits-vae"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("drain") / "store"
    ensure_demo_indexes(folder)
    return folder


def test_shutdown_answers_a_request_past_the_drain_in_json(store: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    answers: dict[str, httpx.Response] = {}
    with running_server(store, 600.0, log, env={"LATENTSIEVE_DRAIN_TIMEOUT_S": "1"}) as server:

        def slow() -> None:  # the whole select range: several seconds of sampling and scoring
            answers["slow"] = httpx.post(f"{server.url}/select", json={
                "model": "digits-ldm", "start": 0, "count": 100_000, "keep": 4}, timeout=60)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            answers["readyz"] = client.get("/readyz")  # during the linger: still answering
        thread.join(timeout=60)
        server.process.wait(timeout=30)
    readyz, slow_answer = answers["readyz"], answers["slow"]
    assert readyz.status_code == 503 and "shutting down" in readyz.json()["detail"]
    assert readyz.headers["connection"] == "close"
    assert slow_answer.status_code == 503, slow_answer.text
    assert slow_answer.headers["content-type"] == "application/json"
    assert slow_answer.headers["retry-after"] == "1"
    assert "shutting down" in slow_answer.json()["detail"]
    text = log.read_text()
    assert "Exception in ASGI application" not in text and '"status": 500' not in text, text


def test_rolling_restart_drops_no_request(store: Path, tmp_path: Path) -> None:
    """SIGHUP to ``serve --processes 2``: uvicorn restarts each gateway process (SIGTERM to the
    old one) while clients on kept-alive connections send requests without pause."""
    failures: list[str] = []
    statuses: list[int] = []
    stop = threading.Event()
    with running_server(store, 600.0, tmp_path / "serve.log", processes=2) as server:

        def hammer(offset: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                seed = offset
                while not stop.is_set():
                    try:
                        answer = client.post("/score", json={"model": MODEL, "seeds": [seed]})
                        statuses.append(answer.status_code)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    seed += 4

        pids = process_pids(server)
        build_small_version(server.store, tmp_path)
        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                now = process_pids(server)
                if len(now) == 2 and now.isdisjoint(pids):
                    break
                time.sleep(0.2)
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert len(now) == 2 and now.isdisjoint(pids), (pids, now)
        assert all(not Path(f"/proc/{pid}").exists() or pid in now for pid in pids)
        log = server.log.read_text()
    assert not failures, (failures[:3], log[-3000:])
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert "Exception in ASGI application" not in log
    assert os.environ.get("LATENTSIEVE_DRAIN_TIMEOUT_S") is None  # the defaults were tested
