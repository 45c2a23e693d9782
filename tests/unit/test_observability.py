"""``docker/observability.py``: the committed Grafana dashboard and Prometheus alerting rules are
what the generator writes, and they only use the provisioned datasource and real metrics."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import load_observability

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"

HISTOGRAMS = {
    "latentsieve_score_log_density", "latentsieve_score_percentile", "latentsieve_descriptor",
    "latentsieve_request_duration_seconds", "latentsieve_batch_size",
    "latentsieve_compute_seconds",
}
OTHER_METRICS = {
    "latentsieve_decisions_total", "latentsieve_cache_requests_total",
    "latentsieve_cache_errors_total", "latentsieve_queue_depth", "latentsieve_queue_limit",
    "latentsieve_index_latents", "latentsieve_live_workers", "latentsieve_worker_jobs_total",
    "latentsieve_worker_up",
}
ALLOWED_METRICS = OTHER_METRICS | {
    name + suffix for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
# Metrics without a model label; every other one is filtered by the dashboard's $model.
UNMODELLED = {"latentsieve_request_duration_seconds", "latentsieve_cache_requests_total",
              "latentsieve_cache_errors_total"}

REQUIRED_TITLES = {
    "Log-density heatmap", "Percentile histogram", "Accept rate", "Reject reasons",
    "Latency p50 and p99 by route", "Request rate by status", "Computed batch sizes",
    "Mean batch size", "Compute seconds by device", "Queue depth vs cap",
    "Live workers per shard", "Cache hit ratio", "Cache errors", "Descriptor distributions",
    "Worker jobs by outcome", "Index sizes and versions",
}
REQUIRED_ALERTS = {
    "LatentSieveRejectRateJump", "LatentSieveShardWithoutWorker", "LatentSieveWorkersAbsent",
    "LatentSieveQueueNearCap", "LatentSieveLatencyOverObjective", "LatentSieveDeadLetters",
    "LatentSieveCacheErrors", "LatentSieveServerErrors", "LatentSieveTargetDown",
}


@pytest.fixture(scope="module")
def obs() -> ModuleType:
    return load_observability()


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (DOCKER / "grafana" / "dashboards" / "latentsieve.json").read_text())
    return loaded


def graph_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def board_exprs(board: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in graph_panels(board) for target in panel["targets"]]


def test_committed_files_are_generated(obs: ModuleType) -> None:
    for relative, text in obs.generated().items():
        assert (DOCKER / relative).read_text() == text, "run python docker/observability.py"
    assert obs.main(["--check"]) == 0


def test_check_names_a_stale_file(obs: ModuleType, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert obs.main([], root=tmp_path) == 0
    assert obs.main(["--check"], root=tmp_path) == 0
    (tmp_path / obs.ALERTS).write_text("groups: []\n")
    assert obs.main(["--check"], root=tmp_path) == 1
    assert "alerts.yml" in capsys.readouterr().err


def test_everything_uses_the_provisioned_datasource(obs: ModuleType,
                                                    board: dict[str, Any]) -> None:
    provisioning = DOCKER / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uid = source["uid"]
    assert obs.DATASOURCE_UID == uid
    expected = {"type": "prometheus", "uid": uid}
    (variable,) = board["templating"]["list"]
    assert variable["datasource"] == expected
    assert variable["name"] == "model" and variable["allValue"] == ".*"
    for panel in graph_panels(board):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "latentsieve.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (board["uid"], board["title"], board["schemaVersion"]) == (
        "latentsieve", "LatentSieve", 39)


def test_panels_have_unique_ids_and_do_not_overlap(board: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    boxes = []
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        boxes.append((panel["title"], grid))
    for (one, a), (other, b) in itertools.combinations(boxes, 2):
        apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                 or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
        assert apart, f"{one!r} overlaps {other!r}"


def test_exprs_use_known_metrics_model_filter_and_grafana_windows(
        obs: ModuleType, board: dict[str, Any]) -> None:
    exprs = board_exprs(board)
    queries = [alert.query for alert in obs.alerts()]
    for expr in [*exprs, *queries, board["templating"]["list"][0]["query"]]:
        for name in re.findall(r"latentsieve_[a-z_]+", expr):
            assert name in ALLOWED_METRICS, f"unknown metric {name} in {expr}"
    for expr in exprs:
        for name, selector in re.findall(r"(latentsieve_[a-z_]+)(\{[^}]*\})?", expr):
            if re.sub(r"_(bucket|sum|count)$", "", name) not in UNMODELLED:
                assert 'model=~"$model"' in selector, f"{name} without $model in {expr}"
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in {"$__rate_interval", "$__range"}, expr


def test_alerts_file_has_every_rule(obs: ModuleType) -> None:
    document = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    (group,) = document["groups"]
    assert group["name"] == "latentsieve"
    rules = {rule["alert"]: rule for rule in group["rules"]}
    assert set(rules) == REQUIRED_ALERTS and len(group["rules"]) == len(rules)
    defined = {alert.name: alert for alert in obs.alerts()}
    assert [name for name, alert in defined.items() if alert.absent] == [
        "LatentSieveWorkersAbsent"]
    for name, rule in rules.items():
        alert = defined[name]
        assert rule["expr"] in {f"{alert.query} {alert.comparison}".strip(),
                                f"({alert.query}) {alert.comparison}"}
        assert rule["expr"] == f"{alert.query} {alert.comparison}".strip()  # none needs (...)
        assert rule["for"] == alert.for_
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert rules["LatentSieveLatencyOverObjective"]["expr"].endswith(
        f"> {obs.LATENCY_OBJECTIVE_S:g}")


def test_set_operators_are_kept_left_of_the_comparison(obs: ModuleType) -> None:
    alert = obs.Alert("A", 'x{a="or"} or vector(0)', "> 1", "1m", "page", "s", "d")
    assert alert.expr == '(x{a="or"} or vector(0)) > 1'
    alert = obs.Alert("A", "(x or vector(0)) / y", "> 1", "1m", "page", "s", "d")
    assert alert.expr == "(x or vector(0)) / y > 1"


def test_every_required_panel_exists(obs: ModuleType, board: dict[str, Any]) -> None:
    titles = [panel["title"] for panel in graph_panels(board)]
    assert REQUIRED_TITLES <= set(titles)
    assert [panel.title for panel in obs.panels()] == titles


def test_promtool_parses_rules_and_panel_exprs(board: dict[str, Any], tmp_path: Path) -> None:
    if shutil.which("promtool") is None:  # a failure, not a skip: `make system-deps` installs it
        pytest.fail("promtool is not installed (make system-deps installs Debian's prometheus)")
    grafana = {"$model": ".*", "$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}
    recorded = []
    for i, expr in enumerate(board_exprs(board)):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        recorded.append({"record": f"panel:expr_{i}", "expr": expr})
    panels_file = tmp_path / "panels.yml"
    panels_file.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": recorded}]}))
    for rules in (DOCKER / "prometheus" / "alerts.yml", panels_file):
        result = subprocess.run(["promtool", "check", "rules", str(rules)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
