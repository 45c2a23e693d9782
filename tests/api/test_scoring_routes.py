"""``POST /score`` and ``POST /select`` are plain FastAPI routes that read their own bodies
(service/requests.py): other methods and paths fall through to FastAPI's answers, a bug is a
logged 500 in the one error shape, auth and request metrics wrap them, and a ``ServiceError``
keeps its headers and content type."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from fastapi.routing import APIRoute

from latentsieve.service.app import _telemetry_options, create_app
from latentsieve.service.routers import scoring
from latentsieve.service.settings import Settings
from latentsieve.workers.shard_scoring import ShardScorer

pytestmark = pytest.mark.anyio
MODEL = "digits-vae"


def test_the_scoring_routes_are_fastapi_routes(tmp_path: Any) -> None:
    declared = {
        (method, route.path): route.endpoint for route in scoring.router.routes
        if isinstance(route, APIRoute) for method in route.methods or ()
    }
    assert declared == {("POST", "/score"): scoring.score, ("POST", "/select"): scoring.select}
    # Nothing in front of FastAPI's router answers for them (no shadow router).
    app = create_app(Settings(store=tmp_path))
    names = [middleware.cls.__name__ for middleware in app.user_middleware]
    assert names == ["RequestObserver", "DrainMiddleware", "ApiKeyMiddleware"]


def test_fastapi_telemetry_is_opt_in(tmp_path: Any) -> None:
    """FastAPI's per-request OpenTelemetry provider check is off unless asked for."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        # A FastAPI before native OpenTelemetry (our lower bound is older): nothing to turn off,
        # so nothing is passed to it either way.
        assert _telemetry_options(False) == _telemetry_options(True) == {}
        create_app(Settings(store=tmp_path, opentelemetry=True))
        return
    quiet = create_app(Settings(store=tmp_path))
    assert quiet._native_telemetry.enabled() is False
    assert not any(quiet._telemetry[signal] for signal in ("tracing", "metrics", "logs"))
    asked = create_app(Settings(store=tmp_path, opentelemetry=True))
    assert all(asked._telemetry[signal] for signal in ("tracing", "metrics", "logs"))


async def test_other_methods_and_paths_fall_through(app_client: httpx.AsyncClient) -> None:
    assert (await app_client.get("/score")).status_code == 405
    assert (await app_client.get("/select")).status_code == 405
    assert (await app_client.post("/score/")).status_code in (307, 404)
    assert (await app_client.get("/models")).status_code == 200


async def test_a_bug_is_a_logged_500_and_the_server_stays_up(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: ShardScorer, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the scorer")

    good = {"model": MODEL, "latents": [[0.3] * 8]}
    app = create_app(settings.model_copy(update={"cache_bytes": 0}))
    async with (
        LifespanManager(app, startup_timeout=60) as manager,
        # Starlette answers the 500, then re-raises for the server to log; uvicorn swallows
        # it, and so does this transport.
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app, raise_app_exceptions=False),
            base_url="http://gateway",
        ) as client,
    ):
        monkeypatch.setattr(ShardScorer, "score", broken)
        with caplog.at_level(logging.ERROR):
            response = await client.post("/score", json=good)
        assert response.status_code == 500
        assert response.json() == {"detail": "internal error; the server logged the cause"}
        assert any("a bug in the scorer" in (r.exc_text or "") for r in caplog.records)
        monkeypatch.undo()
        assert (await client.post("/score", json=good)).status_code == 200


async def test_auth_and_request_metrics_wrap_the_scoring_routes(
    settings: Settings, serve: Callable[..., Any]
) -> None:
    body = {"model": MODEL, "latents": [[0.1] * 8]}
    async with serve(settings.model_copy(update={"api_keys": ["k1"]})) as client:
        assert (await client.post("/score", json=body)).status_code == 401
        ok = await client.post("/score", json=body, headers={"X-API-Key": "k1"})
        assert ok.status_code == 200
        metrics = (await client.get("/metrics", headers={"X-API-Key": "k1"})).text
    assert 'latentsieve_request_duration_seconds_count{route="/score",status="401"} 1.0' in metrics
    assert 'latentsieve_request_duration_seconds_count{route="/score",status="200"} 1.0' in metrics


async def test_service_errors_keep_their_headers(
    settings: Settings, serve: Callable[..., Any]
) -> None:
    # A queue of 1 latent: 20 uncached latents can never fit, which is a 413 with a detail.
    async with serve(settings.model_copy(update={"queue_limit": 1})) as client:
        latents = np.random.default_rng(5).standard_normal((20, 8)).tolist()
        response = await client.post("/score", json={"model": MODEL, "latents": latents})
    assert response.status_code == 413
    assert "queue limit" in response.json()["detail"]
    assert response.headers["content-type"] == "application/json"


async def test_before_start_up_the_scoring_routes_are_503(settings: Settings) -> None:
    app = create_app(settings)  # its lifespan not entered: no runtime yet
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for path, body in (("/score", {"model": MODEL, "seeds": [1]}),
                           ("/select", {"model": MODEL, "count": 4, "keep": 1})):
            response = await client.post(path, json=body)
            assert response.status_code == 503
            assert response.json() == {"detail": "the service is starting; retry shortly"}
