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
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from prometheus_client.multiprocess import mark_process_dead
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index.store import LatentStore
from service.auth import OPEN_PATHS, ApiKeyMiddleware
from service.direct_routes import install_direct_routes
from service.errors import ServiceError, install_error_handlers
from service.metrics import (
    FLUSH_INTERVAL_S,
    ServiceMetrics,
    log_density_buckets,
    multiprocess_dir,
)
from service.registry import ModelRegistry
from service.schemas import ScoreRequest, SelectRequest, parse_json
from service.settings import Settings
from workers.batcher import DynamicBatcher
from workers.devices import resolve_device

if TYPE_CHECKING:
    from service.cache import ScoreCache
    from service.routers.scoring import ScoreKey

log = logging.getLogger(__name__)

ROUTES = frozenset({"/score", "/select", "/models", "/healthz", "/readyz", "/metrics"})
# Large bodies are parsed in a worker thread so one upload does not stall every request.
THREADED_PARSE_BYTES = 1 << 20


@dataclass
class Runtime:
    """What the routers use, built by the lifespan of one app."""

    settings: Settings
    registry: ModelRegistry
    batcher: DynamicBatcher[ScoreKey]
    cache: ScoreCache
    metrics: ServiceMetrics


async def get_runtime(request: Request) -> Runtime:
    """The running app's ``Runtime``; 503 while it is starting or stopping (async: a sync
    dependency would cost every request a trip through the threadpool)."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise ServiceError(503, "the service is starting; retry shortly")
    assert isinstance(runtime, Runtime)
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 past ``max_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ServiceError(
            413, f"the body is {int(declared)} bytes; at most {max_bytes} are allowed"
        )
    chunks: list[bytes] = []
    size = 0
    while True:  # the ASGI messages themselves: Request.stream() adds a generator per request
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise ServiceError(413, f"the body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json(request: Request, settings: Settings) -> Any:
    """Body -> parsed JSON under the size, depth and finite-number rules (413/422)."""
    raw = await read_body(request, settings.max_body_bytes)
    if len(raw) > THREADED_PARSE_BYTES:
        return await asyncio.to_thread(parse_json, raw, settings.max_json_depth)
    return parse_json(raw, settings.max_json_depth)


class RequestMetricsMiddleware:
    """``latentsieve_request_duration_seconds{route, status}`` for every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
            if isinstance(runtime, Runtime):
                # Unknown paths share one label so scanners cannot blow up the series count.
                route = scope["path"] if scope["path"] in ROUTES else "other"
                runtime.metrics.observe_request(route, status, time.perf_counter() - started)


def json_body(model: type[Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a route that parses its JSON body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }


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


def _telemetry_options(enabled: bool) -> dict[str, Any]:
    """FastAPI's native OpenTelemetry (FastAPI >= 0.16x) off unless asked for: it checks the
    global providers on every request (~5 us), and this service reports through Prometheus."""
    if enabled or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


async def _flush_metrics(metrics: ServiceMetrics) -> None:
    """Multiprocess mode: write this worker's score histograms for the others' scrapes."""
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        metrics.flush()


def create_app(settings: Settings, *, reload_on_sighup: bool = False) -> FastAPI:
    """The gateway for ``settings``; ``reload_on_sighup`` when it owns the process."""
    # Imported here: the routers import ``RuntimeDep`` from this module.
    from service.cache import make_cache
    from service.routers import health, models, scoring

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        device = resolve_device(settings.device)  # an absent CUDA device stops start-up here
        registry = ModelRegistry(LatentStore(settings.store), device=device)
        await registry.refresh()
        loaded = registry.snapshot()
        bounds = settings.log_density_buckets or log_density_buckets(
            [
                (s.manifest.calibration.log_density_min, s.manifest.calibration.log_density_max)
                for s in loaded.values()
            ]
        )
        metrics = ServiceMetrics(bounds, multiprocess_dir=multiprocess_dir())
        batcher: DynamicBatcher[ScoreKey] = DynamicBatcher(
            scoring.score_rows,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_limit=settings.queue_limit,
            group_of=lambda key: key.model,
            group_limit=settings.model_queue_limit,
            on_batch=lambda key, size, seconds: metrics.observe_batch(
                key.model, device, size, seconds
            ),
            on_queue_change=metrics.queue_changed,
        )
        metrics.watch_queue_depth(
            lambda: scoring.queue_depth_by_model(batcher, registry.snapshot())
        )
        metrics.watch_index_latents(
            lambda: {
                (name, s.manifest.version): s.manifest.n
                for name, s in registry.snapshot().items()
            }
        )
        cache = make_cache(settings, on_error=metrics.cache_errors.inc)
        app.state.runtime = Runtime(settings, registry, batcher, cache, metrics)
        batcher.start()
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
        log.info("gateway ready", extra={"models": sorted(loaded), "device": device})
        try:
            yield
        finally:
            if reload_on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
                # Not back to the default (exit): a reload asked for while stopping is moot.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await batcher.stop()
            await cache.close()
            if flusher is not None:  # multiprocess mode
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
                metrics.flush()
                # This worker's queue depth leaves the sum.
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
    # Innermost, so that auth and the request metrics wrap the direct routes too.
    install_direct_routes(app, scoring.router, get_runtime)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(RequestMetricsMiddleware)
    return app
