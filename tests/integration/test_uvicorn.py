"""``latentsieve serve`` as a real process on loopback: it scores, and it picks up a new index
version while requests keep flowing, without dropping one."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from servers import Server, running_server

from latentsieve.demo import ensure_demo_index
from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.store import LatentStore
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.demo_models.digits_vae import training_latents

MODEL = "digits-vae"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A private store with the demo model, polled every 0.5 s."""
    store = tmp_path_factory.mktemp("serve") / "store"
    ensure_demo_index(store)
    with running_server(store, 0.5, tmp_path_factory.mktemp("logs") / "serve.log") as server:
        yield server


def test_serves_scores(server: Server) -> None:
    response = httpx.post(
        f"{server.url}/score", json={"model": MODEL, "seeds": [0, 1, 2]}, timeout=10
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["seed"] for r in body["results"]] == [0, 1, 2]
    assert body["index_version"] == LatentStore(server.store).newest(MODEL)
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert "latentsieve_request_duration_seconds" in httpx.get(f"{server.url}/metrics").text


def test_hot_reload_without_dropped_requests(server: Server, tmp_path: Path) -> None:
    old = LatentStore(server.store).newest(MODEL)
    statuses: list[int] = []
    versions: set[str] = set()
    failures: list[str] = []
    stop = threading.Event()

    def hammer(offset: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            seed = offset
            while not stop.is_set():
                try:
                    response = client.post("/score", json={"model": MODEL, "seeds": [seed]})
                    statuses.append(response.status_code)
                    versions.add(response.json().get("index_version", ""))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                seed += 4

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        source = tmp_path / "more.npy"
        latents = training_latents()
        np.save(source, np.concatenate([latents, latents[:100] + 0.01]).astype(np.float32))
        options = BuildOptions(
            model=MODEL, latents_file=source, sigma="auto",
            sampler="torch-cpu:float32:8", calibration_count=2000, progress=False,
        )
        new = build_version(LatentStore(server.store), options, calibrate_build).name
        assert new != old
        deadline = time.monotonic() + 15
        shown = None
        while time.monotonic() < deadline:
            models = httpx.get(f"{server.url}/models", timeout=5).json()["models"]
            shown = {m["name"]: m for m in models}[MODEL]
            if shown["index_version"] == new:
                break
            time.sleep(0.2)
        assert shown is not None and shown["index_version"] == new
        assert shown["N"] == len(latents) + 100
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures[:3]
    assert statuses and set(statuses) == {200}
    assert new in versions
    after = httpx.post(f"{server.url}/score", json={"model": MODEL, "seeds": [5]}, timeout=10)
    assert after.json()["index_version"] == new
    assert server.process.poll() is None


def test_sighup_triggers_a_reload_check(server: Server, tmp_path: Path) -> None:
    # A second process on the same store that polls only every 10 minutes: only SIGHUP
    # can make it see the new version within the test.
    with running_server(server.store, 600.0, tmp_path / "slow.log") as slow:
        check_sighup(slow, tmp_path)


def build_small_version(store: Path, tmp_path: Path) -> str:
    """A new digits-vae version of 500 latents in ``store``; returns its name."""
    source = tmp_path / "again.npy"
    np.save(source, training_latents()[:500])
    options = BuildOptions(
        model=MODEL, latents_file=source, sigma="auto",
        sampler="torch-cpu:float32:8", calibration_count=500, progress=False,
    )
    return build_version(LatentStore(store), options, calibrate_build).name


def check_sighup(server: Server, tmp_path: Path) -> None:
    before = httpx.get(f"{server.url}/models").json()["models"][0]["index_version"]
    new = build_small_version(server.store, tmp_path)
    deadline = time.monotonic() + 10
    current = before
    time.sleep(0.5)
    assert httpx.get(f"{server.url}/models").json()["models"][0]["index_version"] == before
    server.process.send_signal(signal.SIGHUP)
    while time.monotonic() < deadline and current != new:
        time.sleep(0.1)
        current = httpx.get(f"{server.url}/models").json()["models"][0]["index_version"]
    assert current == new
    assert server.process.poll() is None


def test_an_adversarial_body_does_not_stall_the_gateway(server: Server) -> None:
    """The audit's body (over 32 brackets, then an unclosed run of escaped quotes: 6.3 s of CPU
    each at 32 KB under the old regex, stalling ``/healthz`` for seconds) sent in a loop for
    2 s: ``/healthz`` latency meanwhile, against an idle ``/healthz`` in this same test."""
    body = b"[" * 40 + b'"' + b'\\"' * (16 * 1024)  # 32 KB
    with httpx.Client(base_url=server.url, timeout=60) as client:

        def healthz_seconds(count: int) -> list[float]:
            times = []
            for _ in range(count):
                started = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                times.append(time.perf_counter() - started)
                time.sleep(0.01)
            return times

        idle = float(np.median(healthz_seconds(30)))
        statuses: list[int] = []
        stop = threading.Event()

        def attack() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as attacker:
                while not stop.is_set():
                    statuses.append(attacker.post(
                        "/score", content=body, headers={"content-type": "application/json"}
                    ).status_code)

        thread = threading.Thread(target=attack)
        thread.start()
        try:
            time.sleep(0.1)
            during = healthz_seconds(60)
        finally:
            stop.set()
            thread.join(timeout=120)
    assert statuses and set(statuses) == {422}
    ratio = float(np.median(during)) / idle
    assert ratio < 10, (ratio, idle, sorted(during)[-5:])
    assert max(during) < 100 * idle + 0.5, (max(during), idle)


def test_a_client_leaving_mid_upload_is_no_server_error(server: Server) -> None:
    """Headers announcing 100 KB, 10 bytes of body, then the connection closes: logged and
    counted as 499 (client closed), no traceback, no 500 for the server-error alert."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100000\r\nx-request-id: leaving-early\r\n\r\n"
                     b'{"model": ')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "leaving-early" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log.read_text()
    line = next(line for line in log.splitlines() if "leaving-early" in line)
    assert '"status": 499' in line, line
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'latentsieve_request_duration_seconds_count{route="/score",status="499"} 1.0' in metrics
    assert 'route="/score",status="500"' not in metrics
    assert server.process.poll() is None
