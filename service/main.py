"""``latentsieve serve``: the gateway under uvicorn, from its ``Settings``.

``--processes N`` (N > 1) runs N gateway processes on one port (uvicorn's ``workers=``; hosts
scale further by replicas behind a load balancer). They are not the scoring workers of
``--compute workers``: each is a whole gateway. What the processes must agree on is fixed here,
in the parent, before they start:

- **Settings.** The parent's ``Settings`` are written back to ``LATENTSIEVE_*`` variables, from
  which each process's factory reads the same ``Settings()``.
- **Metrics.** ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) makes any
  process's ``/metrics`` the sum of all; the score buckets are fixed from the store's manifests.
- **Reload.** Every process polls the store (``reload_interval_s``); SIGHUP to the parent makes
  uvicorn restart the processes one by one, each loading the newest versions.

Not shared: the in-process score cache (configure Redis to share one) and memory (each process
holds its own copy of every served index, or none in front of scoring workers).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from latentsieve.index.errors import StoreError
from latentsieve.index.store import LatentStore
from latentsieve.logs import uvicorn_log_config
from latentsieve.service.app import create_app
from latentsieve.service.metrics import MULTIPROC_ENV, log_density_buckets
from latentsieve.service.settings import Settings
from latentsieve.workers.devices import resolve_device

LOG_LEVEL_ENV = "LATENTSIEVE_LOG_LEVEL"
PROCESS_FACTORY = "latentsieve.service.main:process_app"
RESOURCE_TRACKER_NOTICE = "ignore:resource_tracker:UserWarning"
# How long uvicorn waits for a restarted process (SIGHUP) to be ready before it keeps the old
# one and aborts the reload. uvicorn's 5 s default is less than a process needs on a busy host
# to import torch and load its indexes: the reload was silently abandoned.
PROCESS_READY_TIMEOUT_S = 120


def process_app() -> FastAPI:
    """The app of one of the gateway processes uvicorn runs: settings from the environment."""
    from latentsieve.logs import configure_logging

    configure_logging(os.environ.get(LOG_LEVEL_ENV, "warning"))
    return create_app(Settings(), drain_on_signals=True)  # type: ignore[call-arg]


@contextlib.contextmanager
def metrics_folder() -> Iterator[str]:
    """The multiprocess metrics folder: ``PROMETHEUS_MULTIPROC_DIR`` emptied of ``*.db`` files
    when set (counts start at 0, as on a restart), else a temporary folder removed after."""
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


def store_log_density_buckets(store: Path) -> tuple[float, ...]:
    """The score buckets a single process would derive at start-up, from the manifests of each
    model's newest version (read without loading an index)."""
    latents = LatentStore(store)
    ranges = []
    for model in latents.models():
        version = latents.newest(model)
        if version is None:
            continue
        try:
            calibration = latents.read_manifest(model, version).calibration
        except StoreError:
            continue  # the processes will skip it too
        ranges.append((calibration.log_density_min, calibration.log_density_max))
    return log_density_buckets(ranges)


def serve_processes(settings: Settings, log_level: str = "warning") -> None:
    """Serve ``settings`` with ``settings.processes`` uvicorn processes until SIGINT/SIGTERM."""
    if settings.log_density_buckets is None:  # one set of buckets for every process
        settings = settings.model_copy(
            update={"log_density_buckets": list(store_log_density_buckets(settings.store))}
        )
    with metrics_folder() as folder:
        for name in [key for key in os.environ if key.startswith("LATENTSIEVE_")]:
            del os.environ[name]  # the processes must read exactly these settings
        os.environ.update(settings.environment())
        os.environ[LOG_LEVEL_ENV] = log_level
        os.environ[MULTIPROC_ENV] = folder  # before the processes import prometheus_client
        # multiprocessing's resource tracker (its own process, without our logging) reports
        # the semaphores of processes stopped by a signal, which it then removes itself, as a
        # plain-text warning at exit: silenced so that every line on stderr is JSON.
        os.environ["PYTHONWARNINGS"] = ",".join(
            filter(None, [os.environ.get("PYTHONWARNINGS"), RESOURCE_TRACKER_NOTICE])
        )
        uvicorn.run(
            PROCESS_FACTORY, factory=True, host=settings.host, port=settings.port,
            workers=settings.processes, log_level=log_level, access_log=False,
            log_config=uvicorn_log_config(), timeout_graceful_shutdown=10,
            **_process_ready_timeout(),
        )


def _process_ready_timeout() -> dict[str, Any]:
    """``timeout_worker_healthcheck`` where this uvicorn has it (newer than our lower bound)."""
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters:
        return {"timeout_worker_healthcheck": PROCESS_READY_TIMEOUT_S}
    return {}


def run_server(settings: Settings, log_level: str = "warning") -> None:
    """Serve the store until SIGINT/SIGTERM; SIGHUP checks the store for new versions now.

    ``settings.processes`` gateway processes share the port.
    """
    if settings.compute == "embedded":
        resolve_device(settings.device)  # a missing GPU stops here, before any process starts
    if settings.processes > 1:
        serve_processes(settings, log_level)
        return
    # One process in multiprocess metrics mode (PROMETHEUS_MULTIPROC_DIR set by the caller):
    # an earlier run's files are removed, as ``--processes`` removes them.
    folder = metrics_folder() if os.environ.get(MULTIPROC_ENV) else contextlib.nullcontext()
    with folder:
        app = create_app(settings, reload_on_sighup=True, drain_on_signals=True)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
            log_config=uvicorn_log_config(), timeout_graceful_shutdown=10,
        )
        uvicorn.Server(config).run()
