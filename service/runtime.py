"""What the routers reach: the running app's ``Runtime`` (vLLM-style accessor module, so the
routers never import the app factory and the app imports them freely)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from latentsieve.service.drain import Drain
from latentsieve.service.engine import ScoringEngine
from latentsieve.service.errors import ServiceError
from latentsieve.service.metrics import ServiceMetrics
from latentsieve.service.settings import Settings


@dataclass
class Runtime:
    """Built by the lifespan of one app: its settings, engine, metrics and drain."""

    settings: Settings
    engine: ScoringEngine
    metrics: ServiceMetrics
    drain: Drain | None = None


def current_runtime(request: Request) -> Runtime | None:
    """The running app's ``Runtime``, or None while it starts or stops."""
    runtime = getattr(request.app.state, "runtime", None)
    return runtime if isinstance(runtime, Runtime) else None


async def get_runtime(request: Request) -> Runtime:
    """The running app's ``Runtime``; 503 while it is starting or stopping (async: a sync
    dependency would cost every request a trip through the threadpool)."""
    runtime = current_runtime(request)
    if runtime is None:
        raise ServiceError(503, "the service is starting; retry shortly")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
