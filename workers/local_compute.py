"""Embedded compute: every shard of a version scored in this process, one batcher per model.

The gateway's default transport (``--compute embedded``) and the inside of a Redis worker:
both hand a shard's latents to the model's ``DynamicBatcher``, so concurrent requests for the
same version, shard and sigma become one GEMM, and a slow descriptor batch of one model never
delays another model's density batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from latentsieve.workers.batcher import DynamicBatcher
from latentsieve.workers.shard_scoring import ShardKey, ShardQuery, ShardScorer, ShardScores
from latentsieve.workers.transport import Computed, QueueLimits, Work, merge

OnBatch = Callable[[ShardKey, int, float], None]


def shard_key(work: Work, scorer: ShardScorer) -> ShardKey:
    return ShardKey(work.spec.for_shard(scorer.number), scorer.number, scorer)


class ModelBatchers:
    """One ``DynamicBatcher`` per model, made on first use, under one set of ``limits``
    (latents counted once per shard)."""

    def __init__(
        self,
        max_batch_size: int,
        max_wait_ms: float,
        limits: QueueLimits,
        on_batch: OnBatch | None = None,
        on_queue_change: Callable[[], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.limits = limits
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
                queue_limit=self.limits.per_model,  # checked first by ``limits`` (submit)
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
        self.limits.check(self.queued_by_model(), key.model, len(query))
        return await self.of(key.model).submit(key, query, deadline)

    async def stop(self) -> None:
        for batcher in self._batchers.values():
            await batcher.stop()
        self._batchers.clear()


class LocalCompute:
    """``--compute embedded``: every shard scored in this process (on ``device``) through its
    batchers."""

    mode = "embedded"

    def __init__(self, batchers: ModelBatchers, device: str = "cpu") -> None:
        self.batchers = batchers
        self.limits = batchers.limits
        self.device = device

    async def start(self) -> None:
        """Nothing to start: the batchers start on first use."""

    async def compute(self, work: Work, deadline: float) -> Computed:
        """Scores of ``work`` by every shard (``deadline`` in loop time), merged."""
        parts = await asyncio.gather(
            *(self.batchers.submit(shard_key(work, scorer), work.query, deadline)
              for scorer in work.scorers)
        )
        return merge(work, parts)

    def queued_by_model(self) -> dict[str, int]:
        return self.batchers.queued_by_model()

    def describe(self, model: str, shards: int) -> dict[str, Any]:
        return {"mode": self.mode, "device": self.device}

    def missing(self) -> list[str]:
        return []  # the registry's own readiness covers an in-process version

    def live_workers(self) -> None:
        return None

    async def stop(self) -> None:
        await self.batchers.stop()
