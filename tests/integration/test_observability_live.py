"""The deployable observability, proven live (issue 11): a real Prometheus, configured from the
committed ``docker/prometheus/prometheus.yml`` (only the addresses changed: loopback instead of
compose's service names) with the committed alert rules, scrapes a real gateway in front of a
real worker over a real Redis, with API keys on. Traffic flows (accepts, rejects, cache hits,
descriptors), and then every query of every panel of the committed Grafana dashboard returns
data, and so does every alert expression with its threshold comparison removed (the one
``absent(...)`` rule aside); every rule evaluates without error.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import load_observability, running_redis
from servers import (
    Server,
    Worker,
    prometheus_query,
    running_prometheus,
    running_server,
    start_worker,
)

from latentsieve.demo import ensure_demo_index

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
MODEL = "digits-vae"
KEY = "live-stack-key"
# Grafana's variables as Grafana would fill them for "All" models at a 1 s scrape interval.
GRAFANA = {"$model": ".*", "$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}


def filled(expr: str) -> str:
    for variable, value in GRAFANA.items():
        expr = expr.replace(variable, value)
    return expr


@dataclass
class Stack:
    gateway: Server
    worker: Worker
    prometheus: str


def local_config(folder: Path, gateway: Server, worker: Worker) -> Path:
    """The committed Prometheus config with loopback targets, a 1 s interval and absolute paths
    for the rules and the bearer-key file (which holds a real key here)."""
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DOCKER / "prometheus" / rules) for rules in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    key_file = folder / "api_key"
    key_file.write_text(KEY)
    gateway_job = jobs["latentsieve-gateway"]
    gateway_job["authorization"]["credentials_file"] = str(key_file)
    gateway_job["static_configs"] = [{"targets": [gateway.url.removeprefix("http://")]}]
    worker_job = jobs["latentsieve-worker"]
    del worker_job["dns_sd_configs"]
    worker_job["static_configs"] = [
        {"targets": [worker.metrics_url.removeprefix("http://").removesuffix("/metrics")]}
    ]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def traffic(url: str, stop: threading.Event, counts: dict[int, int]) -> None:
    """Requests of every kind until ``stop``: accepts, a rejected far-away latent, cache hits
    (repeated seeds), fresh seeds (misses), descriptors and /select."""
    headers = {"Authorization": f"Bearer {KEY}"}
    bodies = [
        {"model": MODEL, "seeds": [1, 2, 3, 4]},
        {"model": MODEL, "latents": [[9.0] * 8]},
        {"model": MODEL, "seeds": [1, 2]},
        {"model": MODEL, "seeds": [7], "descriptors": ["psi", "nu", "delta"]},
    ]
    fresh = 1000
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        while not stop.is_set():
            for body in bodies:
                status = client.post("/score", json=body).status_code
                counts[status] = counts.get(status, 0) + 1
            fresh += 1
            for answer in (
                client.post("/score", json={"model": MODEL, "seeds": [fresh]}),
                client.post("/select", json={"model": MODEL, "count": 2, "keep": 1,
                                             "start": fresh * 10}),
            ):
                counts[answer.status_code] = counts.get(answer.status_code, 0) + 1
            time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("live-stack")
    store = folder / "store"
    ensure_demo_index(store)
    with running_redis(folder) as (redis_url, _):
        worker = start_worker(store, redis_url, folder / "worker.log")
        try:
            with running_server(
                store, 60.0, folder / "gateway.log",
                env={"LATENTSIEVE_API_KEYS": KEY},
                args=("--redis", redis_url, "--compute", "workers"),
            ) as gateway:
                assert httpx.get(f"{gateway.url}/metrics", timeout=5).status_code == 401
                config = local_config(folder, gateway, worker)
                with running_prometheus(config, folder) as prometheus:
                    stop = threading.Event()
                    counts: dict[int, int] = {}
                    sender = threading.Thread(target=traffic, args=(gateway.url, stop, counts))
                    sender.start()
                    try:
                        # Rates need two samples with traffic between them; rules need a few
                        # evaluations: ten one-second intervals give both.
                        time.sleep(10)
                    finally:
                        stop.set()
                        sender.join(timeout=60)
                    assert set(counts) == {200}, counts
                    wait_for_scrapes(prometheus)
                    yield Stack(gateway, worker, prometheus)
        finally:
            worker.stop()


def wait_for_scrapes(prometheus: str) -> None:
    """Until both jobs are up (the gateway one with the bearer key) and the last scrape saw the
    traffic's final counts."""
    deadline = time.monotonic() + 30
    while True:
        up = {item["metric"]["job"]: item["value"][1]
              for item in prometheus_query(prometheus, "up")}
        if up == {"latentsieve-gateway": "1", "latentsieve-worker": "1"}:
            return
        assert time.monotonic() < deadline, up
        time.sleep(0.5)


def values_of(item: dict[str, Any]) -> list[float]:
    """The numbers of one instant-query series (a vector sample, or a range's samples)."""
    if "value" in item:
        return [float(item["value"][1])]
    return [float(value) for _, value in item.get("values", ())]


def test_both_targets_are_scraped_with_the_key(stack: Stack) -> None:
    up = prometheus_query(stack.prometheus, "up == 1")
    assert {item["metric"]["job"] for item in up} == {"latentsieve-gateway", "latentsieve-worker"}


def test_every_dashboard_panel_query_returns_data(stack: Stack) -> None:
    board = json.loads((DOCKER / "grafana" / "dashboards" / "latentsieve.json").read_text())
    variable = board["templating"]["list"][0]
    models = prometheus_query(stack.prometheus, "latentsieve_index_latents")
    assert variable["name"] == "model" and {m["metric"]["model"] for m in models} == {MODEL}
    empty = []
    checked = 0
    for panel in board["panels"]:
        for target in panel.get("targets", ()):
            checked += 1
            values = [value for item in prometheus_query(stack.prometheus, filled(target["expr"]))
                      for value in values_of(item)]
            # Data means a number: a quantile of no observations (NaN) is not data.
            if not any(math.isfinite(value) for value in values):
                empty.append((panel["title"], target["expr"], values[:3]))
    assert checked >= 16
    assert not empty, f"panel queries without data: {empty}"


def test_panels_show_the_traffic_that_flowed(stack: Stack) -> None:
    """Not only zeros: the traffic's accepts, rejects, hits and descriptors are in the data."""
    def total(expr: str) -> float:
        return sum(float(item["value"][1]) for item in prometheus_query(stack.prometheus, expr))

    assert total('latentsieve_decisions_total{decision="accept"}') > 0
    assert total('latentsieve_decisions_total{decision="reject"}') > 0
    assert total('latentsieve_cache_requests_total{result="hit"}') > 0
    assert total('latentsieve_cache_requests_total{result="miss"}') > 0
    assert total('latentsieve_descriptor_count{name="delta"}') > 0
    assert total('latentsieve_worker_jobs_total{outcome="done"}') > 0
    assert total("latentsieve_compute_seconds_count") > 0
    assert total("latentsieve_live_workers") == 1


def test_every_alert_expression_without_its_threshold_returns_data(stack: Stack) -> None:
    alerts = load_observability().alerts()
    rules = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    committed = {rule["alert"]: rule["expr"] for rule in rules["groups"][0]["rules"]}
    assert set(committed) == {alert.name for alert in alerts}
    empty = []
    for alert in alerts:
        assert committed[alert.name] == alert.expr
        if alert.absent:
            continue
        values = [value for item in prometheus_query(stack.prometheus, alert.query)
                  for value in values_of(item)]
        if not any(math.isfinite(value) for value in values):
            empty.append((alert.name, alert.query, values[:3]))
    assert not empty, f"alert queries without data: {empty}"
    # With a worker up, the absent() rule is quiet.
    (absent,) = [alert for alert in alerts if alert.absent]
    assert prometheus_query(stack.prometheus, absent.expr) == []


def test_prometheus_loaded_every_rule_and_each_evaluates(stack: Stack) -> None:
    answer = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()
    rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
    names = {alert.name for alert in load_observability().alerts()}
    assert {rule["name"] for rule in rules} == names
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in rules
                 if rule["health"] != "ok"]
    assert not unhealthy, unhealthy
