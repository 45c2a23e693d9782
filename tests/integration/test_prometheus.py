"""A real Prometheus (Debian's package) scrapes a real ``latentsieve serve``: every
docs/contract.md §6
series arrives with its labels, and ``promtool`` accepts the exposition."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import Server, prometheus_query, running_prometheus, running_server, tool

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
    with running_prometheus(config, folder) as url:
        yield url


def query(prometheus: str, expression: str) -> list[dict[str, Any]]:
    return prometheus_query(prometheus, expression)


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
    assert rejected and all("reason" in item["metric"] for item in rejected)
    assert any(
        "percentile_below_min" in str(item["metric"]["reason"])  # the demo policy's floor
        for item in rejected
    )
    hits = query(prometheus, 'latentsieve_cache_requests_total{result="hit"}')
    assert float(hits[0]["value"][1]) >= 2


def test_promtool_accepts_the_exposition(gateway: Server) -> None:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    checked = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
