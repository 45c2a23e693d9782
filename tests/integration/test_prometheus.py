"""A real Prometheus (Debian's package) scrapes a real ``latentsieve serve``: every CONTRACT §6
series arrives with its labels, and ``promtool`` accepts the exposition."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from servers import Server, running_server

from latentsieve.demo import ensure_demo_index

MODEL = "digits-vae"
GATEWAY_SERIES = {
    "latentsieve_score_log_density_bucket": {"model"},
    "latentsieve_score_percentile_bucket": {"model"},
    # Prometheus drops empty label values: accepts (reason="") arrive without ``reason``.
    "latentsieve_decisions_total": {"model", "decision"},
    "latentsieve_descriptor_bucket": {"model", "name"},
    "latentsieve_request_duration_seconds_bucket": {"route", "status"},
    "latentsieve_batch_size_bucket": {"model"},
    "latentsieve_cache_requests_total": {"result"},
    "latentsieve_queue_depth": {"model"},
    "latentsieve_index_latents": {"model", "version"},
}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:  # a failure, not a skip: `make system-deps` installs it
        pytest.fail(f"{name} is not installed (make system-deps installs Debian's prometheus)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("prom-store") / "store"
    ensure_demo_index(store)
    with running_server(store, 60.0, tmp_path_factory.mktemp("logs") / "serve.log") as server:
        for body in (
            {"model": MODEL, "seeds": [0, 1, 2, 3], "descriptors": ["psi", "nu"]},
            {"model": MODEL, "latents": [[9.0] * 8]},  # far away: rejected
            {"model": MODEL, "seeds": [5, 6]},
            {"model": MODEL, "seeds": [5, 6]},  # two cache hits
        ):
            assert httpx.post(f"{server.url}/score", json=body, timeout=30).status_code == 200
        yield server


@pytest.fixture(scope="module")
def prometheus(gateway: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    target = gateway.url.removeprefix("http://")
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: latentsieve\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = _free_port()
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'db'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(folder / 'prometheus.log')}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def query(prometheus: str, expression: str) -> list[dict[str, object]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=5)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"]["result"])


def test_prometheus_scrapes_every_contract_series(prometheus: str) -> None:
    deadline = time.monotonic() + 30
    while not query(prometheus, 'up{job="latentsieve"} == 1'):
        assert time.monotonic() < deadline, query(prometheus, "up")
        time.sleep(0.5)
    for name, labels in GATEWAY_SERIES.items():
        series = query(prometheus, name)
        assert series, f"{name} was not scraped"
        for item in series:
            metric = item["metric"]
            assert isinstance(metric, dict)
            assert labels <= set(metric), (name, metric)
    rejected = query(prometheus, 'latentsieve_decisions_total{decision="reject"}')
    assert rejected and all("reason" in item["metric"] for item in rejected)  # type: ignore[operator]
    assert any(
        "percentile_below_min" in str(item["metric"]["reason"])  # type: ignore[index]
        for item in rejected
    )
    hits = query(prometheus, 'latentsieve_cache_requests_total{result="hit"}')
    assert float(hits[0]["value"][1]) >= 2  # type: ignore[index]


def test_promtool_accepts_the_exposition(gateway: Server) -> None:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    checked = subprocess.run(
        [_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
