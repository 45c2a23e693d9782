"""The density engine against a float64 reference of eq. (1): every path, every regime."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentsieve.workers.density import DensityEngine, log_density_reference
from latentsieve.workers.scoring import percentile_of

CONTRACT_TOLERANCE = 1e-4  # nats, CONTRACT §1


def clustered(rng: np.random.Generator, n: int, d: int, scale: float, offset: float) -> np.ndarray:
    centres = rng.normal(0.0, scale, (max(1, n // 10), d))
    rows = centres[rng.integers(0, centres.shape[0], n)] + rng.normal(0.0, 1.0, (n, d))
    return (rows + offset).astype(np.float32)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    n=st.integers(2, 300),
    d=st.integers(1, 96),
    q=st.integers(1, 12),
    scale=st.sampled_from([0.01, 1.0, 5.0, 50.0]),
    offset=st.sampled_from([0.0, 3.0, -200.0]),
    log_sigma=st.floats(-4.0, 3.0),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    backend=st.sampled_from(["numpy", "torch"]),
    block=st.sampled_from([7, 64, 4096]),
    seed=st.integers(0, 2**31),
)
def test_matches_float64_reference(
    n: int,
    d: int,
    q: int,
    scale: float,
    offset: float,
    log_sigma: float,
    dtype: type,
    backend: str,
    block: int,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    latents = clustered(rng, n, d, scale, offset)
    near = latents[rng.integers(0, n, q)] + rng.normal(0, scale, (q, d)).astype(np.float32)
    queries = np.concatenate([near, clustered(rng, q, d, scale * 3, offset)]).astype(dtype)
    sigma = 10.0**log_sigma
    engine = DensityEngine(latents, backend=backend, latent_block=block)  # type: ignore[arg-type]
    got = engine.log_density(queries, sigma)
    want = log_density_reference(queries, latents, sigma)
    assert np.all(np.isfinite(got.log_density))
    np.testing.assert_allclose(got.log_density, want, rtol=0, atol=CONTRACT_TOLERANCE)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("sigma", [1e-3, 1e-6, 1e-9, 1e-100])
def test_total_underflow_stays_finite_and_exact(backend: str, sigma: float) -> None:
    """Every exp(-d^2 / 2 sigma^2) underflows in float64 here; the score must not be -inf."""
    rng = np.random.default_rng(1)
    latents = rng.normal(0, 1, (500, 64)).astype(np.float32)
    queries = rng.normal(0, 1, (20, 64)).astype(np.float32)
    sq = ((queries[:, None, :].astype(np.float64) - latents[None].astype(np.float64)) ** 2).sum(-1)
    assert np.all(np.exp(-sq.min(1) / (2 * sigma**2)) == 0.0)  # the naive sum is 0 everywhere
    engine = DensityEngine(latents, backend=backend)  # type: ignore[arg-type]
    got = engine.log_density(queries, sigma).log_density
    want = log_density_reference(queries, latents, sigma)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=CONTRACT_TOLERANCE)
    # Dominated by the nearest neighbour: log p = -d_min^2 / (2 sigma^2) - log N (+ ties).
    np.testing.assert_allclose(got, -sq.min(1) / (2 * sigma**2) - math.log(500), rtol=1e-9)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("sigma", [0.5, 2.0, 0.05])
def test_a_much_closer_latent_in_a_later_block_is_rescaled_not_overflowed(
    backend: str, sigma: float
) -> None:
    """The shift comes from the first block; a later block 100s of nats higher must not
    overflow (float32 overflows past 88 nats, float64 past 709)."""
    rng = np.random.default_rng(4)
    far = rng.normal(30.0, 1.0, (64, 4))
    near = rng.normal(0.0, 0.1, (64, 4))
    latents = np.concatenate([far, near]).astype(np.float32)
    queries = near[:5].astype(np.float32) + 0.01
    engine = DensityEngine(latents, backend=backend, latent_block=64)  # type: ignore[arg-type]
    got = engine.log_density(queries, sigma)
    want = log_density_reference(queries, latents, sigma)
    np.testing.assert_allclose(got.log_density, want, atol=CONTRACT_TOLERANCE, rtol=0)
    assert np.all(got.precision != 32)  # the float32 pass flagged the overflow


def test_float32_path_is_used_where_it_is_accurate_enough() -> None:
    rng = np.random.default_rng(2)
    latents = clustered(rng, 2000, 128, 1.0, 0.0)
    engine = DensityEngine(latents)
    scores = engine.log_density(latents[:50] + 0.1, sigma=20.0)
    assert np.all(scores.precision == 32)
    tiny = engine.log_density(latents[:50] + 0.1, sigma=0.01)
    assert np.all(tiny.precision != 32)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("sigma", [0.3, 5.0, 1e-5])
def test_leave_one_out(backend: str, sigma: float) -> None:
    rng = np.random.default_rng(3)
    latents = clustered(rng, 400, 16, 2.0, 1.0)
    latents[10] = latents[11]  # a duplicate: leaving one out must still count its twin
    rows = np.array([0, 10, 11, 399, 200])
    engine = DensityEngine(latents, backend=backend, latent_block=128)  # type: ignore[arg-type]
    got = engine.log_density(latents[rows], sigma, exclude=rows).log_density
    want = log_density_reference(latents[rows], latents, sigma, exclude=rows)
    np.testing.assert_allclose(got, want, atol=CONTRACT_TOLERANCE, rtol=0)
    with_self = engine.log_density(latents[rows], sigma).log_density
    assert np.all(got < with_self + 1e-12)  # without itself a point is never denser


def test_identical_query_scores_at_most_zero_and_exactly_log_one_over_n() -> None:
    latents = np.zeros((4, 3), dtype=np.float32)
    engine = DensityEngine(latents)
    got = engine.log_density(np.zeros((1, 3), dtype=np.float32), 1.0).log_density
    assert got[0] == pytest.approx(0.0, abs=1e-12)  # all four kernels are exactly 1


def test_rejects_bad_inputs() -> None:
    engine = DensityEngine(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        engine.log_density(np.zeros((1, 3)), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        engine.log_density(np.zeros((1, 2)), 0.0)
    with pytest.raises(ValueError, match="sigma"):
        engine.log_density(np.zeros((1, 2)), float("nan"))
    for out_of_range in (5e-324, 1e-101, 1e101, float("inf")):
        with pytest.raises(ValueError, match="1e-100"):
            engine.log_density(np.zeros((1, 2)), out_of_range)
    with pytest.raises(ValueError, match="NaN"):
        engine.log_density(np.array([[np.nan, 0.0]]), 1.0)
    with pytest.raises(ValueError, match="exclude"):
        engine.log_density(np.zeros((1, 2)), 1.0, exclude=np.array([5]))


@given(
    scores=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50),
    reference=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50),
)
def test_percentile_is_monotone_and_in_unit_interval(
    scores: list[float], reference: list[float]
) -> None:
    ref = np.sort(np.asarray(reference))
    values = np.sort(np.asarray(scores))
    pct = percentile_of(values, ref)
    assert np.all((pct >= 0) & (pct <= 1))
    assert np.all(np.diff(pct) >= 0)
    expected = np.array([(ref <= v).mean() for v in values])
    np.testing.assert_array_equal(pct, expected)
