"""``latentsieve serve --workers N``: one gateway served by N processes on one socket.

A single Python process answers on one core; a cached ``POST /score`` is pure interpreter time,
so past one core's worth of requests the latency is queueing. N workers share the listening
socket (uvicorn's supervisor, ``spawn`` start method) and each runs the whole app: its own
registry, batcher, compute thread and in-process cache. What must be one across them is made
one here:

- **Settings.** The parent's ``Settings`` (arguments and ``LATENTSIEVE_*``) are written back to
  ``LATENTSIEVE_*`` variables, from which each worker reads the same ``Settings()``.
- **Metrics.** ``PROMETHEUS_MULTIPROC_DIR`` puts every worker's counts in mmap files that any
  worker's ``/metrics`` merges (``service.metrics``). The folder is the caller's when that
  variable is set (its old ``*.db`` files are removed: counts start at 0, as on a restart),
  else a temporary one removed on exit.
- **Reload.** SIGHUP to the parent is forwarded to every worker, which checks the store for new
  versions in place (uvicorn's own SIGHUP would restart the workers, dropping their caches);
  each worker also polls the store on its own.
- **Exits.** A worker that dies is replaced by uvicorn; its live queue-depth gauge is removed
  from the sum.

Not shared: the in-process score cache (each worker warms its own; configure Redis to share
one) and memory (each worker holds its own copy of every served index).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.supervisors import Multiprocess

from service.metrics import MULTIPROC_ENV
from service.settings import Settings

log = logging.getLogger(__name__)

LOG_LEVEL_ENV = "LATENTSIEVE_LOG_LEVEL"
WORKER_FACTORY = "service.multiworker:worker_app"


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn's factory): settings from the environment."""
    from latentsieve.logs import configure_logging
    from service.app import create_app

    configure_logging(os.environ.get(LOG_LEVEL_ENV, "warning"))
    return create_app(Settings(), reload_on_sighup=True)  # type: ignore[call-arg]


class WorkerSupervisor(Multiprocess):
    """uvicorn's supervisor, with SIGHUP forwarded (reload in place) and dead workers' live
    gauges dropped from the metrics."""

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], metrics_dir: str
    ) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir

    def handle_hup(self) -> None:
        log.info("SIGHUP: every worker checks the store for new versions")
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)

    def keep_subprocess_alive(self) -> None:
        before = {process.pid for process in self.processes}
        super().keep_subprocess_alive()
        for pid in before - {process.pid for process in self.processes}:
            if pid is not None:
                mark_process_dead(pid, self.metrics_dir)


@contextlib.contextmanager
def metrics_folder() -> Iterator[str]:
    """The multiprocess metrics folder: ``PROMETHEUS_MULTIPROC_DIR`` emptied of ``*.db`` files
    when set, else a temporary folder removed afterwards."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        yield str(folder)
        return
    created = tempfile.mkdtemp(prefix="latentsieve-metrics-")
    try:
        yield created
    finally:
        shutil.rmtree(created, ignore_errors=True)


def serve_workers(settings: Settings, log_level: str = "warning") -> None:
    """Serve ``settings`` with ``settings.workers`` processes until SIGINT/SIGTERM."""
    with metrics_folder() as folder:
        for name in [key for key in os.environ if key.startswith("LATENTSIEVE_")]:
            del os.environ[name]  # the workers must read exactly these settings
        os.environ.update(settings.environment())
        os.environ[LOG_LEVEL_ENV] = log_level
        os.environ[MULTIPROC_ENV] = folder  # before the workers import prometheus_client
        config = uvicorn.Config(
            WORKER_FACTORY, factory=True, host=settings.host, port=settings.port,
            workers=settings.workers, log_level="warning", access_log=False,
            timeout_graceful_shutdown=10,
        )
        listener = config.bind_socket()
        log.info("gateway workers starting", extra={"workers": settings.workers,
                                                    "metrics_dir": folder})
        try:
            WorkerSupervisor(config, sockets=[listener], metrics_dir=folder).run()
        finally:
            listener.close()
