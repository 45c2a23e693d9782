"""Eq. (1) from the log-sums of row-disjoint parts (shards, docs/contract.md §4), exact or
certified:

    log_density(z) = logsumexp_k( log_sum_k(z) ) - log N

Every density engine returns log-sums (:class:`latentsieve.workers.density.DensityScores`);
this merge is the one place that divides by N (N - 1 for a row that leaves itself out). A
certified part's log-sum comes with a half-width; both ends of the intervals merge like
log-sums, so the merged half-width is at most the largest part's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NO_ROW = -1  # a latent that leaves no training row out (leave-one-out ``exclude`` arrays)


def log_sum_of_parts(log_sums: Sequence[np.ndarray]) -> np.ndarray:
    """logsumexp_k(log_sum_k): the log-sum over the union of the parts, K arrays (q,) -> (q,)
    float64 nats (not divided by N)."""
    stacked = np.stack([np.asarray(part, dtype=np.float64) for part in log_sums])
    top = stacked.max(axis=0)
    finite_top = np.where(np.isfinite(top), top, 0.0)
    return np.asarray(finite_top + np.log(np.exp(stacked - finite_top).sum(axis=0)))


def _divided(log_sum: np.ndarray, exclude: np.ndarray | None, n: int) -> np.ndarray:
    """The division of eq. (1): log_sum (q,) over all ``n`` training latents -> log_sum -
    log(N, or N - 1 where ``exclude`` leaves a row out), at most 0 (every term is at most 1):
    (q,) float64 nats."""
    count = np.full(log_sum.shape, float(n))
    if exclude is not None:
        count[exclude != NO_ROW] = n - 1
    return np.asarray(np.minimum(log_sum - np.log(count), 0.0), dtype=np.float64)


def merge_log_sums(log_sums: Sequence[np.ndarray], exclude: np.ndarray | None, n: int) -> (
    np.ndarray
):
    """log_density = logsumexp_k(log_sum_k) - log(N, or N - 1 where a row is left out)
    (eq. 1 over the union of the parts): K arrays (q,) -> (q,) float64 nats."""
    return _divided(log_sum_of_parts(log_sums), exclude, n)


def sum_intervals(
    log_sums: Sequence[np.ndarray], bounds: Sequence[np.ndarray | None]
) -> tuple[np.ndarray, np.ndarray]:
    """Certified parts (log-sum +- bound, None: exact) -> both ends (low, high) (q,) of the
    union's log-sum, nats: each end of the intervals summed by :func:`log_sum_of_parts`."""
    widths = [np.zeros_like(part) if bound is None else bound
              for part, bound in zip(log_sums, bounds, strict=True)]
    return (
        log_sum_of_parts([p - w for p, w in zip(log_sums, widths, strict=True)]),
        log_sum_of_parts([p + w for p, w in zip(log_sums, widths, strict=True)]),
    )


def merge_intervals(
    log_sums: Sequence[np.ndarray],
    bounds: Sequence[np.ndarray | None],
    exclude: np.ndarray | None,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Certified parts (log-sum +- bound, None: exact) -> the merged log density's midpoint and
    half-width (q,), nats: each end of :func:`sum_intervals` divided as :func:`merge_log_sums`
    divides."""
    low, high = (_divided(end, exclude, n) for end in sum_intervals(log_sums, bounds))
    return (low + high) / 2.0, (high - low) / 2.0
