"""Static checks of the deployable stack: docker-compose.yml (and its CPU override), the two
Dockerfiles, Prometheus' configuration and Grafana's provisioning.

No Docker engine runs on CI machines, so the stack is checked by reading it: every command line
parses with the real CLI parser, every copied or mounted path exists, ports, scrape targets and
mount points line up, and ``promtool`` (Debian's prometheus package) accepts the configuration
and the rules as committed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from latentsieve.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's ``!reset`` tag (an override that removes an attribute)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"!reset": True})


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506
    return loaded


COMPOSE = load(ROOT / "docker-compose.yml")
SERVICES = COMPOSE["services"]
DEFAULTS = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with every variable unset."""
    return DEFAULTS.sub(lambda match: match.group(2) or "", text)


def latentsieve_commands(script: str) -> list[list[str]]:
    """The argument lists of every ``latentsieve ...`` call in a shell snippet."""
    commands = []
    for part in re.split(r"&&|;", script):
        words = shlex.split(part)
        if words and words[0] == "exec":
            words = words[1:]
        if words and words[0] == "latentsieve":
            commands.append(words[1:])
    assert commands, f"no latentsieve command in {script!r}"
    return commands


def worker_args(service: dict[str, Any]) -> Any:
    words = [interpolate(str(word)) for word in service["command"]]
    assert words[:2] == ["latentsieve", "worker"]
    return build_parser().parse_args(words[1:])


def test_compose_has_the_whole_stack() -> None:
    assert set(SERVICES) == {"redis", "gateway", "worker", "prometheus", "grafana"}
    for name, service in SERVICES.items():
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert "container_name" not in service, name


def test_redis_is_a_bounded_cache_that_never_evicts_streams() -> None:
    command = [interpolate(str(word)) for word in SERVICES["redis"]["command"]]
    assert command[command.index("--maxmemory") + 1] == "1gb"
    # Only keys with a TTL go: score-cache entries; streams and heartbeats have none.
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_gateway_serves_in_front_of_workers() -> None:
    gateway = SERVICES["gateway"]
    script = interpolate(gateway["command"][-1])
    parsed = [build_parser().parse_args(args) for args in latentsieve_commands(script)]
    assert [p.command for p in parsed] == ["demo", "serve"]
    serve = parsed[-1]
    assert serve.host == "0.0.0.0" and serve.compute == "workers"
    assert re.fullmatch(r"redis://redis:6379/\d+", serve.redis)
    assert f"127.0.0.1:8000:{serve.port}" in [interpolate(port) for port in gateway["ports"]]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "store:/store" in gateway["volumes"]


def test_workers_scale_reserve_a_gpu_and_read_the_store_only() -> None:
    worker = SERVICES["worker"]
    args = worker_args(worker)
    gateway_script = interpolate(SERVICES["gateway"]["command"][-1])
    assert args.redis == build_parser().parse_args(latentsieve_commands(gateway_script)[-1]).redis
    assert args.device == "cuda" and args.metrics_port == 9100
    assert "ports" not in worker  # --scale worker=N: no host port to collide on
    assert worker["volumes"] == ["store:/store:ro"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    health = worker["healthcheck"]["test"]
    assert health[:4] == ["CMD", "python", "-m", "latentsieve.workers.healthcheck"]
    assert health[4] == str(args.metrics_port)
    assert worker["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_cpu_override_drops_the_gpu() -> None:
    worker = load(ROOT / "docker-compose.cpu.yml")["services"]["worker"]
    assert worker["deploy"] == {"!reset": True}
    assert worker["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    args = worker_args(worker)
    assert args.device == "cpu"
    assert args.metrics_port == worker_args(SERVICES["worker"]).metrics_port


def test_prometheus_scrapes_gateway_and_every_worker_with_rules_loaded() -> None:
    prometheus = SERVICES["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, _, target = interpolate(volume).removesuffix(":ro").partition(":")
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
            mounts[target] = ROOT / source
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_path.read_text())
    for rules in config["rule_files"]:
        assert mounts[f"/etc/prometheus/{rules}"] == config_path.parent / rules
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway = jobs["latentsieve-gateway"]
    assert gateway["static_configs"][0]["targets"] == ["gateway:8000"]
    key = gateway["authorization"]["credentials_file"]
    assert f"/etc/prometheus/{key}" in mounts  # the mounted key file, when keys are set
    (discovery,) = jobs["latentsieve-worker"]["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    assert discovery["port"] == worker_args(SERVICES["worker"]).metrics_port


def test_grafana_is_provisioned_from_the_repository() -> None:
    grafana = SERVICES["grafana"]
    mounts = dict(volume.removesuffix(":ro").split(":")[::-1] for volume in grafana["volumes"]
                  if volume.startswith("./"))
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert source["url"] == "http://prometheus:9090" and source["uid"] == "latentsieve-prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "latentsieve.yml").read_text())[
        "providers"]
    dashboards = ROOT / mounts[provider["options"]["path"]]
    assert list(dashboards.glob("*.json")), dashboards


def test_every_variable_compose_reads_is_in_env_example() -> None:
    documented = {
        line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    used = set()
    for path in (ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml"):
        used |= {match.group(1) for match in DEFAULTS.finditer(path.read_text())}
    assert used <= documented, used - documented


@pytest.mark.parametrize("name", ["gateway.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_are_multi_stage_non_root_and_healthchecked(name: str) -> None:
    text = (DOCKER / name).read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.MULTILINE)) == 2
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.MULTILINE):
        *sources, _target = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    assert {"latentsieve", "service", "workers", "index", "constraints.txt"} <= set(
        re.findall(r"^COPY ([\w.]+)", text, flags=re.MULTILINE)
        + re.findall(r"^COPY ([\w.]+) ", text, flags=re.MULTILINE))
    (user,) = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert user not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\\\n\s+CMD \[", text, flags=re.MULTILINE)
    cmd = re.search(r'^CMD (\[.+\])$', text, flags=re.MULTILINE)
    assert cmd is not None
    words = yaml.safe_load(cmd.group(1))
    assert words[0] == "latentsieve"
    assert build_parser().parse_args([*words[1:], "--store", "/store", "--redis", "redis://r"]
                                     if words[1] == "worker" else [*words[1:], "--store", "/s"])


def test_gateway_image_is_cpu_only_and_worker_image_is_cuda() -> None:
    gateway = (DOCKER / "gateway.Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in gateway and "'.[cpu,demo]'" in gateway
    worker = (DOCKER / "worker.Dockerfile").read_text()
    assert re.search(r"CUDA_IMAGE=nvidia/cuda:12\.\S+-runtime-", worker)
    assert "'.[gpu]'" in worker and "faiss-cpu" not in re.sub(r"#.*", "", worker)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "store", "tests"} <= set(ignored)


def test_promtool_accepts_the_config_and_rules_as_committed() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:  # a failure, not a skip: `make system-deps` installs it
        pytest.fail("promtool is not installed (make system-deps installs Debian's prometheus)")
    config = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus" /
                            "prometheus.yml")], capture_output=True, text=True, check=False)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout
    rules = subprocess.run([promtool, "check", "rules", str(DOCKER / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True, check=False)
    assert rules.returncode == 0, rules.stdout + rules.stderr
