"""Accept/reject decisions from scores and a model's policy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from latentsieve.index.manifest import Policy

PERCENTILE_BELOW_MIN = "percentile_below_min"
RANK_SUM_BELOW_MIN = "rank_sum_below_min"


def rank_sum(percentiles: np.ndarray, psi_percentiles: np.ndarray) -> np.ndarray:
    """The rank-sum score of docs/evidence.md: ``(p + (1 - p_psi)) / 2``, (n,), (n,) -> (n,)
    in [0, 1]; high density and low ``psi`` (Humayun et al.: low local scaling) score high."""
    return np.asarray((percentiles + 1.0 - psi_percentiles) / 2.0, dtype=np.float64)


def decide(
    percentiles: np.ndarray,
    policy: Policy,
    descriptor_percentiles: Mapping[str, np.ndarray] | None = None,
) -> list[list[str]]:
    """The reasons each latent is rejected for: (n,) percentiles -> n lists (empty = accept).

    Reasons: ``percentile_below_min``, ``{name}_percentile_below_min`` /
    ``{name}_percentile_above_max`` for each descriptor bound of the policy, and
    ``rank_sum_below_min`` for its rank-sum rule (:func:`rank_sum`).
    """
    # The density rule always applies: it seeds every row's list in one pass; descriptor rules
    # then append to the rows they fail.
    reasons = [
        [PERCENTILE_BELOW_MIN] if failed else []
        for failed in (percentiles < policy.min_percentile).tolist()
    ]
    for name, bounds in policy.descriptor_bounds().items():
        if descriptor_percentiles is None or name not in descriptor_percentiles:
            raise ValueError(f"the policy bounds {name!r} but it was not computed")
        values = descriptor_percentiles[name]
        rules: list[tuple[str, np.ndarray]] = []
        if bounds.min_percentile is not None:
            rules.append((f"{name}_percentile_below_min", values < bounds.min_percentile))
        if bounds.max_percentile is not None:
            rules.append((f"{name}_percentile_above_max", values > bounds.max_percentile))
        for reason, failed in rules:
            for row in np.flatnonzero(failed).tolist():
                reasons[row].append(reason)
    if policy.rank_sum is not None:
        if descriptor_percentiles is None or "psi" not in descriptor_percentiles:
            raise ValueError("the policy's rank_sum needs psi but it was not computed")
        combined = rank_sum(percentiles, descriptor_percentiles["psi"])
        for row in np.flatnonzero(combined < policy.rank_sum.min_score).tolist():
            reasons[row].append(RANK_SUM_BELOW_MIN)
    return reasons
