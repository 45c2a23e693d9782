"""Static checks of the deployable stack: docker-compose.yml (and its CPU override), the two
Dockerfiles, Redis's ACL users, Prometheus' configuration and Grafana's provisioning.

No Docker engine runs on CI machines, so the stack is checked by reading it: every command line
parses with the real CLI parser (in its container's environment), every copied or mounted path
exists, ports, scrape targets and mount points line up, and ``promtool`` (Debian's prometheus
package) accepts the configuration and the rules as committed. The security audit's rules
(issue 22) are checked here too: Redis needs a user and password from every service, the
workers' user cannot run administrative commands, no password has a default, and nothing but
the gateway, Prometheus and Grafana is published, on loopback only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from latentsieve.cli import build_parser
from latentsieve.service.cache import KEY_PREFIX
from latentsieve.workers.streams import dead_letter_stream, job_stream, live_key, reply_stream

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
CPU_WORKER = load(ROOT / "docker-compose.cpu.yml")["services"]["worker"]
# ${VAR}, ${VAR:-default} or ${VAR:?message} (a required variable: compose stops without it).
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}")
TOKEN = re.compile(r"\$\$|" + VARIABLE.pattern)  # $$ is a literal $
ACL_TEMPLATE = DOCKER / "redis" / "users.acl.template"
# Commands no LatentSieve process needs and no stolen password should buy.
ADMIN_COMMANDS = frozenset({
    "flushall", "flushdb", "config", "keys", "scan", "debug", "shutdown", "eval", "evalsha",
    "eval_ro", "evalsha_ro", "script", "function", "fcall", "fcall_ro", "module", "acl",
    "client", "monitor", "replicaof", "slaveof", "save", "bgsave", "bgrewriteaof", "migrate",
    "restore", "rename", "renamenx", "swapdb", "failover", "cluster", "sync", "psync", "sort",
    "object", "lastsave", "info", "latency", "memory", "slowlog", "subscribe", "publish",
})


def stand_in(name: str) -> str:
    """The value a required variable (``${VAR:?...}``) gets here: its lower-cased name (at
    least 16 URL-safe characters, as docker/redis/write-acl.sh asks of a password)."""
    return name.lower().replace("_", "-")


def interpolate(text: str) -> str:
    """Compose's interpolation with every optional variable unset (its default) and every
    required one set to its ``stand_in``."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return stand_in(match.group(1)) if match.group(2) == ":?" else match.group(3) or ""

    return TOKEN.sub(value, text)


def strings(value: Any) -> Iterator[str]:
    """Every string inside a loaded YAML value (keys and comments excluded)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def container_parser(service: dict[str, Any]) -> argparse.ArgumentParser:
    """``build_parser()`` as the service's container builds it: its ``environment`` set and no
    other LATENTSIEVE_* variable (options read their defaults from them)."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("LATENTSIEVE_")}
    env.update({name: interpolate(str(value))
                for name, value in service.get("environment", {}).items()})
    with mock.patch.dict(os.environ, env, clear=True):
        return build_parser()


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


def worker_args(service: dict[str, Any]) -> argparse.Namespace:
    """The worker's options; the environment is the base file's (an override keeps it)."""
    words = [interpolate(str(word)) for word in service["command"]]
    assert words[:2] == ["latentsieve", "worker"]
    return container_parser(SERVICES["worker"]).parse_args(words[1:])


def gateway_args() -> list[argparse.Namespace]:
    """The options of the gateway's ``latentsieve demo`` and ``latentsieve serve``."""
    script = interpolate(SERVICES["gateway"]["command"][-1])
    parser = container_parser(SERVICES["gateway"])
    return [parser.parse_args(args) for args in latentsieve_commands(script)]


def acl_users() -> dict[str, list[str]]:
    """docker/redis/users.acl.template: user name -> its rules (comments skipped)."""
    users = {}
    for line in ACL_TEMPLATE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        keyword, name, *rules = line.split()
        assert keyword == "user" and name not in users, line
        users[name] = rules
    return users


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


def test_redis_starts_with_the_acl_users_and_no_host_port() -> None:
    redis = SERVICES["redis"]
    command = [interpolate(str(word)) for word in redis["command"]]
    # write-acl.sh TEMPLATE OUT redis-server ...: the file it writes is the one Redis loads.
    assert command[:2] == ["sh", "/etc/redis/write-acl.sh"]
    template, written = command[2], command[3]
    assert command[4] == "redis-server"
    assert command[command.index("--aclfile") + 1] == written
    assert "./docker/redis:/etc/redis:ro" in redis["volumes"]
    assert (DOCKER / "redis" / Path(command[1]).name).is_file()
    assert DOCKER / "redis" / Path(template).name == ACL_TEMPLATE
    assert redis["user"] not in ("root", "0")
    assert "ports" not in redis  # only the compose network reaches it
    # Every password the template names is required from .env, with no default.
    names = {match for rules in acl_users().values() for rule in rules
             for match in re.findall(r"^#\{([A-Z0-9_]+)\}$", rule)}
    assert names == {"REDIS_GATEWAY_PASSWORD", "REDIS_WORKER_PASSWORD"}
    for name in names:
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", redis["environment"][name])
    # The probe authenticates too, its password from the environment (not the command line).
    kind, probe = [interpolate(word) for word in redis["healthcheck"]["test"]]
    assert kind == "CMD-SHELL"
    assert 'REDISCLI_AUTH="$REDIS_WORKER_PASSWORD" redis-cli --user worker ping' in probe
    assert probe.endswith("| grep -q PONG")  # redis-cli exits 0 on NOAUTH


def test_redis_users_are_limited_to_their_keys_and_commands() -> None:
    users = acl_users()
    assert set(users) == {"default", "gateway", "worker"}
    assert users["default"] == ["off"]  # no command without a user and password
    # Every key a transport or the cache writes lies under the patterns below.
    for key in (job_stream("m", 0), reply_stream("g"), dead_letter_stream("m", 0),
                live_key("m", 0)):
        assert key.startswith("latentsieve:")
    allowed_keys = {"gateway": {"~latentsieve:*", f"~{KEY_PREFIX}*"}, "worker": {"~latentsieve:*"}}
    for name in ("gateway", "worker"):
        rules = users[name]
        assert rules[0] == "on" and rules[1] == f"#{{REDIS_{name.upper()}_PASSWORD}}", rules
        assert not {"nopass", "allkeys", "allcommands", "allchannels", "~*", "+@all"} & set(rules)
        assert not [rule for rule in rules[2:] if rule[0] in "#>&%"], rules  # one password
        assert {rule for rule in rules if rule.startswith("~")} == allowed_keys[name]
        assert "resetchannels" in rules
        commands = [rule for rule in rules if rule[0] in "+-"]
        assert commands[0] == "-@all", rules  # nothing but what follows
        granted = [rule[1:] for rule in commands[1:]]
        assert all(rule.startswith("+") and "@" not in rule for rule in commands[1:]), rules
        assert not {command.split("|")[0] for command in granted} & ADMIN_COMMANDS, granted
        assert [command for command in granted if "|" in command] in ([], ["xgroup|create"])
    # The workers never touch the score cache or delete a key outright.
    assert not {"set", "mget", "del", "expire"} & {rule[1:] for rule in users["worker"]}


def test_no_service_reaches_redis_without_credentials() -> None:
    """Every Redis URL names a user and a required password; none is on a command line."""
    url = re.compile(
        r"redis://(gateway|worker):\$\{REDIS_(GATEWAY|WORKER)_PASSWORD:\?[^}]+\}@redis:6379/\d+")
    found = []
    for services in (SERVICES, load(ROOT / "docker-compose.cpu.yml")["services"]):
        for name, service in services.items():
            for text in strings(service):
                if "redis://" in text or "rediss://" in text:
                    match = url.fullmatch(text)
                    assert match and match.group(1).upper() == match.group(2), (name, text)
                    found.append((name, match.group(1)))
            assert "--redis" not in [str(word) for word in service.get("command", [])], name
    assert sorted(found) == [("gateway", "gateway"), ("worker", "worker")]
    assert SERVICES["gateway"]["environment"]["LATENTSIEVE_REDIS_URL"].startswith(
        "redis://gateway:")


def test_gateway_serves_in_front_of_workers() -> None:
    gateway = SERVICES["gateway"]
    parsed = gateway_args()
    assert [p.command for p in parsed] == ["demo", "serve"]
    serve = parsed[-1]
    assert serve.host == "0.0.0.0" and serve.compute == "workers"
    assert re.fullmatch(r"redis://gateway:redis-gateway-password@redis:6379/\d+", serve.redis)
    assert f"127.0.0.1:8000:{serve.port}" in [interpolate(port) for port in gateway["ports"]]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "store:/store" in gateway["volumes"]


def test_workers_scale_reserve_a_gpu_and_read_the_store_only() -> None:
    worker = SERVICES["worker"]
    args = worker_args(worker)
    redis, gateway_redis = urlsplit(args.redis), urlsplit(gateway_args()[-1].redis)
    assert (redis.hostname, redis.port, redis.path) == (
        gateway_redis.hostname, gateway_redis.port, gateway_redis.path)
    assert (redis.username, redis.password) == ("worker", "redis-worker-password")
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
    worker = CPU_WORKER
    assert worker["deploy"] == {"!reset": True}
    assert worker["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    args = worker_args(worker)
    assert args.device == "cpu"
    assert args.metrics_port == worker_args(SERVICES["worker"]).metrics_port
    assert args.metrics_host == worker_args(SERVICES["worker"]).metrics_host
    assert "environment" not in worker  # the base file's: the worker's own Redis user


def test_worker_metrics_stay_on_the_compose_network() -> None:
    """A worker's /metrics listens on the container's interfaces (Prometheus scrapes it over
    the compose network) and is published nowhere; what is published is on loopback only."""
    assert build_parser().parse_args(
        ["worker", "--store", "s", "--redis", "redis://r"]).metrics_host == "127.0.0.1"
    for worker in (SERVICES["worker"], CPU_WORKER):
        assert worker_args(worker).metrics_host == "0.0.0.0"
        assert "ports" not in worker and "expose" not in worker
    port = str(worker_args(SERVICES["worker"]).metrics_port)
    for name, service in SERVICES.items():
        for published in service.get("ports", []):
            host, _, rest = interpolate(published).partition(":")
            assert host == "127.0.0.1", (name, published)
            assert rest.split(":")[-1] != port, (name, published)


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
    worker = worker_args(SERVICES["worker"])
    # Scraped from another container: the worker must not listen on loopback only.
    assert discovery["port"] == worker.metrics_port and worker.metrics_host == "0.0.0.0"


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


def test_grafana_has_no_default_password_and_no_anonymous_access() -> None:
    environment = SERVICES["grafana"]["environment"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}",
                        environment["GF_SECURITY_ADMIN_PASSWORD"])
    assert interpolate(environment["GF_AUTH_ANONYMOUS_ENABLED"]) == "false"  # unless opted in
    assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"


def env_example() -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )


def test_every_variable_compose_reads_is_in_env_example() -> None:
    documented = set(env_example())
    used = set()
    for path in (ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml"):
        used |= {match.group(1) for match in VARIABLE.finditer(path.read_text())}
    assert used <= documented, used - documented


def test_required_secrets_have_no_defaults() -> None:
    """A password is required (``${VAR:?message}``) wherever compose reads it, and
    .env.example leaves it blank: a stack never starts with a known one."""
    uses = [match for path in (ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml")
            for match in VARIABLE.finditer(path.read_text())]
    secrets = {match.group(1) for match in uses if re.search("PASSWORD|SECRET|TOKEN",
                                                              match.group(1))}
    assert secrets == {"REDIS_GATEWAY_PASSWORD", "REDIS_WORKER_PASSWORD",
                       "GRAFANA_ADMIN_PASSWORD"}
    example = env_example()
    for match in uses:
        if match.group(1) in secrets:
            assert match.group(2) == ":?" and match.group(3).strip(), match.group(0)
    required = {match.group(1) for match in uses if match.group(2) == ":?"}
    assert required == secrets
    assert all(example[name] == "" for name in required), example


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
