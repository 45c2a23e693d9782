"""Eq. (1) from the log-sums of row-disjoint parts (shards, docs/contract.md §4), exact or
certified:

    log_density(z) = logsumexp_k( log_sum_k(z) ) - log N

A certified part's log-sum comes with a half-width; both ends of the intervals merge like
log-sums, so the merged half-width is at most the largest part's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NO_ROW = -1  # a latent that leaves no training row out (leave-one-out ``exclude`` arrays)


def merge_log_sums(log_sums: Sequence[np.ndarray], exclude: np.ndarray | None, n: int) -> (
    np.ndarray
):
    """log_density = logsumexp_k(log_sum_k) - log(N, or N - 1 where a row is left out)
    (eq. 1 over the union of the parts): K arrays (q,) -> (q,) float64 nats."""
    stacked = np.stack([np.asarray(part, dtype=np.float64) for part in log_sums])
    top = stacked.max(axis=0)
    finite_top = np.where(np.isfinite(top), top, 0.0)
    total = finite_top + np.log(np.exp(stacked - finite_top).sum(axis=0))
    count = np.full(total.shape, float(n))
    if exclude is not None:
        count[exclude != NO_ROW] = n - 1
    return np.asarray(np.minimum(total - np.log(count), 0.0), dtype=np.float64)


def merge_intervals(
    log_sums: Sequence[np.ndarray],
    bounds: Sequence[np.ndarray | None],
    exclude: np.ndarray | None,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Certified parts (log-sum +- bound, None: exact) -> the merged log density's midpoint and
    half-width (q,), nats: each end of the intervals merged by :func:`merge_log_sums`."""
    widths = [np.zeros_like(part) if bound is None else bound
              for part, bound in zip(log_sums, bounds, strict=True)]
    low = merge_log_sums([p - w for p, w in zip(log_sums, widths, strict=True)], exclude, n)
    high = merge_log_sums([p + w for p, w in zip(log_sums, widths, strict=True)], exclude, n)
    return (low + high) / 2.0, (high - low) / 2.0
