"""One loaded index version, ready to score latents or seeds and to decide on them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from index.manifest import IndexManifest, Policy, check_sigma
from index.store import LoadedVersion
from workers.approximate import open_density
from workers.calibration import score_calibration, score_descriptors
from workers.density import DensityScorer
from workers.descriptors import DescriptorEngine
from workers.modules import load_module
from workers.policy import decide
from workers.seed_latents import SeedLatents

CALIBRATIONS_KEPT = 8


@dataclass(frozen=True)
class ScoredBatch:
    """Scores of n latents at one sigma: log densities (nats) and calibration percentiles, and
    the descriptors asked for with their calibration percentiles."""

    log_density: np.ndarray  # (n,) float64
    percentile: np.ndarray  # (n,) float64 in [0, 1]
    descriptors: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,)
    descriptor_percentiles: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,)


def percentile_of(scores: np.ndarray, sorted_reference: np.ndarray) -> np.ndarray:
    """Fraction of reference scores <= each score (CONTRACT §1): (n,), (M,) sorted -> (n,)."""
    ranks = np.searchsorted(sorted_reference, scores, side="right")
    return np.asarray(ranks / sorted_reference.size, dtype=np.float64)


@dataclass
class ModelScorer:
    """Engine, sampler, mapping and per-sigma calibrations of one version. ``device`` (``cpu``
    or ``cuda:I``, see workers/devices.py) runs the density GEMMs, the generator's Jacobians
    and, for ivf, the FAISS search where the FAISS build has GPU indexes; seed draws and the
    mapping stay on the CPU, where the sampler recipe is defined."""

    loaded: LoadedVersion
    device: str = "cpu"
    engine: DensityScorer = field(init=False)
    seed_latents: SeedLatents | None = field(init=False)
    descriptor_engine: DescriptorEngine | None = field(init=False)
    _calibrations: OrderedDict[float, np.ndarray] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    # One calibration computed at a time per model: concurrent requests for a new sigma wait for
    # the first one's result instead of each scoring the whole calibration set.
    _compute_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        manifest = self.loaded.manifest
        self.engine = open_density(
            manifest.kind, self.loaded.latents, self.loaded.index, manifest.search, self.device
        )
        mapping = load_module(manifest.mapping, self.loaded.path) if manifest.mapping else None
        self.seed_latents = SeedLatents(manifest.sampler, mapping) if manifest.sampler else None
        self.descriptor_engine = None
        settings = manifest.descriptors
        if settings is not None and manifest.generator is not None:
            self.descriptor_engine = DescriptorEngine(
                load_module(manifest.generator, self.loaded.path).to(self.device),
                manifest.latent_shape,
                settings.output_dim,
                m=settings.projection_rows,
                projection_seed=settings.projection_seed,
                delta_directions=settings.delta_directions,
                delta_radius=settings.delta_radius,
            )
        self._calibrations = OrderedDict(
            [(manifest.calibration.sigma, self.loaded.calibration_scores)]
        )

    @property
    def manifest(self) -> IndexManifest:
        return self.loaded.manifest

    def draw(self, seeds: Sequence[int]) -> np.ndarray:
        """seeds (n,) -> index-space latents (n, d) float32; needs a sampler."""
        if self.seed_latents is None:
            raise ValueError(f"model {self.manifest.model!r} has no sampler; send latents")
        return self.seed_latents.draw(seeds)

    def _draw_index_space(self, seeds: Sequence[int]) -> np.ndarray:
        return self.loaded.to_index_space(self.draw(seeds))

    def calibration(self, sigma: float) -> np.ndarray:
        """Sorted calibration scores at ``sigma``; other sigmas than the build's are computed
        once (same calibration set) and the last ``CALIBRATIONS_KEPT`` are kept."""
        cached = self._cached_calibration(sigma)
        if cached is not None:
            return cached
        with self._compute_lock:
            cached = self._cached_calibration(sigma)
            if cached is not None:
                return cached
            spec = self.manifest.calibration
            scores = score_calibration(
                self.engine,
                sigma,
                count=spec.count,
                seed_start=spec.seed_start,
                indices=self.loaded.calibration_indices,
                draw=self._draw_index_space if spec.source == "sampler" else None,
            )
            scores.sort()
            with self._lock:
                self._calibrations[sigma] = scores
                while len(self._calibrations) > CALIBRATIONS_KEPT:
                    self._calibrations.popitem(last=False)
            return scores

    def _cached_calibration(self, sigma: float) -> np.ndarray | None:
        with self._lock:
            cached = self._calibrations.get(sigma)
            if cached is not None:
                self._calibrations.move_to_end(sigma)
            return cached

    @property
    def has_descriptors(self) -> bool:
        return self.descriptor_engine is not None

    @property
    def descriptor_names(self) -> frozenset[str]:
        """The descriptors this model computes (calibrated at build time)."""
        settings = self.manifest.descriptors
        if self.descriptor_engine is None or settings is None:
            return frozenset()
        return frozenset(settings.names)

    def score(
        self,
        latents: np.ndarray,
        sigma: float | None = None,
        descriptors: Collection[str] = (),
    ) -> ScoredBatch:
        """Latents (n, d) -> log densities and percentiles at ``sigma`` (default: the index's),
        and the named descriptors (CONTRACT §2) with their calibration percentiles."""
        sigma = self.manifest.bandwidth.sigma if sigma is None else check_sigma(sigma)
        index_space = self.loaded.to_index_space(latents)
        log_density = self.engine.log_density(index_space, sigma).log_density
        batch = ScoredBatch(log_density, percentile_of(log_density, self.calibration(sigma)))
        if not descriptors:
            return batch
        if self.descriptor_engine is None or self.loaded.descriptor_calibration is None:
            raise ValueError(f"model {self.manifest.model!r} has no generator for descriptors")
        missing = set(descriptors) - self.descriptor_names
        if missing:
            raise ValueError(
                f"model {self.manifest.model!r} does not compute {', '.join(sorted(missing))} "
                "(a TorchScript generator has psi and nu only)"
            )
        values = score_descriptors(self.descriptor_engine, np.asarray(latents, np.float32))
        for name in sorted(set(descriptors)):
            batch.descriptors[name] = values[name]
            reference = self.loaded.descriptor_calibration[name]
            batch.descriptor_percentiles[name] = percentile_of(values[name], reference)
        return batch


def score_report(
    scorer: ModelScorer,
    batch: ScoredBatch,
    sigma: float,
    policy: Policy,
    seeds: Sequence[int] | None = None,
    cached: Sequence[bool] | None = None,
) -> dict[str, object]:
    """The JSON body of a ``POST /score`` answer (CONTRACT §3) for a scored batch; ``cached``
    marks the rows served from the score cache (all ``False`` when omitted)."""
    reasons = decide(batch.percentile, policy, batch.descriptor_percentiles)
    # 0 in exact mode and for PCA+flat (exact in the stored space the score is defined in);
    # null for ivf/hnsw, whose retrieval error is measured, not bounded.
    error_bound = 0.0 if scorer.manifest.search is None else None
    count = len(batch.log_density)
    results: list[dict[str, object]] = [
        {
            "log_density": log_density,
            "percentile": percentile,
            "accept": not why,
            "reasons": why,
            "error_bound": error_bound,
            "cached": hit,
        }
        for log_density, percentile, why, hit in zip(
            batch.log_density.tolist(), batch.percentile.tolist(), reasons,
            [False] * count if cached is None else cached, strict=True,
        )
    ]
    if seeds is not None:
        for result, seed in zip(results, seeds, strict=True):
            result["seed"] = int(seed)
    if batch.descriptors:
        columns = {
            name: values.astype(np.int64).tolist() if name == "delta" else values.tolist()
            for name, values in batch.descriptors.items()
        }
        ranks = {name: values.tolist() for name, values in batch.descriptor_percentiles.items()}
        for row, result in enumerate(results):
            described: dict[str, float] = {}
            for name in batch.descriptors:
                described[name] = columns[name][row]
                described[f"{name}_percentile"] = ranks[name][row]
            result["descriptors"] = described
    accepted = [
        (int(seeds[row]) if seeds is not None else row) for row, why in enumerate(reasons)
        if not why
    ]
    return {
        "model": scorer.manifest.model,
        "index_version": scorer.manifest.version,
        "sigma": sigma,
        "exact": scorer.manifest.exact,
        "results": results,
        "accepted": accepted,
    }
