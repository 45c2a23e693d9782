"""The decision rules of a policy (workers/policy.py), the rank-sum among them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from latentsieve.index.manifest import PercentileBounds, Policy, RankSum
from latentsieve.workers.policy import decide, rank_sum

unit = st.floats(0.0, 1.0, allow_nan=False)


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(
    arrays(np.float64, n, elements=unit), arrays(np.float64, n, elements=unit))), unit)
def test_rank_sum_rejects_exactly_below_its_threshold(
    pair: tuple[np.ndarray, np.ndarray], threshold: float
) -> None:
    density, psi = pair
    reasons = decide(density, Policy(min_percentile=0.0, rank_sum=RankSum(min_score=threshold)),
                     {"psi": psi})
    expected = (density + 1.0 - psi) / 2.0 < threshold
    assert [bool(r) for r in reasons] == expected.tolist()
    assert all(r in ([], ["rank_sum_below_min"]) for r in reasons)


def test_rank_sum_is_high_for_dense_low_psi_latents_and_joins_other_reasons() -> None:
    np.testing.assert_allclose(rank_sum(np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5])),
                               [1.0, 0.0, 0.5])
    policy = Policy(min_percentile=0.2, psi=PercentileBounds(max_percentile=0.9),
                    rank_sum=RankSum(min_score=0.3))
    assert policy.needed_descriptors() == {"psi"}
    reasons = decide(np.array([0.1, 0.9]), policy, {"psi": np.array([0.95, 0.1])})
    assert reasons == [
        ["percentile_below_min", "psi_percentile_above_max", "rank_sum_below_min"], []
    ]


def test_rank_sum_without_psi_is_an_error_not_an_accept() -> None:
    policy = Policy(rank_sum=RankSum(min_score=0.3))
    with pytest.raises(ValueError, match="psi"):
        decide(np.array([0.5]), policy, None)
    assert Policy().needed_descriptors() == frozenset()
