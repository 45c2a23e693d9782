"""One configuration source for the gateway and the scoring workers (issue 20, item 7): the
options of ``latentsieve serve`` and ``latentsieve worker`` are the fields of their settings
models, a value comes from the flag, else the variable, else the default, a value the model
refuses is one line, and ``--workers``/``LATENTSIEVE_WORKERS`` still set the gateway's processes
(deprecated, with a warning)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentsieve import cli
from latentsieve.service import main as service_main
from latentsieve.service.settings import Settings
from latentsieve.workers import stream_worker
from latentsieve.workers.settings import (
    ProcessSettings,
    WorkerOptions,
    option_of,
    variables,
)

REDIS = "redis://127.0.0.1:1/0"  # never reached: the commands below stop before Redis


@pytest.fixture(autouse=True)
def no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of this process's LATENTSIEVE_* variables: each test sets its own."""
    for name in [name for name in os.environ if name.startswith("LATENTSIEVE_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The Settings ``latentsieve serve`` hands to ``run_server`` (which does not run)."""
    seen: list[Settings] = []
    monkeypatch.setattr(service_main, "run_server",
                        lambda settings, log_level="warning": seen.append(settings))
    return seen


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[WorkerOptions]:
    """The WorkerOptions ``latentsieve worker`` hands to ``run_worker`` (which does not run)."""
    seen: list[WorkerOptions] = []

    async def run_worker(options: WorkerOptions, metrics_port: int | None = None,
                         stop: object = None, metrics_host: str = "") -> None:
        seen.append(options)

    monkeypatch.setattr(stream_worker, "run_worker", run_worker)
    return seen


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: argparse.ArgumentParser = commands.choices[name]
    return found


@pytest.mark.parametrize(("command", "model"), [("serve", Settings), ("worker", WorkerOptions)])
def test_the_options_are_the_fields_of_the_settings(
    command: str, model: type[ProcessSettings]
) -> None:
    """Every option shown is a marked field (and the other way round), with the field's help,
    variable and default: nothing about an option is written down twice."""
    shown = {
        action.option_strings[0]: action for action in subcommand(command)._actions
        if action.option_strings and action.dest != "help" and action.help != argparse.SUPPRESS
    }
    marked = {}
    for name, field in model.model_fields.items():
        option = option_of(field)
        if option is not None:
            marked[option.flag_of(name)] = (name, field)
    assert set(shown) == set(marked)
    for flag, (name, field) in marked.items():
        text = shown[flag].help or ""
        assert field.description and text.startswith(field.description), (flag, text)
        assert f"env: {variables(model, name)[0]}]" in text, (flag, text)
        if not field.is_required():
            default = field.get_default()
            if isinstance(default, bool):
                default = "on" if default else "off"
            expected = option_of(field).shown or ("none" if default is None else str(default))
            assert f"default: {expected};" in text, (flag, text)


def help_text(command: str, env: dict[str, str]) -> str:
    """``latentsieve COMMAND --help`` as a user's shell runs it, with ``env`` set."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSIEVE_")}
    done = subprocess.run(
        [sys.executable, "-m", "latentsieve.cli", command, "--help"],
        capture_output=True, text=True, timeout=120, env={**environment, **env}, check=True,
    )
    return " ".join(done.stdout.split())


def test_help_shows_the_variable_as_the_default_through_the_entry_point() -> None:
    plain = help_text("serve", {})
    assert "port to listen on [default: 8000; env: LATENTSIEVE_PORT]" in plain
    assert "[default: 1; env: LATENTSIEVE_PROCESSES]" in plain
    assert "--workers" not in plain  # the deprecated name works, but is not advertised
    told = help_text("serve", {"LATENTSIEVE_PORT": "9123", "LATENTSIEVE_WORKERS": "3"})
    assert "port to listen on [default: 9123; env: LATENTSIEVE_PORT]" in told
    assert "[default: 3; env: LATENTSIEVE_PROCESSES]" in told  # the old variable, read
    worker = help_text("worker", {"LATENTSIEVE_HEARTBEAT_TTL": "7.5"})
    assert "[default: 7.5; env: LATENTSIEVE_HEARTBEAT_TTL]" in worker
    assert "[default: 1024; env: LATENTSIEVE_MAX_BATCH_SIZE]" in worker


def test_gateway_flag_beats_variable_beats_default(
    served: list[Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    serve = ["serve", "--store", str(tmp_path)]
    assert cli.main(serve) == 0
    assert (served[-1].port, served[-1].host, served[-1].compute) == (8000, "127.0.0.1",
                                                                      "embedded")
    monkeypatch.setenv("LATENTSIEVE_PORT", "9001")
    monkeypatch.setenv("LATENTSIEVE_MAX_BODY_BYTES", "1234")  # no flag: the variable alone
    assert cli.main(serve) == 0
    assert (served[-1].port, served[-1].max_body_bytes) == (9001, 1234)
    assert cli.main([*serve, "--port", "9002"]) == 0
    assert served[-1].port == 9002
    monkeypatch.setenv("LATENTSIEVE_STORE", str(tmp_path / "from-variable"))
    assert cli.main(["serve"]) == 0
    assert served[-1].store == tmp_path / "from-variable"
    assert cli.main(serve) == 0
    assert served[-1].store == tmp_path


def test_worker_flag_beats_variable_beats_default(
    started: list[WorkerOptions], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    worker = ["worker", "--store", str(tmp_path), "--redis", REDIS, "--device", "cpu"]
    assert cli.main(worker) == 0
    first = started[-1]
    assert (first.max_batch_size, first.heartbeat_ttl_s, first.models, first.shards) == (
        1024, 3.0, None, None)
    assert first.device == "cpu" and first.refresh_interval_s == 2.0
    monkeypatch.setenv("LATENTSIEVE_MAX_BATCH_SIZE", "77")
    monkeypatch.setenv("LATENTSIEVE_HEARTBEAT_TTL", "7.5")
    monkeypatch.setenv("LATENTSIEVE_SHARDS", "0, 2")
    monkeypatch.setenv("LATENTSIEVE_RELOAD_INTERVAL_S", "0.5")  # the gateway's, shared
    assert cli.main(worker) == 0
    told = started[-1]
    assert (told.max_batch_size, told.heartbeat_ttl_s, told.shards) == (77, 7.5, (0, 2))
    assert told.refresh_interval_s == 0.5
    assert cli.main([*worker, "--max-batch-size", "5", "--heartbeat-ttl", "1.5",
                     "--shards", "1", "--models", "a,b"]) == 0
    flagged = started[-1]
    assert (flagged.max_batch_size, flagged.heartbeat_ttl_s, flagged.shards, flagged.models) == (
        5, 1.5, (1,), ("a", "b"))


def test_the_models_read_the_same_variables_without_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Made in Python (tests, an embedding program), a model reads the variables the command
    line documents; an argument beats a variable."""
    monkeypatch.setenv("LATENTSIEVE_STORE", str(tmp_path))
    monkeypatch.setenv("LATENTSIEVE_REDIS_URL", REDIS)
    monkeypatch.setenv("LATENTSIEVE_HEARTBEAT_TTL", "4.5")
    monkeypatch.setenv("LATENTSIEVE_DEVICE", "cpu")
    options = WorkerOptions()  # type: ignore[call-arg]
    assert (options.store, options.redis_url, options.heartbeat_ttl_s) == (tmp_path, REDIS, 4.5)
    assert WorkerOptions(heartbeat_ttl_s=0.6).heartbeat_ttl_s == 0.6  # type: ignore[call-arg]
    monkeypatch.setenv("LATENTSIEVE_PROCESSES", "2")
    monkeypatch.setenv("LATENTSIEVE_WORKERS", "5")  # the deprecated name loses to the new one
    assert Settings().processes == 2  # type: ignore[call-arg]
    assert Settings(processes=3).processes == 3  # type: ignore[call-arg]


def warnings_logged(text: str) -> list[dict[str, object]]:
    return [line for line in map(json.loads, filter(None, text.splitlines()))
            if line["level"] == "warning"]


def test_workers_is_a_deprecated_name_of_processes(
    served: list[Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    serve = ["serve", "--store", str(tmp_path)]
    assert cli.main([*serve, "--processes", "2"]) == 0
    assert served[-1].processes == 2
    assert not warnings_logged(capsys.readouterr().err)
    assert cli.main([*serve, "--workers", "3"]) == 0
    assert served[-1].processes == 3
    (warning,) = warnings_logged(capsys.readouterr().err)
    assert (warning["option"], warning["instead"]) == ("--workers", "--processes")
    monkeypatch.setenv("LATENTSIEVE_WORKERS", "4")
    assert cli.main(serve) == 0
    assert served[-1].processes == 4
    (warning,) = warnings_logged(capsys.readouterr().err)
    assert (warning["variable"], warning["instead"]) == ("LATENTSIEVE_WORKERS",
                                                        "LATENTSIEVE_PROCESSES")
    assert cli.main([*serve, "--processes", "5"]) == 0  # the flag wins over any variable
    assert served[-1].processes == 5
    monkeypatch.setenv("LATENTSIEVE_PROCESSES", "6")
    assert cli.main(serve) == 0
    assert served[-1].processes == 6


def refused(argv: list[str], env: dict[str, str]) -> str:
    """stderr of ``latentsieve ARGV`` run as a user's shell runs it, which must exit 2."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSIEVE_")}
    done = subprocess.run([sys.executable, "-m", "latentsieve.cli", *argv], capture_output=True,
                          text=True, timeout=300, env={**environment, **env})
    assert done.returncode == 2, (done.stdout, done.stderr)
    return done.stderr


def test_a_refused_value_is_one_line_through_the_entry_point(tmp_path: Path) -> None:
    stderr = refused(["serve", "--store", str(tmp_path)], {"LATENTSIEVE_PORT": "70000"})
    assert stderr == ("latentsieve: error: --port (LATENTSIEVE_PORT): input should be less than "
                      "or equal to 65535, got 70000\n")


def error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1, stderr
    return stderr.removeprefix("latentsieve: error: ").removesuffix("\n")


def test_each_refused_value_names_its_option_and_variable(
    served: list[Settings], started: list[WorkerOptions], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    worker = ["worker", "--store", str(tmp_path), "--redis", "redis://user:secret@host:1/0"]
    line = error_line([*worker, "--max-batch-size", "0", "--heartbeat-ttl", "-1"], capsys)
    assert line == ("--max-batch-size (LATENTSIEVE_MAX_BATCH_SIZE): input should be greater than "
                    "or equal to 1, got 0; --heartbeat-ttl (LATENTSIEVE_HEARTBEAT_TTL): input "
                    "should be greater than 0, got -1.0")
    assert error_line([*worker, "--shards", "0,x"], capsys) == (
        "--shards (LATENTSIEVE_SHARDS): must be shard numbers like 0,1, got '0,x'")
    assert error_line([*worker, "--models", " , "], capsys) == (
        "--models (LATENTSIEVE_MODELS): names nothing, got ' , '")
    serve = ["serve", "--store", str(tmp_path)]
    assert error_line([*serve, "--compute", "workers"], capsys) == (
        "--compute workers needs --redis URL (LATENTSIEVE_REDIS_URL)")
    assert error_line([*serve, "--device", "gpu"], capsys) == (
        "--device (LATENTSIEVE_DEVICE): must be auto, cpu, cuda or cuda:I, got 'gpu'")
    monkeypatch.setenv("LATENTSIEVE_COMPUTE", "elsewhere")  # a variable gets no argparse check
    assert error_line(serve, capsys) == (
        "--compute (LATENTSIEVE_COMPUTE): input should be 'embedded' or 'workers', got "
        "'elsewhere'")
    monkeypatch.delenv("LATENTSIEVE_COMPUTE")
    monkeypatch.setenv("LATENTSIEVE_MAX_JSON_DEPTH", "1")  # not an option: named by its variable
    assert error_line(serve, capsys) == (
        "LATENTSIEVE_MAX_JSON_DEPTH: input should be greater than or equal to 2, got '1'")
    assert not served and not started


def test_a_blank_redis_url_is_none(served: list[Settings], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTSIEVE_REDIS_URL", "")  # compose's ${VAR:-}
    assert cli.main(["serve", "--store", str(tmp_path)]) == 0
    assert served[-1].redis_url is None


def test_the_settings_round_trip_through_their_variables(tmp_path: Path) -> None:
    """What ``serve --processes N`` writes for its processes rebuilds the same settings; each
    field under its own name (the worker's heartbeat under LATENTSIEVE_HEARTBEAT_TTL)."""
    options = WorkerOptions(store=tmp_path, redis_url=REDIS, device="cpu", shards=(0, 3),
                            heartbeat_ttl_s=1.25, models=("a",))
    env = options.environment()
    assert env["LATENTSIEVE_HEARTBEAT_TTL"] == "1.25" and env["LATENTSIEVE_SHARDS"] == "0,3"
    assert "LATENTSIEVE_HEARTBEAT_TTL_S" not in env
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert WorkerOptions() == options  # type: ignore[call-arg]
