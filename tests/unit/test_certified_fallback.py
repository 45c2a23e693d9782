"""The dense fallback of certified IVF scoring: the float64 reference lies inside every interval
whichever path a row takes (probing, the dense pass chosen up front or after the bounds, the
bail-out), and the decision is reported."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

import latentsieve.workers.certified as certified
import latentsieve.workers.cores as cores
from latentsieve.workers.certified import DENSE_SHARE, CertifiedIVF
from latentsieve.workers.density import log_sum_reference

SLACK = 1e-9  # nats, as tests/unit/test_certified.py


def examples(count: int) -> settings:
    """``count`` examples, no deadline (the machine may be busy)."""
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def blobs(rng: np.random.Generator, n: int, d: int, scale: float, offset: float) -> np.ndarray:
    """n float32 rows around n // 20 + 1 centres, every dimension filled, some rows repeated."""
    centres = rng.normal(0.0, scale, (n // 20 + 1, d))
    spread = scale * rng.uniform(0.05, 0.5, (centres.shape[0], d))
    picks = rng.integers(0, centres.shape[0], n)
    rows = centres[picks] + spread[picks] * rng.normal(size=(n, d))
    rows[rng.integers(0, n, n // 10)] = rows[rng.integers(0, n, n // 10)]
    return (rows + offset).astype(np.float32)


def queries_for(rng: np.random.Generator, latents: np.ndarray, scale: float) -> np.ndarray:
    """Stored rows, rows plus noise and far points (float64)."""
    n, d = latents.shape
    near = latents[rng.integers(0, n, 4)].astype(np.float64)
    noisy = latents[rng.integers(0, n, 4)] + rng.normal(0.0, 0.3 * scale, (4, d))
    far = latents.mean(axis=0) + rng.normal(0.0, 3.0 * scale, (2, d))
    return np.concatenate([near, noisy, far])


# Constants that send every eligible row to the dense pass at one of its three points.
ROUTES = {
    # before any bound, with shift 0 (an index small for its lists)
    "static": {"DENSE_THRESHOLD": 0.0},
    # from the centroid bounds
    "planned": {"DENSE_THRESHOLD": 0.0, "BOUND_PAIR_COST": 0.0, "PLAN_SHARE": math.inf,
                "BOUNDS_TRY_SHARE": 0.0},
    # from the certified bounds
    "bounds": {"DENSE_THRESHOLD": 0.0, "BOUND_PAIR_COST": 0.0, "PLAN_SHARE": math.inf,
               "BOUNDS_TRY_SHARE": math.inf},
}


@examples(90)
@given(
    n=st.integers(2, 400),
    d=st.integers(1, 24),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    offset=st.sampled_from([0.0, 3.0, -300.0]),
    nlist=st.integers(1, 12),
    log_sigma=st.floats(-1.5, 2.0),
    max_error=st.sampled_from([0.003, 0.05, 0.5]),
    leave_out=st.booleans(),
    route=st.sampled_from(sorted(ROUTES)),
    split=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_dense_rows_hold_the_reference(
    n: int, d: int, scale: float, offset: float, nlist: int, log_sigma: float,
    max_error: float, leave_out: bool, route: str, split: bool, seed: int,
) -> None:
    """``split``: the dense pass cut into blocks of 16 latents, on two threads
    (workers/cores.py), as it runs on a multi-core machine for large passes."""
    rng = np.random.default_rng(seed)
    latents = blobs(rng, n, d, scale, offset)
    ivf = CertifiedIVF.from_labels(latents, rng.integers(0, nlist, n), nlist)
    queries = queries_for(rng, latents, scale)
    sigma = scale * 10.0**log_sigma
    stored = ivf.reconstruct()
    exclude = None
    if leave_out and n >= 2:
        exclude = np.where(rng.random(queries.shape[0]) < 0.5,
                           rng.integers(0, n, queries.shape[0]), -1)
        queries[exclude >= 0] = stored[exclude[exclude >= 0]]
    with pytest.MonkeyPatch.context() as patch, contextlib.ExitStack() as stack:
        for name, value in ROUTES[route].items():
            patch.setattr(certified, name, value)
        if split:
            patch.setattr(certified, "DENSE_BLOCK", 16)
            patch.setattr(cores, "SPLIT_MIN_PRODUCTS", 0)
            stack.enter_context(threadpool_limits(limits=2, user_api="blas"))
        got = ivf.score(queries, sigma, max_error=max_error, exclude=exclude)
    event(f"{route}: dense rows {bool(got.dense.any())}")  # --hypothesis-show-statistics
    if exclude is None:
        want = log_sum_reference(queries, stored, sigma)
    else:
        want = np.empty(queries.shape[0])
        plain = exclude < 0
        want[plain] = log_sum_reference(queries[plain], stored, sigma)
        if (~plain).any():
            want[~plain] = log_sum_reference(queries[~plain], stored, sigma,
                                                 exclude=exclude[~plain])
    assert np.all(got.low - SLACK <= want), (got.low - want, got.dense)
    assert np.all(want <= got.high + SLACK), (want - got.high, got.dense)
    assert np.all((got.half_width <= max_error) | (got.lists_probed == np.count_nonzero(
        ivf.stats.counts)))
    filled = np.count_nonzero(ivf.stats.counts)
    # A dense row is not exact: its rounding bound must itself meet max_error (the cost model
    # aims at DENSE_SHARE of it from an a-priori estimate; the final interval may exceed that).
    assert np.all(got.half_width[got.dense] <= max_error)
    assert np.all(got.lists_probed[got.dense] == filled)


@examples(60)
@given(
    n=st.integers(1, 300),
    d=st.integers(1, 16),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    offset=st.sampled_from([0.0, -300.0]),
    log_sigma=st.floats(-2.0, 2.0),
    shift_error=st.floats(-150.0, 150.0),
    seed=st.integers(0, 2**31),
)
def test_the_dense_pass_is_certified_for_any_shift(
    n: int, d: int, scale: float, offset: float, log_sigma: float, shift_error: float,
    seed: int,
) -> None:
    # The shift only keeps float32 in range; a wrong one (terms overflowing or all underflowing)
    # may widen the interval to nothing, never make it miss.
    rng = np.random.default_rng(seed)
    latents = blobs(rng, n, d, scale, offset)
    ivf = CertifiedIVF.from_labels(latents, rng.integers(0, 3, n), 3)
    queries = queries_for(rng, latents, scale)
    sigma = scale * 10.0**log_sigma
    stored = ivf.reconstruct()
    log_sum = log_sum_reference(queries, stored, sigma)
    shift = log_sum + shift_error
    low, high = ivf._dense_log_sums(queries, shift, sigma, np.full(queries.shape[0], -1))
    assert np.all(low - SLACK <= log_sum), low - log_sum
    assert np.all(log_sum <= high + SLACK), log_sum - high
    # Inside float32's range the pass is tight: only its rounding bound.
    error = ivf._dense_terms(queries, shift, sigma)[4]
    fine = np.isfinite(error) & (np.abs(shift_error) < 20.0) & (error < 1.0)
    assert np.all(high[fine] - low[fine] <= 2.0 * error[fine] + 1e-9)


def test_the_bail_out_sends_open_rows_to_the_dense_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # No dense row up front or after the bounds, and probing predicted to cost nothing: every
    # row still open after its first round has overspent, and bails out.
    monkeypatch.setattr(certified, "DENSE_THRESHOLD", math.inf)
    monkeypatch.setattr(certified, "PLAN_SHARE", math.inf)
    monkeypatch.setattr(certified, "BAIL_FLOOR", 0.0)
    monkeypatch.setattr(certified, "predicted_probe", lambda lower, *_: (
        np.zeros(lower.shape[0], dtype=np.int64), np.zeros(lower.shape[0])))
    rng = np.random.default_rng(4)
    latents = blobs(rng, 3000, 12, 1.0, 0.0)
    ivf = CertifiedIVF.build(latents, 32, seed=0)
    queries = queries_for(rng, latents, 1.0)
    sigma = 0.5
    got = ivf.score(queries, sigma, max_error=0.01, probe_step=1)
    want = log_sum_reference(queries, ivf.reconstruct(), sigma)
    assert np.all((got.low - SLACK <= want) & (want <= got.high + SLACK))
    assert got.dense.any() and ivf.decisions["bailed"] == int(got.dense.sum())
    assert ivf.decisions["dense"] == 0
    assert np.all(got.half_width <= 0.01)


def test_the_cost_model_picks_dense_where_bounds_cannot_prune() -> None:
    # Overlapping full-dimensional blobs at a broad sigma: every list matters, probing would
    # sum them all; at a narrow sigma around well-separated blobs the bounds prune.
    rng = np.random.default_rng(5)
    d = 16
    broad_set = blobs(rng, 6000, d, 1.0, 0.0)
    ivf = CertifiedIVF.build(broad_set, 64, seed=0)
    queries = queries_for(rng, broad_set, 1.0)
    got = ivf.score(queries, 2.0, max_error=0.01)
    assert got.dense.all()
    assert ivf.decisions["dense"] == queries.shape[0]
    want = log_sum_reference(queries, ivf.reconstruct(), 2.0)
    assert np.all((got.low - SLACK <= want) & (want <= got.high + SLACK))
    assert np.all(got.half_width <= DENSE_SHARE * 0.01)
    # Probing alone still answers, within the bound, summing many lists.
    alone = ivf.score(queries, 2.0, max_error=0.01, dense=False)
    assert not alone.dense.any() and np.all(alone.half_width <= 0.01)
    # max_probe and max_error 0 keep probing's meaning: no dense rows.
    assert not ivf.score(queries, 2.0, max_error=0.0).dense.any()
    assert not ivf.score(queries, 2.0, max_error=0.01, max_probe=4).dense.any()
    centres = rng.normal(0.0, 30.0, (8, d))
    apart = (centres[rng.integers(0, 8, 6000)] + rng.normal(0.0, 0.1, (6000, d)))
    sparse = CertifiedIVF.build(apart.astype(np.float32), 64, seed=0)
    near = sparse.score(apart[:10] + 0.01, 0.05, max_error=0.01)
    assert not near.dense.any()
    assert sparse.decisions["dense"] == 0 and sparse.decisions["bailed"] == 0


def test_a_row_takes_the_same_path_alone_and_in_a_batch() -> None:
    rng = np.random.default_rng(6)
    latents = blobs(rng, 4000, 10, 1.0, 0.0)
    ivf = CertifiedIVF.build(latents, 32, seed=0)
    queries = queries_for(rng, latents, 1.0)
    for sigma in (0.05, 0.5, 3.0):
        batched = ivf.score(queries, sigma, max_error=0.01)
        for row in range(queries.shape[0]):
            alone = ivf.score(queries[row : row + 1], sigma, max_error=0.01)
            assert alone.dense[0] == batched.dense[row]
            np.testing.assert_allclose(alone.half_width[0], batched.half_width[row], rtol=1e-3)
