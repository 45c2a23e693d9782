"""``POST /score`` and ``POST /select``: validate, resolve the model, look up the cache, score
the misses through the batcher, decide with the policy, answer (CONTRACT §3)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from index.manifest import Policy
from service.app import Runtime, RuntimeDep, json_body, read_json
from service.cache import CachedScore, cache_keys
from service.direct_routes import direct
from service.errors import ServiceError, error_responses
from service.responses import FastJSONResponse
from service.schemas import ScoreRequest, ScoreResponse, SelectRequest, validate_body
from workers.batcher import DynamicBatcher, QueueFull
from workers.scoring import ModelScorer, ScoredBatch, score_report
from workers.selection import pick_diverse

router = APIRouter(tags=["scoring"])
RETRY_AFTER_S = "1"
NO_DESCRIPTORS: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScoreKey:
    """What one computed batch shares: a model version and a sigma (the scorer rides along)."""

    model: str
    version: str
    sigma: float
    descriptors: tuple[str, ...]
    scorer: ModelScorer = field(compare=False, hash=False, repr=False)


def score_rows(key: ScoreKey, latents: np.ndarray) -> np.ndarray:
    """Batcher compute: latents (n, d) -> (n, 2 + 2k) float64: log_density (nats), percentile,
    then value and percentile of each of the key's k descriptors, in the key's order."""
    batch = key.scorer.score(latents, key.sigma, key.descriptors)
    columns = [batch.log_density, batch.percentile]
    for name in key.descriptors:
        columns += [batch.descriptors[name], batch.descriptor_percentiles[name]]
    return np.column_stack(columns)


def descriptor_names(scorer: ModelScorer, asked: Sequence[str] | None, policy: Policy) -> tuple[
    str, ...
]:
    """The descriptors to compute: those asked for and those the policy bounds; 422 when the
    model has no generator to compute them with."""
    bounded = policy.descriptor_bounds()
    if not asked and not bounded:
        return NO_DESCRIPTORS  # the common case: density only
    names = tuple(sorted(set(asked or ()) | set(bounded)))
    if names and not scorer.has_descriptors:
        raise ServiceError(
            422,
            f"model {scorer.manifest.model!r} has no generator, so it has no descriptors "
            f"({', '.join(names)} asked for by the request or its policy); leave them out",
        )
    missing = set(names) - scorer.descriptor_names
    if missing:
        raise ServiceError(
            422,
            f"model {scorer.manifest.model!r} computes only "
            f"{', '.join(sorted(scorer.descriptor_names))}, not {', '.join(sorted(missing))} "
            "(delta needs an eager generator; TorchScript cannot carry forward hooks)",
        )
    return names


def queue_depth_by_model(
    batcher: DynamicBatcher[ScoreKey], served: Iterable[str]
) -> dict[str, int]:
    """Queued latents per model (0 for idle served models), all versions and sigmas together."""
    depth: dict[str, int] = dict.fromkeys(served, 0)
    for key, rows in batcher.queued_by_key().items():
        depth[key.model] = depth.get(key.model, 0) + rows
    return depth


def resolve_model(runtime: Runtime, name: str) -> ModelScorer:
    """The scorer serving ``name`` now; 404 naming the served models otherwise."""
    scorer = runtime.registry.get(name)
    if scorer is None:
        served = ", ".join(sorted(runtime.registry.snapshot())) or "none"
        raise ServiceError(404, f"unknown model {name!r}; served models: {served}")
    return scorer


INLINE_VALIDATION_LATENTS = 256


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
        if isinstance(shape, list) and shape and type(shape[0]) is int:
            return max(shape[0], 0)
        return 0
    return len(seeds) if isinstance(seeds, list) else 0


def effective_policy(default: Policy, override: Policy | None) -> Policy:
    """The model's policy with the fields the request set replaced (unset fields keep the
    model's values: ``{"psi": ...}`` alone does not reset ``min_percentile``)."""
    if override is None:
        return default
    return Policy.model_validate(
        {**default.model_dump(), **override.model_dump(exclude_unset=True)}
    )


def check_batch(runtime: Runtime, count: int, what: str) -> None:
    """413 when a request carries more latents than ``max_batch``."""
    limit = runtime.settings.max_batch
    if count > limit:
        raise ServiceError(413, f"{count} {what} in one request; at most {limit} are allowed")


async def draw_seeds(scorer: ModelScorer, seeds: Sequence[int]) -> np.ndarray:
    """Seeds -> (n, d) float32 with the model's recorded sampler; 422 without one."""
    if scorer.seed_latents is None:
        raise ServiceError(
            422,
            f"model {scorer.manifest.model!r} has no sampler, so it cannot take seeds; "
            "send latents instead",
        )
    return await asyncio.to_thread(scorer.draw, seeds)


async def score_latents(
    runtime: Runtime,
    scorer: ModelScorer,
    latents: np.ndarray,
    sigma: float,
    deadline: float,
    descriptors: tuple[str, ...] = NO_DESCRIPTORS,
) -> tuple[ScoredBatch, list[bool]]:
    """Cached scores where present, the batcher for the rest; returns scores and hit flags."""
    manifest = scorer.manifest
    generator = (
        f"{manifest.generator.sha256}:{manifest.generator.state_sha256 or ''}"
        if descriptors and manifest.generator
        else ""
    )
    keys = cache_keys(
        manifest.model, manifest.version, sigma, descriptors, latents, generator,
    )
    hits = await runtime.cache.get_many(keys)
    misses = [row for row, hit in enumerate(hits) if hit is None]
    # Misses read as NaN here and are overwritten below: one pass over the hits per column.
    log_density = np.array([np.nan if h is None else h["log_density"] for h in hits])
    percentile = np.array([np.nan if h is None else h["percentile"] for h in hits])
    values = {
        name: np.array([np.nan if h is None else h["descriptors"][name] for h in hits])
        for name in descriptors
    }
    ranks = {
        name: np.array(
            [np.nan if h is None else h["descriptors"][f"{name}_percentile"] for h in hits]
        )
        for name in descriptors
    }
    if len(misses) < len(hits):
        runtime.metrics.cache_hits.inc(len(hits) - len(misses))
    if misses:
        runtime.metrics.cache_misses.inc(len(misses))
    limit = min(runtime.settings.queue_limit, runtime.settings.model_queue_limit)
    if len(misses) > limit:
        # Could never fit, however long the client waits: not a 429.
        raise ServiceError(
            413,
            f"{len(misses)} uncached latents exceed the queue limit of {limit} "
            "(LATENTSIEVE_QUEUE_LIMIT, LATENTSIEVE_MODEL_QUEUE_LIMIT per model)",
        )
    if misses:
        # A sigma other than the build's needs its own calibration: compute it here, once per
        # sigma and model, so that the batch loop (shared by every request) never does.
        async with asyncio.timeout_at(deadline):
            await asyncio.to_thread(scorer.calibration, sigma)
        key = ScoreKey(manifest.model, manifest.version, sigma, descriptors, scorer)
        try:
            computed = await runtime.batcher.submit(key, latents[misses], deadline)
        except QueueFull as exc:
            raise ServiceError(
                429, f"the scoring queue is full ({exc}); retry after {RETRY_AFTER_S} s",
                {"Retry-After": RETRY_AFTER_S},
            ) from exc
        log_density[misses] = computed[:, 0]
        percentile[misses] = computed[:, 1]
        for column, name in enumerate(descriptors):
            values[name][misses] = computed[:, 2 + 2 * column]
            ranks[name][misses] = computed[:, 3 + 2 * column]
        fresh: list[tuple[str, CachedScore]] = []
        for row in misses:
            entry = CachedScore(
                log_density=float(log_density[row]), percentile=float(percentile[row])
            )
            if descriptors:
                entry["descriptors"] = {
                    **{name: float(values[name][row]) for name in descriptors},
                    **{f"{name}_percentile": float(ranks[name][row]) for name in descriptors},
                }
            fresh.append((keys[row], entry))
        await runtime.cache.set_many(fresh)
    cached = [hit is not None for hit in hits]
    return ScoredBatch(log_density, percentile, values, ranks), cached


def finish_report(
    runtime: Runtime,
    scorer: ModelScorer,
    batch: ScoredBatch,
    cached: Sequence[bool],
    sigma: float,
    policy: Policy,
    seeds: Sequence[int] | None,
) -> dict[str, Any]:
    """The CONTRACT §3 body; decisions are recomputed from the scores for this policy."""
    report = score_report(scorer, batch, sigma, policy, seeds, cached)
    results: list[dict[str, Any]] = report["results"]  # type: ignore[assignment]
    runtime.metrics.observe_results(
        scorer.manifest.model, batch.log_density, batch.percentile,
        [result["reasons"] for result in results],
    )
    if batch.descriptors:
        runtime.metrics.observe_descriptors(scorer.manifest.model, batch.descriptors)
    return report


def _deadline(runtime: Runtime) -> float:
    return asyncio.get_running_loop().time() + runtime.settings.request_timeout_s


def _timed_out(runtime: Runtime) -> ServiceError:
    return ServiceError(
        504, f"no result within {runtime.settings.request_timeout_s} s; retry or send fewer"
    )


# Every status a scoring route can answer besides 200, with the one error body.
ERRORS = error_responses(401, 404, 413, 422, 429, 503, 504)


@router.post(
    "/score",
    response_class=FastJSONResponse,
    responses={200: {"model": ScoreResponse}, **ERRORS},
    openapi_extra=json_body(ScoreRequest),
)
@direct
async def score(request: Request, runtime: RuntimeDep) -> FastJSONResponse:
    """Score latents or seeds and decide on each with the model's (or the given) policy."""
    data = await read_json(request, runtime.settings)
    declared = declared_batch(data)
    check_batch(runtime, declared, "latents or seeds")  # before decoding anything
    if declared > INLINE_VALIDATION_LATENTS:  # decoding large bodies must not stall the loop
        body = await asyncio.to_thread(validate_body, ScoreRequest, data)
    else:
        body = validate_body(ScoreRequest, data)
    scorer = resolve_model(runtime, body.model)
    manifest = scorer.manifest
    try:
        latents = (
            await asyncio.to_thread(body.decode_latents)
            if declared > INLINE_VALIDATION_LATENTS
            else body.decode_latents()
        )
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from exc
    if latents is None:
        check_batch(runtime, len(body.seeds or ()), "seeds")
    else:
        check_batch(runtime, len(latents), "latents")
    sigma = manifest.bandwidth.sigma if body.sigma is None else body.sigma
    policy = effective_policy(manifest.policy, body.policy)
    names = descriptor_names(scorer, body.descriptors, policy)
    if latents is not None and latents.shape[1] != manifest.dim:
        raise ServiceError(
            422,
            f"each latent has {latents.shape[1]} numbers; model {manifest.model!r} "
            f"takes {manifest.dim} (latent shape {list(manifest.latent_shape)})",
        )
    deadline = _deadline(runtime)
    try:
        if latents is None:
            async with asyncio.timeout_at(deadline):
                latents = await draw_seeds(scorer, body.seeds or [])
        # Bounded inside: the calibration and the batcher wait until the deadline at most, and
        # Redis within its socket timeout (a timeout scope around a cache hit costs ~10 us).
        batch, cached = await score_latents(runtime, scorer, latents, sigma, deadline, names)
    except TimeoutError as exc:
        raise _timed_out(runtime) from exc
    report = finish_report(runtime, scorer, batch, cached, sigma, policy, body.seeds)
    return FastJSONResponse(report)


@router.post(
    "/select",
    response_class=FastJSONResponse,
    responses={200: {"model": ScoreResponse}, **ERRORS},
    openapi_extra=json_body(SelectRequest),
)
@direct
async def select(request: Request, runtime: RuntimeDep) -> FastJSONResponse:
    """The ``keep`` best seeds of ``start .. start + count - 1`` by log density, best first;
    with ``min_distance``, greedily diverse (fewer than ``keep`` when diversity runs out)."""
    body = validate_body(SelectRequest, await read_json(request, runtime.settings))
    scorer = resolve_model(runtime, body.model)
    problem = body.range_problem()
    if problem is not None:
        raise ServiceError(422, problem)
    manifest = scorer.manifest
    limit = runtime.settings.select_max_count
    if body.count > limit:
        raise ServiceError(413, f"count {body.count} is over the limit of {limit} seeds")
    check_batch(runtime, body.keep, "kept seeds")
    sigma = manifest.bandwidth.sigma if body.sigma is None else body.sigma
    policy = effective_policy(manifest.policy, body.policy)
    names = descriptor_names(scorer, None, policy)
    seeds = range(body.start, body.start + body.count)
    deadline = _deadline(runtime)
    try:
        async with asyncio.timeout_at(deadline):
            latents = await draw_seeds(scorer, seeds)
            batch, cached = await score_latents(runtime, scorer, latents, sigma, deadline)
            # Best first; equal scores keep the lower seed first so the answer is deterministic.
            order = np.lexsort((np.arange(len(seeds)), -batch.log_density))
            kept = await asyncio.to_thread(
                pick_diverse, latents, order, body.keep, body.min_distance
            )
            chosen = ScoredBatch(batch.log_density[kept], batch.percentile[kept])
            kept_cached = [cached[row] for row in kept]
            if names:  # the policy bounds descriptors: compute them for the kept seeds only
                chosen, kept_cached = await score_latents(
                    runtime, scorer, latents[kept], sigma, deadline, names
                )
    except TimeoutError as exc:
        raise _timed_out(runtime) from exc
    kept_seeds = [seeds[row] for row in kept]
    # ``accepted`` (from the policy) lists the kept seeds that pass it, best first; a kept seed
    # the policy rejects stays in ``results`` with its reasons but is never in ``accepted``.
    return FastJSONResponse(
        finish_report(runtime, scorer, chosen, kept_cached, sigma, policy, kept_seeds)
    )

