"""``SyncScorer``: the service's scoring engine behind synchronous calls (reports, studies,
tests). Its numbers are ``POST /score``'s (tests/api compare the two); here its own life: a
caller inside a running event loop, refusals as the engine's, and a clean stop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from latentsieve.index.store import LatentStore
from latentsieve.service.errors import ServiceError
from latentsieve.service.offline import SyncScorer
from latentsieve.workers.density import log_density_reference

MODEL = "digits-vae"


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"latentsieve-sync-{MODEL}"]


def test_scores_from_inside_a_running_loop_and_stops_cleanly(store_root: Path) -> None:
    before = len(engine_threads())
    loaded = LatentStore(store_root).load(MODEL)
    scorer = SyncScorer(loaded)
    latents = scorer.draw(range(5))
    sigma = 2.0 * loaded.manifest.bandwidth.sigma  # a new sigma: calibrated by the engine

    async def inside() -> np.ndarray:  # an async caller (a test, a notebook) may call it too
        return scorer.score(latents, sigma).log_density

    got = asyncio.run(inside())
    want = log_density_reference(loaded.to_index_space(latents), np.asarray(loaded.latents),
                                 sigma)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.all(np.diff(scorer.calibration(sigma)) >= 0)  # sorted, computed once above
    assert len(engine_threads()) == before + 1
    with pytest.raises(ServiceError, match="takes 8") as refused:
        scorer.score(np.zeros((2, 3), np.float32))
    assert refused.value.status == 422
    scorer.close()
    scorer.close()  # once; later calls do nothing
    assert len(engine_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score(latents)
