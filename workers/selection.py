"""Pre-generation seed selection: the best latents, optionally kept apart for diversity."""

from __future__ import annotations

import numpy as np


def pick_diverse(
    latents: np.ndarray, order: np.ndarray, keep: int, min_distance: float | None
) -> list[int]:
    """Greedy: walk ``order`` (best first) and keep rows at least ``min_distance`` (L2, index
    space) from every row kept so far, until ``keep`` rows are kept. latents (n, d) -> rows.

    Top scores alone collapse onto the common modes (Xu et al., §7); the distance floor trades
    a little density for coverage. Fewer than ``keep`` rows come back when the floor runs out.
    """
    if min_distance is None:
        return [int(row) for row in order[:keep]]
    limit = min_distance * min_distance
    kept: list[int] = []
    kept_rows = np.empty((keep, latents.shape[1]), dtype=np.float64)
    for row in order.tolist():
        candidate = latents[row].astype(np.float64)
        if kept:
            gaps = kept_rows[: len(kept)] - candidate
            if np.einsum("ij,ij->i", gaps, gaps).min() < limit:
                continue
        kept_rows[len(kept)] = candidate
        kept.append(row)
        if len(kept) == keep:
            break
    return kept
