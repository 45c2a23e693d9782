"""The engine without a server: ``latentsieve score`` runs every request through it, and
``SyncScorer`` puts the same engine behind synchronous calls (reports, studies, benchmarks and
tests), so there is one scoring path: calibrations at a new sigma, descriptor checks, the
merge of the shards and the percentiles are the engine's."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Collection, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from latentsieve.index.manifest import IndexManifest
from latentsieve.index.store import LatentStore, LoadedVersion
from latentsieve.service.cache import MemoryCache
from latentsieve.service.engine import ScoringEngine
from latentsieve.service.registry import ModelRegistry, ServedModel
from latentsieve.service.settings import Settings
from latentsieve.workers.descriptors import DescriptorEngine
from latentsieve.workers.devices import resolve_device
from latentsieve.workers.local_compute import LocalCompute, ModelBatchers
from latentsieve.workers.scoring import ScoredBatch
from latentsieve.workers.seed_latents import SeedLatents
from latentsieve.workers.transport import QueueLimits

OFFLINE_TIMEOUT_S = 7 * 24 * 3600.0  # no deadline worth the name: offline work waits for it
SYNC_MAX_LATENTS = 10_000_000  # per SyncScorer call: the caller holds them all anyway

T = TypeVar("T")


def _embedded_engine(registry: ModelRegistry, max_latents: int, **fields: Any) -> ScoringEngine:
    """An engine computing in this process over ``registry``'s models on its device, taking up
    to ``max_latents`` per job, with no cache; ``fields``: other ``Settings`` fields."""
    settings = Settings(
        store=registry.store.root, device=registry.device, compute="embedded",
        max_batch=max_latents, queue_limit=max_latents, model_queue_limit=max_latents,
        request_timeout_s=OFFLINE_TIMEOUT_S, **fields,
    )
    batchers = ModelBatchers(
        settings.max_batch_size, 0.0, QueueLimits(max_latents, max_latents)
    )
    return ScoringEngine(
        settings, registry, MemoryCache(0), LocalCompute(batchers, registry.device)
    )


@contextlib.asynccontextmanager
async def offline_engine(store: Path, device: str, max_latents: int) -> AsyncIterator[
    ScoringEngine
]:
    """An embedded engine over every model of ``store`` on ``device`` that takes up to
    ``max_latents`` per job, with no cache and no deadline worth the name."""
    resolved = resolve_device(device)  # a missing GPU is one line, before anything loads
    registry = ModelRegistry(LatentStore(store), device=resolved)
    await registry.refresh()
    engine = _embedded_engine(registry, max_latents)
    try:
        yield engine
    finally:
        await engine.stop()


class SyncScorer:
    """One loaded version scored by the service's ``ScoringEngine`` (embedded compute, no
    cache) behind synchronous calls: ``score`` answers what ``POST /score`` answers for the
    same latents, sigma and ``max_error``, without a policy's decisions.

    The engine runs on a private event loop in a thread of its own, so callers inside a
    running loop (async tests) can call it too. ``device`` (``cpu``, ``cuda[:I]`` or ``auto``,
    see workers/devices.py) runs the exact density GEMMs and the generator's Jacobians;
    certified ivf probing, seed draws and the mapping stay on the CPU. ``close`` (or leaving a
    ``with`` block) stops the engine and its thread; garbage collection does it otherwise.
    Refusals are the engine's ``ServiceError`` (e.g. 422 for a descriptor the model does not
    compute)."""

    def __init__(
        self, loaded: LoadedVersion, device: str = "cpu", max_latents: int = SYNC_MAX_LATENTS
    ) -> None:
        registry = ModelRegistry(LatentStore(loaded.path.parent.parent), resolve_device(device))
        self.served: ServedModel = registry.serve(loaded)
        # The caller's sigma is the point of a library call (a bandwidth sweep, a study):
        # whatever a service's environment says about requests.
        self._engine = _embedded_engine(registry, max_latents, allow_request_sigma=True)
        self._loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                  name=f"latentsieve-sync-{loaded.manifest.model}")
        thread.start()
        self._stop = weakref.finalize(self, _stop_engine, self._loop, thread, self._engine)

    def __enter__(self) -> SyncScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the engine and its loop's thread (once; later calls do nothing)."""
        self._stop()

    @property
    def loaded(self) -> LoadedVersion:
        return self.served.view.loaded

    @property
    def manifest(self) -> IndexManifest:
        return self.served.view.manifest

    @property
    def seed_latents(self) -> SeedLatents | None:
        return self.served.view.seed_latents

    @property
    def descriptor_engine(self) -> DescriptorEngine | None:
        """The generator's descriptor engine (shard 0's), None without a generator."""
        return self.served.shards[0].descriptor_engine

    @property
    def descriptor_names(self) -> frozenset[str]:
        """The descriptors this model computes."""
        return self.served.view.descriptor_names

    def draw(self, seeds: Sequence[int]) -> np.ndarray:
        """seeds (n,) -> latents (n, d) float32 as the sampler and mapping send them."""
        return self.served.view.draw(seeds)

    def score(
        self,
        latents: np.ndarray,
        sigma: float | None = None,
        descriptors: Collection[str] = (),
        max_error: float | None = None,
    ) -> ScoredBatch:
        """Latents (n, d) as sent -> log densities and percentiles at ``sigma`` (default: the
        index's), and the named descriptors (docs/contract.md §2) with their calibration
        percentiles; a certified ivf index bounds each score by ``max_error`` nats (default:
        the index's). A new sigma is calibrated once (``ScoringEngine.calibration``)."""
        return self._run(self._engine.score_batch(
            self.manifest.model, np.asarray(latents, dtype=np.float32), sigma,
            tuple(sorted(set(descriptors))), max_error,
        ))

    def calibration(self, sigma: float) -> np.ndarray:
        """Sorted calibration scores (count,) at ``sigma``, computed once when new."""
        return self._run(self._calibration(sigma))

    async def _calibration(self, sigma: float) -> np.ndarray:
        await self._engine.calibration(self.served, sigma, self._engine.deadline())
        scores = self.served.view.cached_calibration(sigma)
        assert scores is not None  # just computed; one of the last CALIBRATIONS_KEPT
        return scores

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        if not self._stop.alive:
            work.close()
            raise RuntimeError("this SyncScorer is closed")
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()


def _stop_engine(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, engine: ScoringEngine
) -> None:
    """Stop ``engine`` on its ``loop``, then the loop and its ``thread`` (SyncScorer.close)."""
    if loop.is_running():
        asyncio.run_coroutine_threadsafe(engine.stop(), loop).result()
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()
