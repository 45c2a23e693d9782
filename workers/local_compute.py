"""Embedded compute: every shard of a version scored in this process, one batcher per model.

The gateway's default transport (``--compute embedded``) and the inside of a Redis worker:
both hand a shard's latents to the model's ``DynamicBatcher``, so concurrent requests for the
same version, shard and sigma become one GEMM, and a slow descriptor batch of one model never
delays another model's density batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from latentsieve.workers.batcher import DynamicBatcher, QueueFull
from latentsieve.workers.log_sums import merge_intervals, merge_log_sums
from latentsieve.workers.shard_scoring import ShardKey, ShardQuery, ShardScorer, ShardScores

OnBatch = Callable[[ShardKey, int, float], None]


@dataclass(frozen=True)
class Work:
    """One request's uncached latents for one version at one sigma (every shard)."""

    model: str
    version: str
    n: int  # training latents of the version, all shards together
    sigma: float
    descriptors: tuple[str, ...]
    query: ShardQuery
    index_space: bool = False
    shards: int = 1  # of this version (a request in flight keeps its version's layout)
    max_error: float | None = None  # certified ivf: the bound asked for (None: the index's)


@dataclass(frozen=True)
class Computed:
    """Merged scores of a ``Work``: log densities (n,) nats (eq. 1), descriptors, and for a
    certified ivf index each score's bound (n,) nats (None: exact)."""

    log_density: np.ndarray
    descriptors: dict[str, np.ndarray]
    error_bound: np.ndarray | None = None


def merge(work: Work, parts: Sequence[ShardScores]) -> Computed:
    """Shard results in shard order -> the version's scores (docs/contract.md §4); certified parts
    merge as intervals (the ends of each part's interval merged alike)."""
    exclude = work.query.exclude
    if all(part.bound is None for part in parts):
        log_density = merge_log_sums([part.log_sum for part in parts], exclude, work.n)
        return Computed(log_density, dict(parts[0].descriptors))
    estimate, half_width = merge_intervals(
        [part.log_sum for part in parts], [part.bound for part in parts], exclude, work.n
    )
    return Computed(estimate, dict(parts[0].descriptors), half_width)


def shard_key(work: Work, scorer: ShardScorer) -> ShardKey:
    return ShardKey(
        work.model, work.version, scorer.number, work.sigma,
        work.descriptors if scorer.number == 0 else (), work.index_space, scorer, work.max_error,
    )


class ModelBatchers:
    """One ``DynamicBatcher`` per model, made on first use; ``queue_limit`` caps the latents
    queued over all models (and ``model_queue_limit`` each model's), counted once per shard."""

    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float,
        queue_limit: int,
        model_queue_limit: int,
        on_batch: OnBatch | None = None,
        on_queue_change: Callable[[], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.queue_limit = queue_limit
        self.model_queue_limit = model_queue_limit
        self.on_batch = on_batch
        self.on_queue_change = on_queue_change
        self._batchers: dict[str, DynamicBatcher[ShardKey, ShardQuery, ShardScores]] = {}

    def of(self, model: str) -> DynamicBatcher[ShardKey, ShardQuery, ShardScores]:
        batcher = self._batchers.get(model)
        if batcher is None:
            batcher = DynamicBatcher(
                lambda key, query: key.scorer.score(key, query),
                max_batch_size=self.max_batch_size,
                max_wait_ms=self.max_wait_ms,
                queue_limit=self.model_queue_limit,
                on_batch=self.on_batch,
                on_queue_change=self.on_queue_change,
            )
            batcher.start()
            self._batchers[model] = batcher
        return batcher

    def queued_by_model(self) -> dict[str, int]:
        return {model: batcher.queued for model, batcher in self._batchers.items()}

    async def submit(self, key: ShardKey, query: ShardQuery, deadline: float) -> ShardScores:
        """Queue one shard's latents; QueueFull past either limit."""
        queued = sum(batcher.queued for batcher in self._batchers.values())
        if queued + len(query) > self.queue_limit:
            raise QueueFull(
                f"{queued} latents queued, {len(query)} more would pass the limit of "
                f"{self.queue_limit}"
            )
        batcher = self.of(key.model)
        if batcher.queued + len(query) > self.model_queue_limit:
            raise QueueFull(
                f"{batcher.queued} latents queued for {key.model}, {len(query)} more would "
                f"pass its limit of {self.model_queue_limit}"
            )
        return await batcher.submit(key, query, deadline)

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()
        self._batchers.clear()


class LocalCompute:
    """``--compute embedded``: every shard scored in this process through its batchers."""

    mode = "embedded"

    def __init__(self, batchers: ModelBatchers) -> None:
        self.batchers = batchers

    async def compute(
        self, shards: Sequence[ShardScorer], work: Work, deadline: float
    ) -> Computed:
        """Scores of ``work`` by every shard (``deadline`` in loop time), merged."""
        parts = await asyncio.gather(
            *(self.batchers.submit(shard_key(work, shard), work.query, deadline)
              for shard in shards)
        )
        return merge(work, parts)

    def queued_by_model(self) -> dict[str, int]:
        return self.batchers.queued_by_model()

    async def stop(self) -> None:
        await self.batchers.stop()
