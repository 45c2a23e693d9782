"""Accept/reject decisions from scores and a model's policy."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from latentsieve.index.manifest import Policy

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
    return reasons
