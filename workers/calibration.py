"""Percentile reference scores (CONTRACT §1): sampler draws, or leave-one-out training scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from index.build import CalibrationRequest
from workers.density import DensityEngine
from workers.modules import load_module
from workers.seed_latents import SeedLatents

BLOCK = 1024
Draw = Callable[[Sequence[int]], np.ndarray]


def score_calibration(
    engine: DensityEngine,
    sigma: float,
    *,
    count: int,
    seed_start: int | None = None,
    indices: np.ndarray | None = None,
    draw: Draw | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Unsorted log densities (count,) in nats of the calibration set at ``sigma``.

    Sampler source: seeds ``seed_start .. seed_start + count - 1`` through ``draw``.
    Leave-one-out source: training rows ``indices``, each scored without itself.
    """
    out = np.empty(count, dtype=np.float64)
    blocks = range(0, count, BLOCK)
    for start in tqdm(blocks, desc="calibration", unit="block", disable=not progress):
        stop = min(start + BLOCK, count)
        if indices is not None:
            rows = indices[start:stop]
            queries = np.asarray(engine.latents[rows], dtype=np.float32)
            out[start:stop] = engine.log_density(queries, sigma, exclude=rows).log_density
        else:
            assert draw is not None and seed_start is not None
            queries = draw(range(seed_start + start, seed_start + stop))
            out[start:stop] = engine.log_density(queries, sigma).log_density
    return out


def calibrate_build(request: CalibrationRequest) -> np.ndarray:
    """The ``index build`` calibrator: scores the request's calibration set at its sigma."""
    engine = DensityEngine(request.latents)
    draw: Draw | None = None
    if request.sampler is not None:
        mapping = (
            load_module(request.mapping, request.version_dir) if request.mapping else None
        )
        draw = SeedLatents(request.sampler, mapping).draw
    return score_calibration(
        engine,
        request.sigma,
        count=request.count,
        seed_start=request.seed_start,
        indices=request.indices,
        draw=draw,
        progress=request.progress,
    )
