"""``POST /score`` and ``POST /select``: read the body, validate it, call the engine, answer
(docs/contract.md §3). Everything between the body and the answer is
``latentsieve.service.engine``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from latentsieve.service.engine import ScoreJob, SelectJob
from latentsieve.service.errors import ServiceError, error_responses
from latentsieve.service.requests import json_body, read_json
from latentsieve.service.responses import FastJSONResponse
from latentsieve.service.runtime import get_runtime
from latentsieve.service.schemas import ScoreRequest, SelectRequest, validate_body
from latentsieve.workers.score_body import ScoreResponse

router = APIRouter(tags=["scoring"])
INLINE_VALIDATION_LATENTS = 256  # larger bodies are decoded in a worker thread


def declared_batch(data: Any) -> int:
    """How many latents or seeds a parsed body carries, read before any decoding (0 when the
    body is malformed: validation then says why)."""
    if not isinstance(data, dict):
        return 0
    latents, seeds = data.get("latents"), data.get("seeds")
    if isinstance(latents, list):
        return len(latents)
    if isinstance(latents, dict):
        shape = latents.get("shape")
        first = shape[0] if isinstance(shape, list) and shape else None
        if type(first) is float and first.is_integer():  # 5000.0 is the integer 5000 (schemas)
            first = int(first)
        return max(first, 0) if type(first) is int else 0
    return len(seeds) if isinstance(seeds, list) else 0


# Every status a scoring route can answer besides 200, with the one error body.
ERRORS = error_responses(401, 404, 413, 422, 429, 502, 503, 504)


@router.post(
    "/score",
    response_class=FastJSONResponse,
    responses={200: {"model": ScoreResponse}, **ERRORS},
    openapi_extra=json_body(ScoreRequest),
)
async def score(request: Request) -> FastJSONResponse:
    """Score latents or seeds and decide on each with the model's (or the given) policy."""
    runtime = await get_runtime(request)
    engine = runtime.engine
    data = await read_json(request, runtime.settings)
    declared = declared_batch(data)
    engine.check_batch(declared, "latents or seeds")  # before decoding anything
    threaded = declared > INLINE_VALIDATION_LATENTS  # decoding must not stall the loop
    if threaded:
        body = await asyncio.to_thread(validate_body, ScoreRequest, data)
    else:
        body = validate_body(ScoreRequest, data)
    engine.resolve(body.model)  # 404 before any content check
    try:
        latents = await asyncio.to_thread(body.decode_latents) if threaded else (
            body.decode_latents()
        )
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from exc
    job = ScoreJob(model=body.model, latents=latents, seeds=body.seeds, sigma=body.sigma,
                   descriptors=body.descriptors, policy=body.policy, max_error=body.max_error)
    return FastJSONResponse(await engine.score(job))


@router.post(
    "/select",
    response_class=FastJSONResponse,
    responses={200: {"model": ScoreResponse}, **ERRORS},
    openapi_extra=json_body(SelectRequest),
)
async def select(request: Request) -> FastJSONResponse:
    """The ``keep`` best seeds of ``start .. start + count - 1`` (or of a posted batch of
    ``latents``, each result with its ``index`` in it) by log density, best first; with
    ``min_distance``, greedily diverse (fewer than ``keep`` when diversity runs out)."""
    runtime = await get_runtime(request)
    engine = runtime.engine
    data = await read_json(request, runtime.settings)
    declared = declared_batch(data)
    engine.check_batch(declared, "latents")  # before decoding anything
    threaded = declared > INLINE_VALIDATION_LATENTS
    body = await asyncio.to_thread(validate_body, SelectRequest, data) if threaded else (
        validate_body(SelectRequest, data)
    )
    engine.resolve(body.model)
    problem = body.range_problem()
    if problem is not None:
        raise ServiceError(422, problem)
    try:
        latents = await asyncio.to_thread(body.decode_latents) if threaded else (
            body.decode_latents()
        )
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from exc
    job = SelectJob(model=body.model, start=body.start or 0, count=body.count or 0,
                    keep=body.keep, min_distance=body.min_distance, sigma=body.sigma,
                    policy=body.policy, max_error=body.max_error, latents=latents)
    return FastJSONResponse(await engine.select(job))
