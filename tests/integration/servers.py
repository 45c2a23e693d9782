"""Start ``latentsieve serve`` as a real process on a free loopback port, for integration
tests (imported by the test modules of this folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest


def latentsieve_command() -> list[str]:
    """The installed ``latentsieve`` entry point (or ``python -m latentsieve.cli``)."""
    installed = Path(sys.executable).with_name("latentsieve")
    if installed.exists():
        return [str(installed)]
    found = shutil.which("latentsieve")
    return [found] if found else [sys.executable, "-m", "latentsieve.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    store: Path
    process: subprocess.Popen[bytes]
    log: Path


def clean_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its LATENTSIEVE_* variables, plus ``env``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSIEVE_")}
    environment.update(env or {})
    return environment


@contextlib.contextmanager
def running_server(
    store: Path, reload_interval_s: float, log: Path, processes: int = 1,
    env: dict[str, str] | None = None, args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """``latentsieve serve --store STORE [--processes N] [args]`` on a free port, ready, until
    the block ends; ``env`` adds to the environment (without this one's LATENTSIEVE_*)."""
    port = _free_port()
    environment = clean_environment({"LATENTSIEVE_RELOAD_INTERVAL_S": str(reload_interval_s)})
    environment.update(env or {})
    command = [
        *latentsieve_command(), "serve", "--store", str(store), "--port", str(port), *args
    ]
    if processes != 1:
        command += ["--processes", str(processes)]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=environment,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve not ready in 60 s: {log.read_text()}")
            time.sleep(0.1)
        yield Server(url, store, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Worker:
    """A ``latentsieve worker`` process and its ``/metrics`` address."""

    process: subprocess.Popen[bytes]
    metrics_url: str
    log: Path

    def metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=5).text

    def stop(self) -> None:
        """SIGTERM (a clean exit leaves the live sets), then wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_worker(
    store: Path, redis_url: str, log: Path, *args: str, ready_s: float = 60
) -> Worker:
    """``latentsieve worker`` with a metrics port, returned once it serves ``/metrics`` and
    its heartbeat is in Redis (it reports ``latentsieve_worker_up``)."""
    port = _free_port()
    command = [
        *latentsieve_command(), "worker", "--store", str(store), "--redis", redis_url,
        "--metrics-port", str(port), "--device", "cpu", *args,
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=clean_environment()
        )
    worker = Worker(process, f"http://127.0.0.1:{port}/metrics", log)
    deadline = time.monotonic() + ready_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}: {log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if "latentsieve_worker_up{" in worker.metrics():
                return worker
        if time.monotonic() > deadline:
            worker.stop()
            raise RuntimeError(f"worker not up in {ready_s} s: {log.read_text()}")
        time.sleep(0.1)


def tool(name: str) -> str:
    """The path of a Debian-packaged tool the suite needs (prometheus, promtool)."""
    found = shutil.which(name)
    if found is None:  # a failure, not a skip: `make system-deps` installs it
        pytest.fail(f"{name} is not installed (make system-deps installs Debian's prometheus)")
    return found


@contextlib.contextmanager
def running_prometheus(config: Path, folder: Path) -> Iterator[str]:
    """A real ``prometheus`` with ``config`` on a free loopback port, ready: its URL."""
    port = _free_port()
    log_path = folder / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'db'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def prometheus_query(url: str, expression: str) -> list[dict[str, Any]]:
    """The instant-query result of ``expression`` (an error answer fails the test)."""
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=10)
    assert answer.status_code == 200, (expression, answer.text)
    return list(answer.json()["data"]["result"])
