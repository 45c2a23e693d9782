"""Accept/reject decisions from scores and a model's policy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from index.manifest import Policy

PERCENTILE_BELOW_MIN = "percentile_below_min"


def decide(
    percentiles: np.ndarray,
    policy: Policy,
    descriptor_percentiles: Mapping[str, np.ndarray] | None = None,
) -> list[list[str]]:
    """The reasons each latent is rejected for: (n,) percentiles -> n lists (empty = accept).

    Reasons: ``percentile_below_min``, and ``{name}_percentile_below_min`` /
    ``{name}_percentile_above_max`` for each descriptor bound of the policy.
    """
    below_min = percentiles < policy.min_percentile
    bounded = policy.descriptor_bounds()
    if not bounded:  # the common case, one rule: one pass
        return [[PERCENTILE_BELOW_MIN] if failed else [] for failed in below_min.tolist()]
    reasons: list[list[str]] = [[] for _ in range(percentiles.shape[0])]
    rules: list[tuple[str, np.ndarray]] = [(PERCENTILE_BELOW_MIN, below_min)]
    for name, bounds in bounded.items():
        if descriptor_percentiles is None or name not in descriptor_percentiles:
            raise ValueError(f"the policy bounds {name!r} but it was not computed")
        values = descriptor_percentiles[name]
        if bounds.min_percentile is not None:
            rules.append((f"{name}_percentile_below_min", values < bounds.min_percentile))
        if bounds.max_percentile is not None:
            rules.append((f"{name}_percentile_above_max", values > bounds.max_percentile))
    for reason, failed in rules:
        for row in np.flatnonzero(failed).tolist():
            reasons[row].append(reason)
    return reasons
