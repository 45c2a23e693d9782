"""The density scorer of each index kind: the exact GEMM engine for ``flat``, certified IVF
scoring for ``ivf`` (:mod:`latentsieve.workers.certified`). Each returns log-sums of eq. (1)
(:class:`DensityScores`); :mod:`latentsieve.workers.log_sums` divides by N."""

from __future__ import annotations

from typing import Any

import numpy as np

from latentsieve.index.ivf_lists import IvfLists, StoredRows
from latentsieve.index.manifest import DEFAULT_MAX_ERROR, check_sigma
from latentsieve.workers.certified import CertifiedIVF
from latentsieve.workers.density import DensityScores
from latentsieve.workers.log_sums import NO_ROW, sum_intervals


class CertifiedDensity:
    """Log-sums of eq. (1) over certified IVF lists with the :class:`DensityScorer` interface:
    every log-sum carries its bound (``DensityScores.error_bound``), at most ``max_error`` nats
    (the call's, else ``default_max_error``) unless every list had to be summed (then exact)."""

    def __init__(self, lists: IvfLists, default_max_error: float = DEFAULT_MAX_ERROR) -> None:
        self.index = CertifiedIVF(lists)
        self.latents = StoredRows(lists)
        self.default_max_error = default_max_error
        self.last_lists_probed: np.ndarray | None = None  # of the last batch, for the record

    def log_sum(
        self,
        queries: np.ndarray,
        sigma: float,
        exclude: np.ndarray | None = None,
        max_error: float | None = None,
    ) -> DensityScores:
        """Queries (Q, d) -> certified log-sums (Q,) nats; ``exclude`` as the exact engine's."""
        q = np.asarray(queries, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self.index.dim:
            raise ValueError(f"queries must have shape (Q, {self.index.dim}), got {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("queries contain NaN or Inf")
        bound = self.default_max_error if max_error is None else max_error
        scores = self.index.score(q, check_sigma(sigma), max_error=bound, exclude=exclude)
        self.last_lists_probed = scores.lists_probed
        return DensityScores(
            log_sum=scores.estimate,
            precision=np.zeros(q.shape[0], dtype=np.uint8),
            error_bound=scores.half_width,
        )


class ShardedCertified:
    """The certified ivf lists of every shard of a version as one scorer (build-time
    calibration): each shard's interval of its log-sum, summed end by end (docs/contract.md
    §4)."""

    def __init__(
        self, shards: list[IvfLists], starts: list[int], default_max_error: float
    ) -> None:
        self.parts = [CertifiedDensity(lists, default_max_error) for lists in shards]
        self.starts = np.asarray(starts, dtype=np.int64)
        self.counts = np.asarray([lists.n for lists in shards], dtype=np.int64)
        self.n = int(self.counts.sum())
        self.latents = _JoinedRows(self.parts, self.starts, self.n)
        self.last_lists_probed: np.ndarray | None = None

    def log_sum(
        self,
        queries: np.ndarray,
        sigma: float,
        exclude: np.ndarray | None = None,
        max_error: float | None = None,
    ) -> DensityScores:
        """Queries (Q, d) -> certified log-sums (Q,) nats over every shard's latents."""
        q = np.asarray(queries)
        out = np.full(q.shape[0], NO_ROW, np.int64) if exclude is None else np.asarray(exclude)
        log_sums, bounds, probed = [], [], np.zeros(q.shape[0], dtype=np.int64)
        for part, start, count in zip(self.parts, self.starts, self.counts, strict=True):
            local = np.where((out >= start) & (out < start + count), out - start, NO_ROW)
            scored = part.log_sum(q, sigma, exclude=local, max_error=max_error)
            assert part.last_lists_probed is not None
            log_sums.append(scored.log_sum)
            bounds.append(scored.error_bound)
            probed += part.last_lists_probed
        low, high = sum_intervals(log_sums, bounds)
        self.last_lists_probed = probed
        return DensityScores((low + high) / 2.0, np.zeros(q.shape[0], dtype=np.uint8),
                             (high - low) / 2.0)


class _JoinedRows:
    """The shards' stored rows by global row index (calibration reads leave-one-out rows)."""

    def __init__(self, parts: list[CertifiedDensity], starts: np.ndarray, n: int) -> None:
        self.parts, self.starts = parts, starts
        self.shape = (n, parts[0].index.dim)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.arange(self.shape[0])[key].reshape(-1)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((rows.shape[0], self.shape[1]), dtype=np.float32)
        for number in np.unique(shard):
            inside = shard == number
            out[inside] = self.parts[number].latents[rows[inside] - self.starts[number]]
        return out

