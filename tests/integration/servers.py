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

import httpx


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


@contextlib.contextmanager
def running_server(
    store: Path, reload_interval_s: float, log: Path, workers: int = 1,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``latentsieve serve --store STORE [--workers N]`` on a free port, ready, until the block
    ends; ``env`` adds to the environment (without this one's LATENTSIEVE_* variables)."""
    port = _free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSIEVE_")}
    environment["LATENTSIEVE_RELOAD_INTERVAL_S"] = str(reload_interval_s)
    environment.update(env or {})
    command = [*latentsieve_command(), "serve", "--store", str(store), "--port", str(port)]
    if workers != 1:
        command += ["--workers", str(workers)]
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
