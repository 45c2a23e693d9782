"""The engine without a server: ``latentsieve score`` runs every request through it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from latentsieve.index.store import LatentStore
from latentsieve.service.cache import MemoryCache
from latentsieve.service.engine import ScoringEngine
from latentsieve.service.registry import ModelRegistry
from latentsieve.service.settings import Settings
from latentsieve.workers.devices import resolve_device
from latentsieve.workers.local_compute import LocalCompute, ModelBatchers


@contextlib.asynccontextmanager
async def offline_engine(store: Path, device: str, max_latents: int) -> AsyncIterator[
    ScoringEngine
]:
    """An embedded engine over ``store`` on ``device`` that takes up to ``max_latents`` per
    job, with no cache and no deadline worth the name (offline work waits for its result)."""
    resolved = resolve_device(device)  # a missing GPU is one line, before anything loads
    settings = Settings(
        store=store, device=device, max_batch=max_latents, queue_limit=max_latents,
        model_queue_limit=max_latents, request_timeout_s=7 * 24 * 3600.0,
    )
    registry = ModelRegistry(LatentStore(store), device=resolved)
    await registry.refresh()
    batchers = ModelBatchers(
        settings.max_batch_size, 0.0, settings.queue_limit, settings.model_queue_limit
    )
    engine = ScoringEngine(settings, registry, MemoryCache(0), LocalCompute(batchers))
    try:
        yield engine
    finally:
        await engine.stop()
