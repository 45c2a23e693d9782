"""Percentile reference scores (docs/contract.md §1): sampler draws, latents the user supplies
(``--calibration-latents``), or leave-one-out training scores."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from latentsieve.index.build import (
    CalibrationRequest,
    CalibrationResult,
    DescriptorCalibration,
    DescriptorOptions,
)
from latentsieve.index.kinds import KINDS
from latentsieve.index.manifest import (
    DESCRIPTOR_NAMES,
    CertifiedMeasure,
    ModuleReference,
    SamplerRecipe,
)
from latentsieve.index.projection import project
from latentsieve.workers.density import DensityEngine, DensityScorer
from latentsieve.workers.descriptors import DescriptorEngine
from latentsieve.workers.kinds import scorer_of
from latentsieve.workers.log_sums import merge_intervals, merge_log_sums
from latentsieve.workers.modules import load_module, module_state_sha256
from latentsieve.workers.seed_latents import SeedLatents

BLOCK = 1024
ERROR_SAMPLE = 500  # calibration latents whose approximate score is checked against exact
Draw = Callable[[Sequence[int]], np.ndarray]


def log_density(
    engine: DensityScorer, queries: np.ndarray, sigma: float, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Eq. (1) of queries (Q, d) over every training latent of ``engine``: its log-sums (with
    their certified bounds) divided by N, or N - 1 leaving ``exclude`` out, in the one merge
    (:mod:`latentsieve.workers.log_sums`): (Q,) nats."""
    scored = engine.log_sum(queries, sigma, exclude)
    n = int(engine.latents.shape[0])
    if scored.error_bound is None:
        return merge_log_sums([scored.log_sum], exclude, n)
    return merge_intervals([scored.log_sum], [scored.error_bound], exclude, n)[0]


def score_calibration(
    engine: DensityScorer,
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
            out[start:stop] = log_density(engine, queries, sigma, exclude=rows)
        else:
            assert draw is not None and seed_start is not None
            queries = draw(range(seed_start + start, seed_start + stop))
            out[start:stop] = log_density(engine, queries, sigma)
    return out


def measure_certified(
    certified: DensityScorer,
    exact: DensityScorer,
    queries: np.ndarray,
    sigma: float,
    exclude: np.ndarray | None = None,
) -> CertifiedMeasure:
    """A certified scorer against the exact engine on (n, d) held-out ``queries``: its largest
    bound and true error (nats: of the log-sums, so of eq. (1) too, both over the same
    latents), and exact time / certified time (each the best of two runs, interleaved, in this
    process)."""
    exact_s = certified_s = math.inf
    for _ in range(2):
        start = time.perf_counter()
        want = exact.log_sum(queries, sigma, exclude).log_sum
        exact_s = min(exact_s, time.perf_counter() - start)
        start = time.perf_counter()
        got = certified.log_sum(queries, sigma, exclude)
        certified_s = min(certified_s, time.perf_counter() - start)
    bound = got.error_bound if got.error_bound is not None else np.zeros_like(want)
    probed = getattr(certified, "last_lists_probed", None)
    return CertifiedMeasure(
        sample=int(want.size),
        half_width_max=float(bound.max()),
        error_max=float(np.abs(got.log_sum - want).max()),
        lists_probed_mean=float(np.mean(probed)) if probed is not None else 0.0,
        speedup=exact_s / max(certified_s, 1e-9),
    )


def calibrate_build(request: CalibrationRequest) -> CalibrationResult:
    """The ``index build`` calibrator: scores the request's calibration set at its sigma and,
    with a generator, the descriptors of its first ``descriptors.calibration_count`` latents."""
    engine = scorer_of(request.kind).open_build(request)
    draw_source: Draw | None = None  # seeds -> latents as sent (before any PCA)
    draw: Draw | None = None  # seeds -> the index's space
    states: dict[str, str] = {}
    first = request.seed_start
    if request.calibration_latents is not None:  # rows 0 .. count - 1 play the seeds
        given = request.calibration_latents
        first = 0

        def draw_given(rows: Sequence[int]) -> np.ndarray:
            return np.ascontiguousarray(given[np.asarray(rows, dtype=np.int64)])

        draw_source = draw_given
        projection = request.projection
        draw = draw_source if projection is None else _projected(draw_source, projection)
    elif request.sampler is not None:
        mapping = (
            load_module(request.mapping, request.version_dir) if request.mapping else None
        )
        if mapping is not None:
            states["mapping"] = module_state_sha256(mapping)
        draw_source = SeedLatents(request.sampler, mapping).draw
        projection = request.projection
        draw = draw_source if projection is None else _projected(draw_source, projection)
    scores = score_calibration(
        engine,
        request.sigma,
        count=request.count,
        seed_start=first,
        indices=request.indices if draw is None else None,
        draw=draw,
        progress=request.progress,
    )
    measured = None
    if not KINDS[request.kind].exact:  # a certified kind: its bound measured against exact
        sample = min(ERROR_SAMPLE, request.count)
        if draw is not None and first is not None:
            queries, rows = draw(range(first, first + sample)), None
        else:
            assert request.indices is not None
            rows = request.indices[:sample]
            queries = np.asarray(request.latents[rows], dtype=np.float32)
        measured = measure_certified(engine, DensityEngine(request.latents), queries,
                                     request.sigma, rows)
    if request.generator is None or request.descriptors is None:
        return CalibrationResult(scores, measured=measured, module_states=states)
    count = min(request.descriptors.calibration_count, request.count)
    if draw_source is not None and first is not None:
        latents = draw_source(range(first, first + count))
    else:
        assert request.indices is not None
        source = request.source_latents if request.source_latents is not None else request.latents
        latents = np.asarray(source[request.indices[:count]], dtype=np.float32)
    generator = load_module(request.generator, request.version_dir)
    states["generator"] = module_state_sha256(generator)
    options = request.descriptors
    descriptor_engine = build_descriptor_engine(generator, request.latent_shape, options)
    values = score_descriptors(descriptor_engine, latents, request.progress)
    return CalibrationResult(
        scores,
        DescriptorCalibration(
            descriptor_engine.output_dim, descriptor_engine.delta_radius, values
        ),
        measured,
        states,
    )


def draw_mapped_queries(
    sampler: SamplerRecipe, mapping: ModuleReference, version_dir: Path, seeds: range
) -> np.ndarray:
    """What a mapped sampler sends for ``seeds``: (n, d) float32 (the build's QueryDraws)."""
    return SeedLatents(sampler, load_module(mapping, version_dir)).draw(seeds)


def _projected(draw: Draw, projection: tuple[np.ndarray, np.ndarray]) -> Draw:
    """``draw`` followed by the PCA projection of the index."""

    def draw_projected(seeds: Sequence[int]) -> np.ndarray:
        return project(draw(seeds), *projection)

    return draw_projected


def build_descriptor_engine(
    generator: nn.Module, latent_shape: tuple[int, ...], options: DescriptorOptions
) -> DescriptorEngine:
    """A DescriptorEngine for ``generator``; its output size is read off one forward pass."""
    with torch.no_grad():
        output_dim = int(generator(torch.zeros((1, *latent_shape))).numel())
    return DescriptorEngine(
        generator,
        latent_shape,
        output_dim,
        m=options.projection_rows,
        projection_seed=options.projection_seed,
        delta_directions=options.delta_directions,
        delta_radius=options.delta_radius,
    )


def score_descriptors(
    engine: DescriptorEngine, latents: np.ndarray, progress: bool = False
) -> dict[str, np.ndarray]:
    """Every descriptor the engine supports (psi, nu, delta) of index-space latents (n, d)
    -> {name: (n,) float64}, in blocks."""
    shaped = latents.reshape(latents.shape[0], *engine.latent_shape)
    names = [name for name in DESCRIPTOR_NAMES if name in engine.available]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    blocks = range(0, shaped.shape[0], BLOCK)
    for start in tqdm(blocks, desc="descriptors", unit="block", disable=not progress):
        values = engine.compute(shaped[start : start + BLOCK], set(names))
        for name in names:
            parts[name].append(np.asarray(values[name], dtype=np.float64))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}
