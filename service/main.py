"""``latentsieve serve``: settings from the arguments and ``LATENTSIEVE_*``, then uvicorn."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import uvicorn

from service.app import create_app
from service.metrics import MULTIPROC_ENV
from service.multiworker import metrics_folder, serve_workers
from service.settings import Settings
from workers.devices import resolve_device


def run_server(
    store: str | Path, host: str = "127.0.0.1", port: int = 8000, redis_url: str | None = None,
    workers: int | None = None, log_level: str = "warning", device: str | None = None,
) -> None:
    """Serve the store until SIGINT/SIGTERM; SIGHUP checks the store for new versions now.

    ``workers`` (default ``LATENTSIEVE_WORKERS``, else 1) processes share the port; see
    ``service.multiworker`` for what they share and what each keeps to itself.
    """
    overrides: dict[str, Any] = {"store": Path(store), "host": host, "port": port}
    if redis_url:
        overrides["redis_url"] = redis_url
    if workers is not None:
        overrides["workers"] = workers
    if device is not None:
        resolve_device(device)  # one line for a bad or absent device, before Settings
        overrides["device"] = device
    settings = Settings(**overrides)
    resolve_device(settings.device)  # a missing GPU stops here, before any process starts
    if settings.workers > 1:
        serve_workers(settings, log_level)
        return
    # One process in multiprocess metrics mode (PROMETHEUS_MULTIPROC_DIR set by the caller):
    # an earlier run's files are removed, as ``--workers`` removes them.
    folder = metrics_folder() if os.environ.get(MULTIPROC_ENV) else contextlib.nullcontext()
    with folder:
        app = create_app(settings, reload_on_sighup=True)
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
            timeout_graceful_shutdown=10,
        )
        uvicorn.Server(config).run()
