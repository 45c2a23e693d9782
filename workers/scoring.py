"""One loaded index version: the view a gateway routes and decides with (scores come from
``service.engine.ScoringEngine``; ``service.offline.SyncScorer`` is its synchronous entry
point), and the docs/contract.md §3 body of scored latents."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from latentsieve.index.manifest import IndexManifest, Policy
from latentsieve.index.store import LatentStore, LoadedVersion
from latentsieve.workers.calibration import BLOCK
from latentsieve.workers.modules import load_module
from latentsieve.workers.policy import decide
from latentsieve.workers.score_body import Descriptors, ScoreResponse, ScoreResult
from latentsieve.workers.seed_latents import SeedLatents
from latentsieve.workers.shard_scoring import ShardQuery

CALIBRATIONS_KEPT = 8


@dataclass(frozen=True)
class ScoredBatch:
    """Scores of n latents at one sigma: log densities (nats) and calibration percentiles, and
    the descriptors asked for with their calibration percentiles."""

    log_density: np.ndarray  # (n,) float64
    percentile: np.ndarray  # (n,) float64 in [0, 1]
    descriptors: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,)
    descriptor_percentiles: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,)
    error_bound: np.ndarray | None = None  # (n,) nats, certified ivf; None: exact (0)

    def __len__(self) -> int:
        return int(self.log_density.shape[0])

    def rows(self, index: np.ndarray | Sequence[int]) -> ScoredBatch:
        """The scores of the rows ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return ScoredBatch(
            self.log_density[index],
            self.percentile[index],
            {name: values[index] for name, values in self.descriptors.items()},
            {name: values[index] for name, values in self.descriptor_percentiles.items()},
            None if self.error_bound is None else self.error_bound[index],
        )


def percentile_of(scores: np.ndarray, sorted_reference: np.ndarray) -> np.ndarray:
    """Fraction of reference scores <= each score (docs/contract.md §1): (n,), (M,) sorted ->
    (n,)."""
    ranks = np.searchsorted(sorted_reference, scores, side="right")
    return np.asarray(ranks / sorted_reference.size, dtype=np.float64)


@dataclass(frozen=True)
class CalibrationBlock:
    """Part of a version's calibration set to score at a new sigma: a query for every shard
    and whether its latents are already in the index's space (leave-one-out rows are)."""

    query: ShardQuery
    index_space: bool


@dataclass
class ModelView:
    """What routing and deciding need of one version, without its training latents: the
    manifest, the sampler (and mapping) that turns seeds into latents, and the calibrations
    that turn scores into percentiles. A gateway in front of workers holds only this."""

    loaded: LoadedVersion
    seed_latents: SeedLatents | None = field(init=False)
    _calibrations: OrderedDict[float, np.ndarray] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        manifest = self.loaded.manifest
        mapping = load_module(manifest.mapping, self.loaded.path) if manifest.mapping else None
        self.seed_latents = SeedLatents(manifest.sampler, mapping) if manifest.sampler else None
        self._calibrations = OrderedDict(
            [(manifest.calibration.sigma, self.loaded.calibration_scores)]
        )

    @property
    def manifest(self) -> IndexManifest:
        return self.loaded.manifest

    @property
    def has_descriptors(self) -> bool:
        return self.manifest.descriptors is not None and self.manifest.generator is not None

    @property
    def descriptor_names(self) -> frozenset[str]:
        """The descriptors this model computes (calibrated at build time)."""
        settings = self.manifest.descriptors
        if not self.has_descriptors or settings is None:
            return frozenset()
        return frozenset(settings.names)

    def draw(self, seeds: Sequence[int]) -> np.ndarray:
        """seeds (n,) -> latents as the sampler and mapping send them (n, d) float32."""
        if self.seed_latents is None:
            raise ValueError(f"model {self.manifest.model!r} has no sampler; send latents")
        return self.seed_latents.draw(seeds)

    def cached_calibration(self, sigma: float) -> np.ndarray | None:
        """Sorted calibration scores at ``sigma`` if known (the build's, or computed)."""
        with self._lock:
            cached = self._calibrations.get(sigma)
            if cached is not None:
                self._calibrations.move_to_end(sigma)
            return cached

    def keep_calibration(self, sigma: float, scores: np.ndarray) -> np.ndarray:
        """Record the calibration scores (count,) at ``sigma``; the last
        ``CALIBRATIONS_KEPT`` sigmas are kept. Returns them sorted."""
        ordered = np.sort(np.asarray(scores, dtype=np.float64))
        with self._lock:
            self._calibrations[sigma] = ordered
            while len(self._calibrations) > CALIBRATIONS_KEPT:
                self._calibrations.popitem(last=False)
        return ordered

    def calibration_blocks(self, block: int = BLOCK) -> Iterator[CalibrationBlock]:
        """The calibration set (docs/contract.md §1) in blocks of ``block`` latents: sampler draws
        or
        the user's ``--calibration-latents`` as sent, or the leave-one-out training rows in the
        index's space, each leaving itself out."""
        spec = self.manifest.calibration
        for start in range(0, spec.count, block):
            stop = min(start + block, spec.count)
            if spec.source == "sampler":
                assert spec.seed_start is not None
                seeds = range(spec.seed_start + start, spec.seed_start + stop)
                yield CalibrationBlock(ShardQuery(self.draw(seeds)), index_space=False)
            elif spec.source == "latents":  # the user's latents, scored as they were sent
                assert self.loaded.calibration_latents is not None
                rows = np.array(self.loaded.calibration_latents[start:stop], dtype=np.float32)
                yield CalibrationBlock(ShardQuery(rows), index_space=False)
            else:
                assert self.loaded.calibration_indices is not None
                rows = self.loaded.calibration_indices[start:stop].astype(np.int64)
                yield CalibrationBlock(ShardQuery(self._training_rows(rows), rows), True)

    def _training_rows(self, rows: np.ndarray) -> np.ndarray:
        """Training latents (r, d') of global rows, from the opened shards or, for a view that
        opened none, from the store's memory-mapped shard files (no copy beyond the rows)."""
        loaded = self.loaded
        if len(loaded.shards) != len(self.manifest.shard_layout()):
            store = LatentStore(loaded.path.parent.parent)
            loaded = store.load(self.manifest.model, self.manifest.version, verify=False)
        out = np.empty((rows.size, loaded.shards[0].latents.shape[1]), dtype=np.float32)
        for shard in loaded.shards:
            local = rows - shard.start
            inside = np.flatnonzero((local >= 0) & (local < shard.latents.shape[0]))
            out[inside] = shard.latents[local[inside]]
        return out

    def scored(
        self,
        log_density: np.ndarray,
        sigma: float,
        descriptors: dict[str, np.ndarray],
        error_bound: np.ndarray | None = None,
    ) -> ScoredBatch:
        """Merged scores -> their percentiles against the calibrations (sigma's must be known)."""
        reference = self.cached_calibration(sigma)
        if reference is None:
            raise ValueError(f"no calibration at sigma {sigma}; compute it first")
        batch = ScoredBatch(log_density, percentile_of(log_density, reference),
                            error_bound=error_bound)
        if descriptors:
            calibration = self.loaded.descriptor_calibration
            if calibration is None:
                raise ValueError(f"model {self.manifest.model!r} has no descriptor calibration")
            for name in sorted(descriptors):
                batch.descriptors[name] = descriptors[name]
                batch.descriptor_percentiles[name] = percentile_of(
                    descriptors[name], calibration[name]
                )
        return batch


def score_report(
    scorer: ModelView,
    batch: ScoredBatch,
    sigma: float,
    policy: Policy,
    seeds: Sequence[int] | None = None,
    cached: Sequence[bool] | None = None,
    positions: Sequence[int] | None = None,
) -> ScoreResponse:
    """The body of a ``POST /score`` answer (docs/contract.md §3, workers/score_body.py) for a
    scored batch; ``cached`` marks the rows served from the score cache (all ``False`` when
    omitted); ``positions`` gives each row's place in a posted batch (``/select`` over latents:
    each result's ``index``, and what ``accepted`` lists)."""
    reasons = decide(batch.percentile, policy, batch.descriptor_percentiles)
    count = len(batch.log_density)
    # 0 in exact mode and for PCA+flat (exact in the stored space the score is defined in);
    # certified ivf: each score's own bound.
    bounds = [0.0] * count if batch.error_bound is None else batch.error_bound.tolist()
    results: list[ScoreResult] = [
        {
            "log_density": log_density,
            "percentile": percentile,
            "accept": not why,
            "reasons": why,
            "error_bound": bound,
            "cached": hit,
        }
        for log_density, percentile, why, hit, bound in zip(
            batch.log_density.tolist(), batch.percentile.tolist(), reasons,
            [False] * count if cached is None else cached, bounds, strict=True,
        )
    ]
    if seeds is not None:
        for result, seed in zip(results, seeds, strict=True):
            result["seed"] = int(seed)
    if positions is not None:
        for result, position in zip(results, positions, strict=True):
            result["index"] = int(position)
    if batch.descriptors:
        columns = {
            name: values.astype(np.int64).tolist() if name == "delta" else values.tolist()
            for name, values in batch.descriptors.items()
        }
        ranks = {name: values.tolist() for name, values in batch.descriptor_percentiles.items()}
        described: list[dict[str, float]] = [{} for _ in results]
        for name in batch.descriptors:
            rank_key = f"{name}_percentile"
            for values, value, rank in zip(described, columns[name], ranks[name], strict=True):
                values[name] = value
                values[rank_key] = rank
        # Keys named at run time (DESCRIPTOR_NAMES): the schema tests hold them to the type.
        for result, row in zip(results, cast(list[Descriptors], described), strict=True):
            result["descriptors"] = row
    labels = seeds if seeds is not None else positions
    accepted = [
        (int(labels[row]) if labels is not None else row) for row, why in enumerate(reasons)
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
