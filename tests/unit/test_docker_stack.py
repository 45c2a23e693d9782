"""Static checks of docker-compose.yml, docker/Dockerfile and docker/prometheus.yml.

No Docker engine runs on CI machines, so the stack is checked by reading it: every command line
parses with the real CLI parser, every copied path exists, and the ports and targets line up.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from latentsieve.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


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


def test_compose_services_line_up() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "gateway", "prometheus"}
    gateway = services["gateway"]
    assert (ROOT / gateway["build"]["context"] / gateway["build"]["dockerfile"]).is_file()
    script = gateway["command"][-1]
    parsed = [build_parser().parse_args(args) for args in latentsieve_commands(script)]
    assert [p.command for p in parsed] == ["demo", "serve"]
    serve = parsed[-1]
    assert serve.host == "0.0.0.0"
    assert re.fullmatch(r"redis://redis:6379/\d+", serve.redis)
    assert f"127.0.0.1:{serve.port}:{serve.port}" in gateway["ports"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    for volume in services["prometheus"]["volumes"]:
        source = volume.split(":")[0]
        assert (ROOT / source).is_file(), source


def test_prometheus_scrapes_the_gateway_metrics() -> None:
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["gateway:8000"]


def test_dockerfile_copies_existing_paths_and_runs_valid_commands() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE):
        *sources, _target = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
    packages = set(re.findall(r"^COPY (\w+) ", text, flags=re.MULTILINE))
    assert {"latentsieve", "service", "workers", "index"} <= packages
    cmd = re.search(r'^CMD \["sh", "-c", "(.+)"\]$', text, flags=re.MULTILINE)
    assert cmd is not None
    parsed = [build_parser().parse_args(args) for args in latentsieve_commands(cmd.group(1))]
    assert parsed[-1].command == "serve" and parsed[-1].port == 8000
    assert "EXPOSE 8000" in text
