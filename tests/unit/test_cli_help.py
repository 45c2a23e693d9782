"""The command line tells the truth about itself: ``--version``, and on every command's ``--help``
each option's default, environment variable and choices (issue 11, packaging)."""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from latentsieve import cli
from latentsieve.index.bandwidth import AUTO_K
from latentsieve.index.build import (
    DEFAULT_CALIBRATION_COUNT,
    DEFAULT_SPACE,
    DescriptorOptions,
)
from latentsieve.index.manifest import DEFAULT_MAX_ERROR, Policy
from latentsieve.index.projection import ACTIVE_THRESHOLD


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[
    tuple[str, ...], argparse.ArgumentParser
]:
    """Every (sub)command's parser by its words, the top-level one included."""
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, (*path, name)))
    return found


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option --help shows (a deprecated name, e.g. ``serve --workers``, is hidden)."""
    return [
        action for action in parser._actions
        if action.option_strings and action.dest not in ("help", "version")
        and action.help != argparse.SUPPRESS
    ]


def test_every_option_of_every_command_says_its_default_variable_and_choices() -> None:
    found = commands(cli.build_parser())
    expected = {("serve",), ("worker",), ("score",), ("index", "build"), ("report",), ("demo",)}
    assert expected <= set(found)
    checked = 0
    for words, parser in found.items():
        for action in options(parser):
            name = action.option_strings[0]
            text = action.help or ""
            expected = "LATENTSIEVE_" + name[2:].upper().replace("-", "_")
            if name == "--redis":
                expected = "LATENTSIEVE_REDIS_URL"
            assert f"env: {expected}]" in text, (words, name, text)
            assert re.search(r"\[(?:[^]]*; )?(required|default: [^;]+);", text), (words, name, text)
            if action.choices:
                assert "choices: " + ", ".join(action.choices) in text, (words, name, text)
            checked += 1
    assert checked > 60
    # The same text reaches the rendered help.
    rendered = found[("worker",)].format_help()
    assert "env: LATENTSIEVE_CLAIM_IDLE_MS" in " ".join(rendered.split())


def shown_default(words: tuple[str, ...], option: str) -> str:
    parser = commands(cli.build_parser())[words]
    (action,) = [a for a in options(parser) if option in a.option_strings]
    match = re.search(r"default: ([^;]+);", action.help or "")
    assert match, action.help
    return match.group(1)


def test_defaults_shown_for_later_decided_options_are_the_real_ones() -> None:
    build = ("index", "build")
    descriptors = DescriptorOptions()
    assert shown_default(build, "--max-error") == str(DEFAULT_MAX_ERROR)
    assert shown_default(build, "--bandwidth-neighbours") == str(AUTO_K)
    assert shown_default(build, "--calibration-count") == str(DEFAULT_CALIBRATION_COUNT)
    assert shown_default(build, "--active-threshold") == str(ACTIVE_THRESHOLD)
    assert shown_default(build, "--space") == DEFAULT_SPACE
    assert shown_default(build, "--min-percentile") == str(Policy().min_percentile)
    assert shown_default(build, "--descriptor-calibration-count") == str(
        descriptors.calibration_count)
    assert shown_default(build, "--projection-rows") == str(descriptors.projection_rows)
    assert shown_default(build, "--projection-seed") == str(descriptors.projection_seed)
    assert shown_default(build, "--delta-directions") == str(descriptors.delta_directions)
    assert shown_default(("serve",), "--port") == "8000"
    assert shown_default(("worker",), "--claim-idle-ms") == "10000"


def test_a_variable_becomes_the_shown_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTSIEVE_HEARTBEAT_TTL", "7.5")
    assert shown_default(("worker",), "--heartbeat-ttl") == "7.5"


def test_worker_metrics_listen_on_loopback_unless_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker's /metrics is not on every interface by default (issue 22): the CLI's default
    is the functions' own, and --metrics-host reaches the metrics server."""
    from latentsieve.workers import stream_worker

    assert shown_default(("worker",), "--metrics-host") == "127.0.0.1"
    assert inspect.signature(stream_worker.serve_metrics).parameters["host"].default == (
        "127.0.0.1")
    assert inspect.signature(stream_worker.run_worker).parameters["metrics_host"].default == (
        "127.0.0.1")
    called: dict[str, object] = {}

    async def run_worker(options: object, metrics_port: int | None = None,
                         stop: object = None, metrics_host: str = "") -> None:
        called.update(port=metrics_port, host=metrics_host)

    monkeypatch.setattr(stream_worker, "run_worker", run_worker)
    worker = ["worker", "--store", str(tmp_path), "--redis", "redis://127.0.0.1:1/0",
              "--device", "cpu", "--metrics-port", "9100"]
    assert cli.main(worker) == 0
    assert called == {"port": 9100, "host": "127.0.0.1"}
    assert cli.main([*worker, "--metrics-host", "0.0.0.0"]) == 0
    assert called == {"port": 9100, "host": "0.0.0.0"}
    monkeypatch.setenv("LATENTSIEVE_METRICS_HOST", "10.0.0.5")
    assert cli.main(worker) == 0
    assert called["host"] == "10.0.0.5"


def test_version_is_the_installed_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"latentsieve {version('latentsieve')}"


def test_two_faiss_builds_are_refused_with_what_to_do() -> None:
    assert cli.faiss_conflict(["numpy", "faiss-cpu", "torch"]) is None
    assert cli.faiss_conflict(["faiss_gpu_cu12"]) is None
    problem = cli.faiss_conflict(["faiss-cpu", "faiss_gpu_cu12", "numpy"])
    assert problem is not None
    assert "faiss-cpu, faiss-gpu-cu12" in problem and "never both" in problem


BLOCK_SERVER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_the_client_install_works_without_the_server_modules() -> None:
    """What ``pip install latentsieve`` (no extra) gets: the client and ``--version``; a server
    command says which extra to install instead of a traceback."""
    script = BLOCK_SERVER.format(blocked=sorted(cli.SERVER_MODULES)) + """
from latentsieve.service.client import LatentSieveClient
from latentsieve import cli
assert "torch" not in sys.modules and "faiss" not in sys.modules
code = cli.main(["serve", "--store", "nowhere"])
print("exit", code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "exit 2" in done.stdout
    assert "pip install 'latentsieve[cpu]'" in done.stderr
    assert "Traceback" not in done.stderr
