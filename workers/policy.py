"""Accept/reject decisions from scores and a model's policy."""

from __future__ import annotations

import numpy as np

from index.manifest import Policy

PERCENTILE_BELOW_MIN = "percentile_below_min"


def decide(percentiles: np.ndarray, policy: Policy) -> list[list[str]]:
    """The reasons each latent is rejected for: (n,) percentiles -> n lists (empty = accept)."""
    low = percentiles < policy.min_percentile
    return [[PERCENTILE_BELOW_MIN] if flag else [] for flag in low.tolist()]
