"""``GET /healthz`` (alive), ``GET /readyz`` (indexes loaded) and ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from latentsieve.service.errors import ServiceError, error_responses
from latentsieve.service.responses import FastJSONResponse
from latentsieve.service.runtime import RuntimeDep, current_runtime
from latentsieve.service.schemas import ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_class=FastJSONResponse,
    responses={200: {"model": ReadyResponse}, **error_responses(503)},
)
async def readyz(request: Request) -> FastJSONResponse:
    """200 when at least one model is loaded and (in front of workers) every shard of every
    served model has a live worker; 503 naming what is missing otherwise."""
    runtime = current_runtime(request)
    if runtime is None:
        raise ServiceError(503, "not ready: the service is starting")
    if runtime.drain is not None and runtime.drain.draining:
        raise ServiceError(503, "not ready: the service is shutting down")
    served = sorted(runtime.engine.registry.snapshot())
    if not served:
        raise ServiceError(
            503, f"not ready: no model has a loadable index version in {runtime.settings.store}"
        )
    missing = runtime.engine.compute.missing()
    if missing:
        raise ServiceError(503, f"not ready: no live worker for {', '.join(missing)}")
    return FastJSONResponse(ReadyResponse(status="ready", models=served).model_dump())


@router.get("/metrics", response_class=Response, responses=error_responses(401, 503))
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text format."""
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
