"""``latentsieve serve``: settings from the arguments and ``LATENTSIEVE_*``, then uvicorn.

``--workers N`` (N > 1) runs uvicorn's own worker processes on one port (uvicorn's
``workers=``; hosts scale further by replicas behind a load balancer). What the processes must
agree on is fixed here, in the parent, before they start:

- **Settings.** The parent's ``Settings`` are written back to ``LATENTSIEVE_*`` variables, from
  which each worker's factory reads the same ``Settings()``.
- **Metrics.** ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode) makes any
  worker's ``/metrics`` the sum of all; the score buckets are fixed from the store's manifests.
- **Reload.** Every worker polls the store (``reload_interval_s``); SIGHUP to the parent makes
  uvicorn restart the workers one by one, each loading the newest versions.

Not shared: the in-process score cache (configure Redis to share one) and memory (each worker
holds its own copy of every served index, or none in front of Redis workers).
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
from pydantic import ValidationError

from latentsieve.index.errors import StoreError
from latentsieve.index.store import LatentStore
from latentsieve.logs import uvicorn_log_config
from latentsieve.service.app import create_app
from latentsieve.service.metrics import MULTIPROC_ENV, log_density_buckets
from latentsieve.service.settings import Settings
from latentsieve.workers.devices import resolve_device

LOG_LEVEL_ENV = "LATENTSIEVE_LOG_LEVEL"
WORKER_FACTORY = "latentsieve.service.main:worker_app"
RESOURCE_TRACKER_NOTICE = "ignore:resource_tracker:UserWarning"
# How long uvicorn waits for a restarted worker (SIGHUP) to be ready before it keeps the old one
# and aborts the reload. uvicorn's 5 s default is less than a worker needs on a busy host to
# import torch and load its indexes: the reload was silently abandoned.
WORKER_READY_TIMEOUT_S = 120


def worker_app() -> FastAPI:
    """The app of one of uvicorn's worker processes: settings from the environment."""
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
            continue  # the workers will skip it too
        ranges.append((calibration.log_density_min, calibration.log_density_max))
    return log_density_buckets(ranges)


def serve_workers(settings: Settings, log_level: str = "warning") -> None:
    """Serve ``settings`` with uvicorn's ``settings.workers`` processes until SIGINT/SIGTERM."""
    if settings.log_density_buckets is None:  # one set of buckets for every worker
        settings = settings.model_copy(
            update={"log_density_buckets": list(store_log_density_buckets(settings.store))}
        )
    with metrics_folder() as folder:
        for name in [key for key in os.environ if key.startswith("LATENTSIEVE_")]:
            del os.environ[name]  # the workers must read exactly these settings
        os.environ.update(settings.environment())
        os.environ[LOG_LEVEL_ENV] = log_level
        os.environ[MULTIPROC_ENV] = folder  # before the workers import prometheus_client
        # multiprocessing's resource tracker (its own process, without our logging) reports
        # the semaphores of workers stopped by a signal, which it then removes itself, as a
        # plain-text warning at exit: silenced so that every line on stderr is JSON.
        os.environ["PYTHONWARNINGS"] = ",".join(
            filter(None, [os.environ.get("PYTHONWARNINGS"), RESOURCE_TRACKER_NOTICE])
        )
        uvicorn.run(
            WORKER_FACTORY, factory=True, host=settings.host, port=settings.port,
            workers=settings.workers, log_level=log_level, access_log=False,
            log_config=uvicorn_log_config(), timeout_graceful_shutdown=10,
            **_worker_ready_timeout(),
        )


def _worker_ready_timeout() -> dict[str, Any]:
    """``timeout_worker_healthcheck`` where this uvicorn has it (newer than our lower bound)."""
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.run).parameters:
        return {"timeout_worker_healthcheck": WORKER_READY_TIMEOUT_S}
    return {}


def run_server(
    store: str | Path, host: str = "127.0.0.1", port: int = 8000, redis_url: str | None = None,
    workers: int | None = None, log_level: str = "warning", device: str | None = None,
    compute: str | None = None, allow_request_sigma: bool | None = None,
) -> None:
    """Serve the store until SIGINT/SIGTERM; SIGHUP checks the store for new versions now.

    ``workers`` (default ``LATENTSIEVE_WORKERS``, else 1) processes share the port.
    """
    overrides: dict[str, Any] = {"store": Path(store), "host": host, "port": port}
    if redis_url:
        overrides["redis_url"] = redis_url
    if workers is not None:
        overrides["workers"] = workers
    if compute is not None:
        overrides["compute"] = compute
    if allow_request_sigma is not None:
        overrides["allow_request_sigma"] = allow_request_sigma
    if device is not None:
        resolve_device(device)  # one line for a bad or absent device, before Settings
        overrides["device"] = device
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from exc
    if settings.compute == "embedded":
        resolve_device(settings.device)  # a missing GPU stops here, before any process starts
    if settings.workers > 1:
        serve_workers(settings, log_level)
        return
    # One process in multiprocess metrics mode (PROMETHEUS_MULTIPROC_DIR set by the caller):
    # an earlier run's files are removed, as ``--workers`` removes them.
    folder = metrics_folder() if os.environ.get(MULTIPROC_ENV) else contextlib.nullcontext()
    with folder:
        app = create_app(settings, reload_on_sighup=True, drain_on_signals=True)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=log_level, access_log=False,
            log_config=uvicorn_log_config(), timeout_graceful_shutdown=10,
        )
        uvicorn.Server(config).run()
