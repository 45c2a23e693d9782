"""``GET /healthz`` (alive), ``GET /readyz`` (indexes loaded) and ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.app import Runtime, RuntimeDep
from service.errors import ServiceError, error_responses
from service.responses import FastJSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503))
async def readyz(request: Request) -> FastJSONResponse:
    """200 when at least one model is loaded, 503 otherwise."""
    runtime = getattr(request.app.state, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise ServiceError(503, "not ready: the service is starting")
    served = sorted(runtime.registry.snapshot())
    if not served:
        raise ServiceError(
            503, f"not ready: no model has a loadable index version in {runtime.settings.store}"
        )
    return FastJSONResponse({"status": "ready", "models": served})


@router.get("/metrics", response_class=Response, responses=error_responses(401, 503))
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text format."""
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
