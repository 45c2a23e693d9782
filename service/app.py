"""The app factory: ``create_app(settings)`` builds everything a request needs.

The lifespan loads the newest version of every model in the store, builds the score cache,
starts the batcher loop and the hot-reload task, and stops them all on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client.multiprocess import mark_process_dead

from latentsieve.index.store import LatentStore
from latentsieve.service.access import RequestObserver
from latentsieve.service.auth import OPEN_PATHS, ApiKeyMiddleware
from latentsieve.service.cache import make_cache
from latentsieve.service.drain import Drain, DrainMiddleware
from latentsieve.service.engine import ScoringEngine
from latentsieve.service.errors import install_error_handlers
from latentsieve.service.metrics import (
    FLUSH_INTERVAL_S,
    ServiceMetrics,
    log_density_buckets,
    multiprocess_dir,
)
from latentsieve.service.registry import ModelRegistry
from latentsieve.service.routers import health, models, scoring
from latentsieve.service.runtime import Runtime
from latentsieve.service.schemas import ScoreRequest, SelectRequest
from latentsieve.service.settings import Settings
from latentsieve.service.stream_compute import StreamCompute
from latentsieve.workers.density import FLOAT64_OPERANDS
from latentsieve.workers.devices import resolve_device
from latentsieve.workers.local_compute import LocalCompute, ModelBatchers
from latentsieve.workers.transport import Compute, QueueLimits

log = logging.getLogger(__name__)

def _document_limits(components: dict[str, Any], settings: Settings) -> None:
    """This deployment's limits in the request schemas (past them the answer is 413)."""
    score = components["ScoreRequest"]["properties"]
    score["seeds"]["maxItems"] = settings.max_batch
    score["latents"]["oneOf"][0]["maxItems"] = settings.max_batch
    shape = components["EncodedLatents"]["properties"]["shape"]
    shape["prefixItems"] = [{"type": "integer", "minimum": 1, "maximum": settings.max_batch}]
    select = components["SelectRequest"]["properties"]
    select["count"]["maximum"] = settings.select_max_count
    select["keep"]["maximum"] = settings.max_batch
    select["latents"]["oneOf"][0]["maxItems"] = settings.max_batch


def _install_openapi(app: FastAPI, settings: Settings) -> None:
    """The spec: the hand-parsed request bodies' schemas with this deployment's limits and,
    when keys are configured, the API-key security every route but the open ones
    (/healthz, /readyz) requires."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ScoreRequest, SelectRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            _document_limits(components, settings)
            if settings.api_keys:
                schema["components"]["securitySchemes"] = {
                    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                    "BearerKey": {"type": "http", "scheme": "bearer"},
                }
                schema["security"] = [{"ApiKeyHeader": []}, {"BearerKey": []}]
                for path in OPEN_PATHS:
                    for operation in schema["paths"].get(path, {}).values():
                        operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _every_shard(
    registry: ModelRegistry, live: dict[tuple[str, int], list[str]]
) -> dict[tuple[str, int], list[str]]:
    """Live worker devices for every shard of every served model (empty lists included)."""
    return {
        (name, shard): live.get((name, shard), [])
        for name, served in registry.snapshot().items()
        for shard in range(len(served.view.manifest.shard_layout()))
    }


def _telemetry_options(enabled: bool) -> dict[str, Any]:
    """FastAPI's native OpenTelemetry (FastAPI >= 0.16x) off unless asked for: it checks the
    global providers on every request (~5 us), and this service reports through Prometheus."""
    if enabled or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


async def _flush_metrics(metrics: ServiceMetrics) -> None:
    """Multiprocess mode: write this gateway process's score histograms for the others'
    scrapes."""
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        metrics.flush()


def _make_compute(
    settings: Settings, registry: ModelRegistry, metrics: ServiceMetrics, device: str
) -> Compute:
    """The transport of ``settings.compute``: this process's batchers, or Redis workers."""
    limits = QueueLimits(settings.queue_limit, settings.model_queue_limit)
    if settings.compute == "workers":
        assert settings.redis_url is not None  # Settings refuses workers without Redis
        return StreamCompute(
            settings.redis_url,
            lambda: {
                name: len(served.view.manifest.shard_layout())
                for name, served in registry.snapshot().items()
            },
            limits,
        )
    batchers = ModelBatchers(
        settings.max_batch_size,
        settings.max_wait_ms,
        limits,
        on_batch=lambda key, size, seconds: metrics.observe_batch(
            key.model, device, size, seconds
        ),
        on_queue_change=metrics.queue_changed,
    )
    return LocalCompute(batchers, device)


def create_app(
    settings: Settings, *, reload_on_sighup: bool = False, drain_on_signals: bool = False
) -> FastAPI:
    """The gateway for ``settings``. When it owns the process: ``reload_on_sighup``, and
    ``drain_on_signals`` (SIGTERM/SIGINT drain the requests in flight: service/drain.py)."""
    drain = Drain(settings.drain_linger_s, settings.drain_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded = settings.compute == "embedded"
        FLOAT64_OPERANDS.limit = settings.float64_operand_bytes
        # An absent CUDA device stops start-up here; in front of workers nothing computes here.
        device = resolve_device(settings.device) if embedded else "cpu"
        registry = ModelRegistry(LatentStore(settings.store), device=device,
                                 load_shards=embedded)
        await registry.refresh()
        loaded = registry.snapshot()
        bounds = settings.log_density_buckets or log_density_buckets(
            [
                (calibration.log_density_min, calibration.log_density_max)
                for calibration in (s.view.manifest.calibration for s in loaded.values())
            ]
        )
        metrics = ServiceMetrics(bounds, multiprocess_dir=multiprocess_dir())
        compute = _make_compute(settings, registry, metrics, device)
        cache = make_cache(settings, on_error=metrics.cache_errors.inc)
        engine = ScoringEngine(settings, registry, cache, compute, metrics)
        metrics.watch_queue_depth(engine.queue_depth_by_model)
        metrics.watch_queue_limit(lambda: registry.snapshot().keys(), settings.model_queue_limit)
        metrics.watch_certified_paths(registry.certified_paths)
        metrics.watch_index_latents(
            lambda: {
                (name, s.version): s.view.manifest.n for name, s in registry.snapshot().items()
            }
        )
        await compute.start()
        if compute.live_workers() is not None:  # scored elsewhere: count the live workers
            metrics.watch_live_workers(
                lambda: {
                    (model, str(shard)): len(devices)
                    for (model, shard), devices in _every_shard(
                        registry, compute.live_workers() or {}
                    ).items()
                }
            )
        app.state.runtime = Runtime(settings, engine, metrics, drain)
        watcher = asyncio.create_task(registry.watch(settings.reload_interval_s), name="reload")
        flusher = (
            asyncio.create_task(_flush_metrics(metrics), name="metrics-flush")
            if metrics.multiprocess_dir is not None else None
        )
        loop = asyncio.get_running_loop()
        if reload_on_sighup:
            loop.add_signal_handler(signal.SIGHUP, registry.request_reload)
        # Start-up objects (torch, models, indexes) live as long as the process: freezing them
        # keeps full collections from walking them during requests (latency spikes).
        gc.collect()
        gc.freeze()
        log.info("gateway ready", extra={
            "models": sorted(loaded), "device": device, "compute": settings.compute})
        signals = drain.signals() if drain_on_signals else contextlib.nullcontext()
        try:
            with signals:
                yield
        finally:
            if reload_on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
                # Not back to the default (exit): a reload asked for while stopping is moot.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await engine.stop()
            if flusher is not None:  # multiprocess mode
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
                metrics.flush()
                # This gateway process's queue depth leaves the sum.
                mark_process_dead(os.getpid(), metrics.multiprocess_dir)
            app.state.runtime = None

    app = FastAPI(
        title="LatentSieve",
        version="0.1.0",
        description="Score text-to-image starting latents by training-latent density.",
        lifespan=lifespan,
        **_telemetry_options(settings.opentelemetry),
    )
    app.state.runtime = None
    install_error_handlers(app)
    app.include_router(scoring.router)
    app.include_router(models.router)
    app.include_router(health.router)
    _install_openapi(app, settings)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    # Inside the observer, so that a drained request's 503 is timed and logged like any other.
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(RequestObserver, log_requests=settings.access_log)
    return app
