"""The scoring engine: one request from model lookup to decision, free of HTTP.

``ScoringEngine.score`` and ``.select`` take typed jobs and return the docs/contract.md §3 body. On
the
way: the model's served version (404), what it can compute (422), the score cache, the compute
transport for the misses (in process, or Redis workers), calibrations at the request's sigma,
the policy's decisions and the metric hooks. Routers and ``latentsieve score`` both call it;
failures are ``ServiceError`` with the status a router answers.

Long work is bounded: a model calibrates one sigma at a time (a request needing another sigma
meanwhile is 429), and a calibration or a ``/select`` proceeds in pieces of ``work_rows``
latents, so when its request gives up (deadline or cancellation) it stops at the next piece.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from latentsieve.index.kinds import default_bound
from latentsieve.index.manifest import TORCHSCRIPT_DESCRIPTORS, IndexManifest, Policy
from latentsieve.service.cache import CachedScore, ScoreCache, cache_keys
from latentsieve.service.errors import ServiceError
from latentsieve.service.registry import ModelRegistry, ServedModel
from latentsieve.service.settings import Settings
from latentsieve.workers.batcher import QueueFull
from latentsieve.workers.score_body import ScoreResponse
from latentsieve.workers.scoring import BLOCK, ModelView, ScoredBatch, score_report
from latentsieve.workers.selection import pick_diverse
from latentsieve.workers.shard_scoring import ShardQuery
from latentsieve.workers.streams import JobFailed, WorkersUnavailable
from latentsieve.workers.transport import Compute, Computed, ScoreSpec, Space, Work

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
NO_DESCRIPTORS: tuple[str, ...] = ()
NO_RULES = Policy()  # bounds no descriptor: ``score_batch`` computes only those it is asked


class EngineHooks(Protocol):
    """What the engine reports (``latentsieve.service.metrics.ServiceMetrics``)."""

    def count_cache(self, hits: int, misses: int) -> None: ...

    def observe_results(
        self, model: str, log_density: np.ndarray, percentile: np.ndarray,
        reasons: Sequence[Sequence[str]],
    ) -> None: ...

    def observe_descriptors(self, model: str, values: dict[str, np.ndarray]) -> None: ...


@dataclass(frozen=True, kw_only=True)
class ScoreJob:
    """A validated ``POST /score`` (or ``latentsieve score``): latents (n, d) or seeds."""

    model: str
    latents: np.ndarray | None = None
    seeds: Sequence[int] | None = None
    sigma: float | None = None
    descriptors: Sequence[str] | None = None
    policy: Policy | None = None
    max_error: float | None = None  # nats, certified ivf (None: the index's)


@dataclass(frozen=True, kw_only=True)
class SelectJob:
    """A validated ``POST /select``: the best ``keep`` of ``count`` seeds from ``start``, or
    of a posted batch of ``latents`` (n, d) when given (then ``start`` and ``count`` are
    unused)."""

    model: str
    start: int
    count: int
    keep: int
    min_distance: float | None = None
    sigma: float | None = None
    policy: Policy | None = None
    max_error: float | None = None  # nats, certified ivf (None: the index's)
    latents: np.ndarray | None = None


@dataclass
class Calibrating:
    """The one calibration a model runs at a time: its version and sigma, and its progress
    (loop-time seconds, blocks of the calibration set) to tell others when to come back."""

    version: str
    sigma: float
    started: float
    deadline: float
    blocks: int
    blocks_done: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def retry_after(self, now: float) -> str:
        """Whole seconds until it is likely done (its pace so far), at least 1, at most until
        its request's deadline."""
        left = 1.0
        if self.blocks_done:
            pace = (now - self.started) / self.blocks_done
            left = pace * (self.blocks - self.blocks_done)
        return str(max(1, math.ceil(min(left, self.deadline - now))))


def bound_asked(manifest: IndexManifest, max_error: float | None) -> float | None:
    """The bound a certified ivf version scores to (the request's, else its own); None for
    exact kinds, whose scores meet any (so their batches and cache entries stay shared)."""
    default = default_bound(manifest)  # the kind's (index/kinds/)
    if default is None:
        return None
    return default if max_error is None else max_error


def effective_policy(default: Policy, override: Policy | None) -> Policy:
    """The model's policy with the fields the request set replaced (unset fields keep the
    model's values: ``{"psi": ...}`` alone does not reset ``min_percentile``)."""
    if override is None:
        return default
    return Policy.model_validate(
        {**default.model_dump(), **override.model_dump(exclude_unset=True)}
    )


def descriptor_names(
    view: ModelView, asked: Sequence[str] | None, policy: Policy
) -> tuple[str, ...]:
    """The descriptors to compute: those asked for and those the policy bounds; 422 when the
    model cannot compute them."""
    bounded = policy.needed_descriptors()
    if not asked and not bounded:
        return NO_DESCRIPTORS  # the common case: density only
    names = tuple(sorted(set(asked or ()) | set(bounded)))
    if not view.has_descriptors:
        raise ServiceError(
            422,
            f"model {view.manifest.model!r} has no generator, so it has no descriptors "
            f"({', '.join(names)} asked for by the request or its policy); leave them out",
        )
    missing = set(names) - view.descriptor_names
    if missing:
        raise ServiceError(
            422,
            f"model {view.manifest.model!r} computes only "
            f"{', '.join(sorted(view.descriptor_names))}, not {', '.join(sorted(missing))} "
            f"({TORCHSCRIPT_DESCRIPTORS}: delta needs forward hooks)",
        )
    return names


class ScoringEngine:
    """Registry, cache, compute transport, calibrations, policy and metric hooks together."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        cache: ScoreCache,
        compute: Compute,
        hooks: EngineHooks | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.cache = cache
        self.compute = compute
        self.hooks = hooks
        self._calibrating: dict[str, Calibrating] = {}  # by model name

    def deadline(self) -> float:
        """Loop time by which a request started now must be answered."""
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s

    def resolve(self, name: str) -> ServedModel:
        """The version serving ``name`` now; 404 naming the served models otherwise."""
        served = self.registry.get(name)
        if served is None:
            names = ", ".join(sorted(self.registry.snapshot())) or "none"
            raise ServiceError(404, f"unknown model {name!r}; served models: {names}")
        return served

    def check_batch(self, count: int, what: str) -> None:
        """413 when a request carries more latents than ``max_batch``."""
        limit = self.settings.max_batch
        if count > limit:
            raise ServiceError(413, f"{count} {what} in one request; at most {limit} are allowed")

    def work_rows(self) -> int:
        """Latents in one piece of long work (a calibration block, a ``/select`` chunk): within
        the queue limits, so it neither fills the queue for other requests nor is refused by
        it; the work checks its deadline between pieces."""
        return min(BLOCK, self.compute.limits.largest)

    def spec(
        self, served: ServedModel, sigma: float, descriptors: tuple[str, ...] = NO_DESCRIPTORS,
        max_error: float | None = None, space: Space = "raw",
    ) -> ScoreSpec:
        """The one spec of a computation on the served version (its batches, jobs and cache
        keys derive from it); ``max_error`` as asked (None: the index's)."""
        manifest = served.view.manifest
        return ScoreSpec(manifest.model, manifest.version, sigma, descriptors, space,
                         bound_asked(manifest, max_error))

    def calibrations_in_flight(self) -> dict[str, tuple[str, float]]:
        """Model -> (version, sigma) of the calibration it is computing now."""
        return {model: (run.version, run.sigma) for model, run in self._calibrating.items()}

    def sigma_of(self, manifest: IndexManifest, asked: float | None) -> float:
        """The sigma a request scores at: the index's, or the request's own when this
        deployment takes one (LATENTSIEVE_ALLOW_REQUEST_SIGMA); 422 otherwise."""
        own = manifest.bandwidth.sigma
        if asked is None or asked == own:
            return own
        if not self.settings.allow_request_sigma:
            raise ServiceError(
                422,
                f"this deployment scores at each index's own sigma "
                f"(LATENTSIEVE_ALLOW_REQUEST_SIGMA is off): leave sigma out, or send {own!r}, "
                f"the sigma of model {manifest.model!r}; {asked!r} is not taken",
            )
        return asked

    def queue_depth_by_model(self) -> dict[str, int]:
        """Queued latents per model (0 for idle served models)."""
        depth = dict.fromkeys(self.registry.snapshot(), 0)
        for model, rows in self.compute.queued_by_model().items():
            depth[model] = depth.get(model, 0) + rows
        return depth

    async def score(self, job: ScoreJob) -> ScoreResponse:
        """The docs/contract.md §3 body for ``job``; ServiceError for anything it cannot serve."""
        served = self.resolve(job.model)
        view = served.view
        manifest = view.manifest
        if job.latents is None:
            self.check_batch(len(job.seeds or ()), "seeds")
        else:
            self.check_batch(len(job.latents), "latents")
        sigma = self.sigma_of(manifest, job.sigma)
        policy = effective_policy(manifest.policy, job.policy)
        names = descriptor_names(view, job.descriptors, policy)
        batch, cached = await self._scored(
            served, job.latents, job.seeds, self.spec(served, sigma, names, job.max_error)
        )
        return self._report(view, batch, cached, sigma, policy, job.seeds)

    async def score_batch(
        self,
        model: str,
        latents: np.ndarray,
        sigma: float | None = None,
        descriptors: Sequence[str] = NO_DESCRIPTORS,
        max_error: float | None = None,
    ) -> ScoredBatch:
        """``/score``'s numbers for latents (n, d) as sent, without a policy: log densities,
        percentiles and the ``descriptors`` named (only those), for the synchronous library
        entry point (``service.offline.SyncScorer``); ServiceError as ``score``'s."""
        served = self.resolve(model)
        self.check_batch(len(latents), "latents")
        sigma = self.sigma_of(served.view.manifest, sigma)
        names = descriptor_names(served.view, descriptors, NO_RULES)
        spec = self.spec(served, sigma, names, max_error)
        return (await self._scored(served, latents, None, spec))[0]

    async def _scored(
        self, served: ServedModel, latents: np.ndarray | None, seeds: Sequence[int] | None,
        spec: ScoreSpec,
    ) -> tuple[ScoredBatch, list[bool]]:
        """``latents`` (n, d) as sent, or ``seeds`` drawn, scored by ``spec`` within one
        request's deadline (504 past it): scores and cache hit flags."""
        if latents is not None:
            self._check_dim(served.view.manifest, latents)
        deadline = self.deadline()
        try:
            if latents is None:
                async with asyncio.timeout_at(deadline):
                    latents = await self._draw(served.view, seeds or [])
            # Bounded inside: the calibration and the compute wait until the deadline at most,
            # and Redis within its socket timeout.
            return await self._score_latents(served, latents, spec, deadline)
        except TimeoutError as exc:
            raise self._timed_out() from exc

    async def select(self, job: SelectJob) -> ScoreResponse:
        """The ``keep`` best seeds (or posted latents) by log density, best first; with
        ``min_distance``, greedily diverse (fewer than ``keep`` when diversity runs out)."""
        served = self.resolve(job.model)
        view = served.view
        manifest = view.manifest
        posted = job.latents
        if posted is None:
            limit = self.settings.select_max_count
            if job.count > limit:
                raise ServiceError(413, f"count {job.count} is over the limit of {limit} seeds")
        else:
            self.check_batch(len(posted), "latents")
            self._check_dim(manifest, posted)
            if job.keep > len(posted):
                raise ServiceError(
                    422, f"keep ({job.keep}) must be <= the {len(posted)} latents posted"
                )
        self.check_batch(job.keep, "kept seeds")
        sigma = self.sigma_of(manifest, job.sigma)
        policy = effective_policy(manifest.policy, job.policy)
        names = descriptor_names(view, None, policy)
        seeds = range(job.start, job.start + job.count)
        spec = self.spec(served, sigma, max_error=job.max_error)
        deadline = self.deadline()
        try:
            async with asyncio.timeout_at(deadline):
                if posted is None:
                    latents, batch, cached = await self._score_seeds(
                        served, seeds, spec, deadline
                    )
                else:
                    latents = posted
                    batch, cached = await self._score_latents(served, latents, spec, deadline)
                # Best first; equal scores keep the lower seed (or position) first:
                # deterministic answers.
                order = np.lexsort((np.arange(len(latents)), -batch.log_density))
                kept = await asyncio.to_thread(
                    pick_diverse, latents, order, job.keep, job.min_distance
                )
                chosen = batch.rows(kept)
                kept_cached = [cached[row] for row in kept]
                if names:  # the policy bounds descriptors: compute them for the kept rows
                    chosen, kept_cached = await self._score_latents(
                        served, latents[kept], dataclasses.replace(spec, descriptors=names),
                        deadline,
                    )
        except TimeoutError as exc:
            raise self._timed_out() from exc
        # ``accepted`` lists the kept seeds (or batch positions) the policy accepts, best
        # first; a kept one it rejects stays in ``results`` with its reasons.
        if posted is not None:
            return self._report(view, chosen, kept_cached, sigma, policy, None,
                                positions=[int(row) for row in kept])
        kept_seeds = [seeds[row] for row in kept]
        return self._report(view, chosen, kept_cached, sigma, policy, kept_seeds)

    @staticmethod
    def _check_dim(manifest: IndexManifest, latents: np.ndarray) -> None:
        """422 when the latents do not have the model's dimension."""
        if latents.shape[1] != manifest.dim:
            raise ServiceError(
                422,
                f"each latent has {latents.shape[1]} numbers; model {manifest.model!r} "
                f"takes {manifest.dim} (latent shape {list(manifest.latent_shape)})",
            )

    async def _draw(self, view: ModelView, seeds: Sequence[int]) -> np.ndarray:
        """Seeds -> (n, d) float32 with the model's recorded sampler; 422 without one."""
        if view.seed_latents is None:
            raise ServiceError(
                422,
                f"model {view.manifest.model!r} has no sampler, so it cannot take seeds; "
                "send latents instead",
            )
        return await asyncio.to_thread(view.draw, seeds)

    async def _compute(self, work: Work, deadline: float) -> Computed:
        """``work`` through the transport, its failures as the statuses they mean."""
        try:
            return await self.compute.compute(work, deadline)
        except QueueFull as exc:
            raise ServiceError(
                429, f"the scoring queue is full ({exc}); retry after {RETRY_AFTER_S} s",
                {"Retry-After": RETRY_AFTER_S},
            ) from exc
        except WorkersUnavailable as exc:
            raise ServiceError(503, str(exc), {"Retry-After": RETRY_AFTER_S}) from exc
        except JobFailed as exc:
            raise ServiceError(502, str(exc)) from exc

    async def _score_seeds(
        self, served: ServedModel, seeds: range, spec: ScoreSpec, deadline: float
    ) -> tuple[np.ndarray, ScoredBatch, list[bool]]:
        """``seeds`` drawn and scored ``work_rows`` at a time: latents (n, d), scores and hit
        flags. A request that gives up stops at the next chunk; no thread goes on drawing or
        scoring the rest of the range for nobody."""
        drawn: list[np.ndarray] = []
        parts: list[ScoredBatch] = []
        cached: list[bool] = []
        size = self.work_rows()
        for start in range(0, len(seeds), size):
            latents = await self._draw(served.view, seeds[start : start + size])
            batch, hits = await self._score_latents(served, latents, spec, deadline)
            drawn.append(latents)
            parts.append(batch)
            cached.extend(hits)
        return np.concatenate(drawn), _joined(parts), cached

    async def calibration(self, served: ServedModel, sigma: float, deadline: float) -> None:
        """Make sure the calibration at ``sigma`` is known: another sigma than the build's is
        scored once per model version (same calibration set, same transport as requests).

        One calibration per model at a time: a request for the sigma being computed waits for
        it (until its own deadline; it takes over if that one gives up), a request for another
        sigma is 429 with the expected wait as ``Retry-After``. TimeoutError past ``deadline``.
        """
        view = served.view
        if view.cached_calibration(sigma) is not None:
            return
        manifest = view.manifest
        if sigma == manifest.calibration.sigma:  # the build's, pushed out by other sigmas
            view.keep_calibration(sigma, view.loaded.calibration_scores)
            return
        loop = asyncio.get_running_loop()
        async with asyncio.timeout_at(deadline):
            while (running := self._calibrating.get(manifest.model)) is not None:
                if (running.version, running.sigma) != (manifest.version, sigma):
                    retry = running.retry_after(loop.time())
                    raise ServiceError(
                        429,
                        f"model {manifest.model!r} is calibrating sigma {running.sigma!r}; "
                        f"one sigma is calibrated at a time per model, so sigma {sigma!r} "
                        f"must wait: retry after {retry} s, or leave sigma out to score at "
                        f"the index's {manifest.bandwidth.sigma!r}",
                        {"Retry-After": retry},
                    )
                await running.finished.wait()
                if view.cached_calibration(sigma) is not None:
                    return
            size = self.work_rows()
            run = Calibrating(manifest.version, sigma, loop.time(), deadline,
                              math.ceil(manifest.calibration.count / size))
            self._calibrating[manifest.model] = run
            try:
                await self._calibrate(served, run, size, deadline)
            finally:
                # Done, failed or given up: the next request for the model starts afresh.
                del self._calibrating[manifest.model]
                run.finished.set()

    async def _calibrate(
        self, served: ServedModel, run: Calibrating, size: int, deadline: float
    ) -> None:
        """Score the calibration set at ``run.sigma`` block by block: each block drawn in a
        thread and scored through the transport, so giving up stops at a block boundary."""
        view = served.view
        blocks = view.calibration_blocks(size)
        scores = []
        while (block := await asyncio.to_thread(next, blocks, None)) is not None:
            spec = self.spec(served, run.sigma, space="index" if block.index_space else "raw")
            work = _work(served, spec, block.query)
            scores.append((await self._compute(work, deadline)).log_density)
            run.blocks_done += 1
        view.keep_calibration(run.sigma, np.concatenate(scores))

    async def _score_latents(
        self, served: ServedModel, latents: np.ndarray, spec: ScoreSpec, deadline: float
    ) -> tuple[ScoredBatch, list[bool]]:
        """Cached scores where present, the transport for the rest; scores and hit flags.
        Every field of ``spec`` is part of the cache key and of the work."""
        manifest = served.view.manifest
        descriptors = spec.descriptors
        generator = (
            f"{manifest.generator.sha256}:{manifest.generator.state_sha256 or ''}"
            if descriptors and manifest.generator
            else ""
        )
        keys = cache_keys(spec, latents, generator)
        hits = await self.cache.get_many(keys)
        misses = [row for row, hit in enumerate(hits) if hit is None]
        if self.hooks is not None:
            self.hooks.count_cache(len(hits) - len(misses), len(misses))
        limit = self.compute.limits.largest
        if len(misses) > limit:
            # Could never fit, however long the client waits: not a 429.
            raise ServiceError(
                413,
                f"{len(misses)} uncached latents exceed the queue limit of {limit} "
                "(LATENTSIEVE_QUEUE_LIMIT, LATENTSIEVE_MODEL_QUEUE_LIMIT per model)",
            )
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
        bounds = None
        if spec.max_error is not None:
            bounds = np.array([np.nan if h is None else h.get("error_bound", np.nan)
                               for h in hits])
        if misses:
            await self.calibration(served, spec.sigma, deadline)
            query = ShardQuery(np.ascontiguousarray(latents[misses], dtype=np.float32))
            computed = await self._compute(_work(served, spec, query), deadline)
            fresh = served.view.scored(computed.log_density, spec.sigma, computed.descriptors,
                                       computed.error_bound)
            log_density[misses] = fresh.log_density
            percentile[misses] = fresh.percentile
            if bounds is not None and fresh.error_bound is not None:
                bounds[misses] = fresh.error_bound
            for name in descriptors:
                values[name][misses] = fresh.descriptors[name]
                ranks[name][misses] = fresh.descriptor_percentiles[name]
            await self.cache.set_many(
                [(keys[row], _cached(fresh, index)) for index, row in enumerate(misses)]
            )
        cached = [hit is not None for hit in hits]
        return ScoredBatch(log_density, percentile, values, ranks, bounds), cached

    def _report(
        self,
        view: ModelView,
        batch: ScoredBatch,
        cached: Sequence[bool],
        sigma: float,
        policy: Policy,
        seeds: Sequence[int] | None,
        positions: Sequence[int] | None = None,
    ) -> ScoreResponse:
        """The docs/contract.md §3 body; decisions are recomputed from the scores for this policy.
        ``positions``: each row's place in a posted batch (``/select`` over latents)."""
        report = score_report(view, batch, sigma, policy, seeds, cached, positions)
        if self.hooks is not None:
            self.hooks.observe_results(
                view.manifest.model, batch.log_density, batch.percentile,
                [result["reasons"] for result in report["results"]],
            )
            if batch.descriptors:
                self.hooks.observe_descriptors(view.manifest.model, batch.descriptors)
        return report

    def _timed_out(self) -> ServiceError:
        return ServiceError(
            504, f"no result within {self.settings.request_timeout_s} s; retry or send fewer"
        )

    async def stop(self) -> None:
        await self.compute.stop()
        await self.cache.close()


def _work(served: ServedModel, spec: ScoreSpec, query: ShardQuery) -> Work:
    """What the transport computes for ``query`` on every shard of the served version."""
    manifest = served.view.manifest
    return Work(spec, query, manifest.n, len(manifest.shard_layout()), served.shards)


def _joined(parts: Sequence[ScoredBatch]) -> ScoredBatch:
    """Density scores of consecutive chunks (no descriptors) as one batch, in order."""
    if len(parts) == 1:
        return parts[0]
    bounds = [part.error_bound for part in parts if part.error_bound is not None]
    return ScoredBatch(
        np.concatenate([part.log_density for part in parts]),
        np.concatenate([part.percentile for part in parts]),
        error_bound=np.concatenate(bounds) if len(bounds) == len(parts) else None,
    )


def _cached(batch: ScoredBatch, row: int) -> CachedScore:
    """One row of freshly computed scores as a cache entry."""
    entry = CachedScore(
        log_density=float(batch.log_density[row]), percentile=float(batch.percentile[row])
    )
    if batch.error_bound is not None:
        entry["error_bound"] = float(batch.error_bound[row])
    if batch.descriptors:
        entry["descriptors"] = {
            **{name: float(values[row]) for name, values in batch.descriptors.items()},
            **{
                f"{name}_percentile": float(values[row])
                for name, values in batch.descriptor_percentiles.items()
            },
        }
    return entry


