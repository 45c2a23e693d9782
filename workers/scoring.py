"""One loaded index version, ready to score latents or seeds and to decide on them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from index.manifest import IndexManifest, Policy, check_sigma
from index.store import LoadedVersion
from workers.calibration import score_calibration
from workers.density import DensityEngine
from workers.modules import load_module
from workers.policy import decide
from workers.seed_latents import SeedLatents

CALIBRATIONS_KEPT = 8


@dataclass(frozen=True)
class ScoredBatch:
    """Scores of n latents at one sigma: log densities (nats) and calibration percentiles."""

    log_density: np.ndarray  # (n,) float64
    percentile: np.ndarray  # (n,) float64 in [0, 1]


def percentile_of(scores: np.ndarray, sorted_reference: np.ndarray) -> np.ndarray:
    """Fraction of reference scores <= each score (CONTRACT §1): (n,), (M,) sorted -> (n,)."""
    ranks = np.searchsorted(sorted_reference, scores, side="right")
    return np.asarray(ranks / sorted_reference.size, dtype=np.float64)


@dataclass
class ModelScorer:
    """Engine, sampler, mapping and per-sigma calibrations of one version."""

    loaded: LoadedVersion
    device: str = "cpu"
    engine: DensityEngine = field(init=False)
    seed_latents: SeedLatents | None = field(init=False)
    _calibrations: OrderedDict[float, np.ndarray] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    # One calibration computed at a time per model: concurrent requests for a new sigma wait for
    # the first one's result instead of each scoring the whole calibration set.
    _compute_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        manifest = self.loaded.manifest
        self.engine = DensityEngine(self.loaded.latents, device=self.device)
        mapping = load_module(manifest.mapping, self.loaded.path) if manifest.mapping else None
        self.seed_latents = SeedLatents(manifest.sampler, mapping) if manifest.sampler else None
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
                draw=self.draw if spec.source == "sampler" else None,
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

    def score(self, latents: np.ndarray, sigma: float | None = None) -> ScoredBatch:
        """Latents (n, d) -> log densities and percentiles at ``sigma`` (default: the index's)."""
        sigma = self.manifest.bandwidth.sigma if sigma is None else check_sigma(sigma)
        log_density = self.engine.log_density(latents, sigma).log_density
        return ScoredBatch(log_density, percentile_of(log_density, self.calibration(sigma)))


def score_report(
    scorer: ModelScorer,
    batch: ScoredBatch,
    sigma: float,
    policy: Policy,
    seeds: Sequence[int] | None = None,
) -> dict[str, object]:
    """The JSON body of a ``POST /score`` answer (CONTRACT §3) for a scored batch."""
    reasons = decide(batch.percentile, policy)
    results: list[dict[str, object]] = []
    accepted: list[int] = []
    for row, (log_density, percentile) in enumerate(
        zip(batch.log_density.tolist(), batch.percentile.tolist(), strict=True)
    ):
        result: dict[str, object] = {
            "log_density": log_density,
            "percentile": percentile,
            "accept": not reasons[row],
            "reasons": reasons[row],
            "error_bound": 0.0,
            "cached": False,
        }
        if seeds is not None:
            result["seed"] = int(seeds[row])
        if not reasons[row]:
            accepted.append(int(seeds[row]) if seeds is not None else row)
        results.append(result)
    return {
        "model": scorer.manifest.model,
        "index_version": scorer.manifest.version,
        "sigma": sigma,
        "exact": scorer.manifest.exact,
        "results": results,
        "accepted": accepted,
    }
