"""The density engine against a float64 reference of eq. (1)'s log-sum (the engine does not
divide by N: workers/log_sums.py does): every path, every regime."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentsieve.workers import density
from latentsieve.workers.density import (
    DEFAULT_TOLERANCE,
    PRECISION_DOMINANT,
    DensityEngine,
    direct_term_error,
    float32_logit_bound,
    log_sum_certificate,
    log_sum_reference,
)
from latentsieve.workers.scoring import percentile_of

CONTRACT_TOLERANCE = 1e-4  # nats, docs/contract.md §1


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
    got = engine.log_sum(queries, sigma)
    want = log_sum_reference(queries, latents, sigma)
    assert np.all(np.isfinite(got.log_sum))
    np.testing.assert_allclose(got.log_sum, want, rtol=0, atol=CONTRACT_TOLERANCE)


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
    got = engine.log_sum(queries, sigma).log_sum
    want = log_sum_reference(queries, latents, sigma)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=CONTRACT_TOLERANCE)
    # Dominated by the nearest neighbour: log S = -d_min^2 / (2 sigma^2) (+ ties).
    np.testing.assert_allclose(got, -sq.min(1) / (2 * sigma**2), rtol=1e-9)


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
    got = engine.log_sum(queries, sigma)
    want = log_sum_reference(queries, latents, sigma)
    np.testing.assert_allclose(got.log_sum, want, atol=CONTRACT_TOLERANCE, rtol=0)
    assert np.all(got.precision != 32)  # the float32 pass flagged the overflow


def test_float32_path_is_used_where_it_is_accurate_enough() -> None:
    rng = np.random.default_rng(2)
    latents = clustered(rng, 2000, 128, 1.0, 0.0)
    engine = DensityEngine(latents)
    scores = engine.log_sum(latents[:50] + 0.1, sigma=20.0)
    assert np.all(scores.precision == 32)
    tiny = engine.log_sum(latents[:50] + 0.1, sigma=0.01)
    assert np.all(tiny.precision != 32)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("sigma", [0.3, 5.0, 1e-5])
def test_leave_one_out(backend: str, sigma: float) -> None:
    rng = np.random.default_rng(3)
    latents = clustered(rng, 400, 16, 2.0, 1.0)
    latents[10] = latents[11]  # a duplicate: leaving one out must still count its twin
    rows = np.array([0, 10, 11, 399, 200])
    engine = DensityEngine(latents, backend=backend, latent_block=128)  # type: ignore[arg-type]
    got = engine.log_sum(latents[rows], sigma, exclude=rows).log_sum
    want = log_sum_reference(latents[rows], latents, sigma, exclude=rows)
    np.testing.assert_allclose(got, want, atol=CONTRACT_TOLERANCE, rtol=0)
    with_self = engine.log_sum(latents[rows], sigma).log_sum
    assert np.all(got < with_self + 1e-12)  # without itself a point is never denser


def test_identical_query_sums_exactly_n_kernels_of_one() -> None:
    latents = np.zeros((4, 3), dtype=np.float32)
    engine = DensityEngine(latents)
    got = engine.log_sum(np.zeros((1, 3), dtype=np.float32), 1.0).log_sum
    assert got[0] == pytest.approx(math.log(4), abs=1e-12)  # all four kernels are exactly 1
    assert got[0] <= math.log(4)  # the clamp: no kernel exceeds 1


def test_rejects_bad_inputs() -> None:
    engine = DensityEngine(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        engine.log_sum(np.zeros((1, 3)), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        engine.log_sum(np.zeros((1, 2)), 0.0)
    with pytest.raises(ValueError, match="sigma"):
        engine.log_sum(np.zeros((1, 2)), float("nan"))
    for out_of_range in (5e-324, 1e-101, 1e101, float("inf")):
        with pytest.raises(ValueError, match="1e-100"):
            engine.log_sum(np.zeros((1, 2)), out_of_range)
    with pytest.raises(ValueError, match="NaN"):
        engine.log_sum(np.array([[np.nan, 0.0]]), 1.0)
    with pytest.raises(ValueError, match="exclude"):
        engine.log_sum(np.zeros((1, 2)), 1.0, exclude=np.array([5]))


def float32_logits(engine: DensityEngine, queries: np.ndarray, sigma: float) -> np.ndarray:
    """What the dominant-terms path computes for every term, in nats: the float32 GEMM of
    ``[q_c / s2, 1 / s2, 0]`` with the stored operand, plus ``-|q_c|^2 / (2 s2)`` in float64."""
    s2 = sigma * sigma
    q_c = queries.astype(np.float64) - engine.mean
    q_aug = np.zeros((q_c.shape[0], engine.dim + 2), dtype=np.float32)
    q_aug[:, : engine.dim] = q_c / s2
    q_aug[:, engine.dim] = 1.0 / s2
    logits = (q_aug @ np.asarray(engine.augmented).T).astype(np.float64)
    return np.asarray(logits - np.einsum("ij,ij->i", q_c, q_c)[:, None] / (2.0 * s2))


def direct_logits(queries: np.ndarray, latents: np.ndarray, sigma: float) -> np.ndarray:
    """-||q - z||^2 / (2 sigma^2) from float64 differences: (Q, d), (N, d) -> (Q, N)."""
    diff = queries.astype(np.float64)[:, None, :] - latents.astype(np.float64)[None, :, :]
    return np.asarray(-(diff**2).sum(-1) / (2.0 * sigma * sigma))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 120),
    d=st.integers(1, 300),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    offset=st.sampled_from([0.0, 3.0, -200.0, 1e4]),
    log_sigma=st.floats(-3.0, 3.0),
    seed=st.integers(0, 2**31),
)
def test_float32_term_bound_holds_for_every_term(
    n: int, d: int, scale: float, offset: float, log_sigma: float, seed: int
) -> None:
    """The proven per-term bound e of the dominant-terms path, term by term, whatever kernel
    OpenBLAS runs (test_blas_kernels.py repeats this module under two)."""
    rng = np.random.default_rng(seed)
    latents = clustered(rng, n, d, scale, offset)
    queries = np.concatenate([
        latents[rng.integers(0, n, 3)] + rng.normal(0, scale, (3, d)).astype(np.float32),
        clustered(rng, 3, d, scale * 3, offset),
    ])
    sigma = 10.0**log_sigma
    engine = DensityEngine(latents)
    exact = direct_logits(queries, latents, sigma)
    q_norm = np.sqrt(((queries.astype(np.float64) - engine.mean) ** 2).sum(1))
    bound = float32_logit_bound(q_norm, engine.radius, d, sigma)[:, None]
    error = np.abs(float32_logits(engine, queries, sigma) - exact)
    assert np.all(error <= bound + direct_term_error(exact, d, sigma))


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 400),
    spread=st.floats(0.0, 80.0),
    window=st.floats(0.0, 40.0),
    term_error=st.floats(1e-9, 8.0),
    exact_error=st.floats(0.0, 1e-6),
    sign=st.sampled_from(["up", "down", "random"]),
    seed=st.integers(0, 2**31),
)
def test_log_sum_certificate_bounds_any_errors_within_the_term_bounds(
    n: int, spread: float, window: float, term_error: float, exact_error: float, sign: str,
    seed: int,
) -> None:
    """Exact logits L; the kept terms off by at most eps, the rest by at most e, pushed to
    their limits: |log S^ - log S| never exceeds the certificate."""
    rng = np.random.default_rng(seed)
    exact = -spread * rng.random(n)
    kept = exact >= exact.max() - window
    limit = np.where(kept, exact_error, term_error)
    if sign == "up":
        noise = limit
    elif sign == "down":
        noise = -limit
    else:
        noise = limit * rng.uniform(-1.0, 1.0, n)
    shown = exact + noise
    top = shown[kept].max()
    dominant_sum = np.exp(shown[kept] - top).sum()
    rest_sum = np.exp(shown[~kept] - top).sum()
    bound = log_sum_certificate(
        np.array([term_error]), np.array([exact_error]), np.array([rest_sum]),
        np.array([dominant_sum]), n,
    )[0]
    true = math.log(math.fsum(np.exp(exact - top)))
    assert abs(math.log(dominant_sum + rest_sum) - true) <= bound


@pytest.fixture
def dominant_at_any_dim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the dominant-terms path run on small shapes (it starts at DOMINANT_MIN_DIM)."""
    monkeypatch.setattr(density, "DOMINANT_MIN_DIM", 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(2, 300),
    d=st.integers(1, 96),
    q=st.integers(1, 8),
    scale=st.sampled_from([0.01, 1.0, 5.0, 50.0]),
    offset=st.sampled_from([0.0, 3.0, -200.0]),
    log_sigma=st.floats(-2.0, 3.0),
    tolerance=st.sampled_from([1e-4, DEFAULT_TOLERANCE, 1e-7]),
    leave_one_out=st.booleans(),
    block=st.sampled_from([7, 64, 4096]),
    seed=st.integers(0, 2**31),
)
def test_certified_rows_are_within_the_engine_tolerance(
    dominant_at_any_dim: None, n: int, d: int, q: int, scale: float, offset: float,
    log_sigma: float, tolerance: float, leave_one_out: bool, block: int, seed: int,
) -> None:
    """Rows the dominant-terms path certifies (precision 1) lie within the engine's tolerance
    of the float64 reference; every row within the contract's 1e-4 nats."""
    rng = np.random.default_rng(seed)
    latents = clustered(rng, n, d, scale, offset)
    rows = rng.integers(0, n, q)
    near = latents[rows] + rng.normal(0, scale * 0.1, (q, d)).astype(np.float32)
    queries = np.concatenate([near, clustered(rng, q, d, scale * 3, offset)])
    exclude = np.concatenate([rows, rng.integers(0, n, q)]) if leave_one_out else None
    sigma = 10.0**log_sigma
    engine = DensityEngine(latents, latent_block=block, tolerance=tolerance)
    got = engine.log_sum(queries, sigma, exclude=exclude)
    want = log_sum_reference(queries, latents, sigma, exclude=exclude)
    error = np.abs(got.log_sum - want)
    reference_slack = 1e-12 * (1.0 + np.abs(want))  # the reference's own float64 rounding
    certified = got.precision == PRECISION_DOMINANT
    assert np.all(error[certified] <= tolerance + reference_slack[certified])
    assert np.all(error <= CONTRACT_TOLERANCE + reference_slack)


def test_stable_diffusion_shape_is_certified_or_falls_back_to_float64() -> None:
    """d = 4x64x64 = 16,384 unit-variance latents at sigma 20. The proven float32 term bound
    (~0.06 nats) is far above the tolerance and the kernel is flat (every term carries the
    sum), so fresh latents take the float64 path; near-duplicates of a training latent are
    carried by it alone and are certified from float32."""
    rng = np.random.default_rng(7)
    n, d, sigma = 2000, 16_384, 20.0
    latents = rng.standard_normal((n, d), dtype=np.float32)
    fresh = rng.standard_normal((3, d), dtype=np.float32)
    near = latents[[5, 1500]] + 0.5 * rng.standard_normal((2, d), dtype=np.float32)
    queries = np.concatenate([fresh, near])
    engine = DensityEngine(latents)
    q_norm = np.sqrt(((queries.astype(np.float64) - engine.mean) ** 2).sum(1))
    assert np.all(float32_logit_bound(q_norm, engine.radius, d, sigma) > 100 * DEFAULT_TOLERANCE)
    got = engine.log_sum(queries, sigma)
    want = log_sum_reference(queries, latents, sigma, query_block=1)
    assert got.precision.tolist() == [64, 64, 64, PRECISION_DOMINANT, PRECISION_DOMINANT]
    error = np.abs(got.log_sum - want)
    assert np.all(error <= CONTRACT_TOLERANCE)
    assert np.all(error[3:] <= DEFAULT_TOLERANCE)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.0])
def test_dominant_path_when_every_exp_underflows(sigma: float) -> None:
    """At d = 16,384 these sigmas underflow every exp(-d^2 / 2 sigma^2) in float64, nearest
    neighbour included, while the float32 GEMM still ranks the terms (e <= 25 nats):
    certified from the few terms that carry the sum."""
    rng = np.random.default_rng(8)
    latents = rng.standard_normal((300, 16_384), dtype=np.float32)
    queries = latents[[3, 150, 299]] + rng.standard_normal((3, 16_384), dtype=np.float32)
    want = log_sum_reference(queries, latents, sigma)
    assert np.all(want < -745)  # the naive sum is 0 everywhere
    got = DensityEngine(latents).log_sum(queries, sigma)
    assert np.all(got.precision == PRECISION_DOMINANT)
    np.testing.assert_allclose(got.log_sum, want, rtol=1e-12, atol=DEFAULT_TOLERANCE)


@pytest.mark.parametrize("sigma", [1e3, 1e20, 1e50, 1e100])
def test_huge_sigma(sigma: float) -> None:
    """Every kernel is ~1; past sigma ~1e19, 1/s2 underflows in float32 and the float32 GEMM
    returns 0 for every term: the term bound's underflow part still covers it, and the
    engine (its float32 path here) agrees with the reference."""
    rng = np.random.default_rng(9)
    latents = rng.normal(0, 1, (300, 1024)).astype(np.float32)
    queries = rng.normal(0, 1, (4, 1024)).astype(np.float32)
    engine = DensityEngine(latents)
    exact = direct_logits(queries, latents, sigma)
    q_norm = np.sqrt(((queries.astype(np.float64) - engine.mean) ** 2).sum(1))
    bound = float32_logit_bound(q_norm, engine.radius, 1024, sigma)[:, None]
    error = np.abs(float32_logits(engine, queries, sigma) - exact)
    assert np.all(error <= bound + direct_term_error(exact, 1024, sigma))
    got = engine.log_sum(queries, sigma).log_sum
    want = log_sum_reference(queries, latents, sigma)
    np.testing.assert_allclose(got, want, rtol=0, atol=CONTRACT_TOLERANCE)


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


@pytest.mark.parametrize("sigma", [0.5, 20.0])
def test_default_blocks_widen_for_few_queries_and_score_alike(sigma: float) -> None:
    """Without a given block size the float32 blocks widen while a block's logits fit in
    FLOAT32_LOGITS_BYTES (fewer, wider GEMMs for few queries); the scores stay within the
    contract of the reference, and a given latent_block is kept as given."""
    rng = np.random.default_rng(9)
    n = 3 * density.LATENT_BLOCK + 5
    latents = clustered(rng, n, 24, 2.0, 1.0)
    queries = latents[rng.integers(0, n, 6)] + 0.3
    wide, fixed = DensityEngine(latents), DensityEngine(latents, latent_block=density.LATENT_BLOCK)
    assert wide._float32_width(len(queries)) == n
    assert wide._float32_width(1024) == 2 * density.LATENT_BLOCK  # a full query block
    assert wide._float32_width(4096) == density.LATENT_BLOCK
    assert fixed._float32_width(len(queries)) == density.LATENT_BLOCK
    want = log_sum_reference(queries, latents, sigma)
    for engine in (wide, fixed):
        np.testing.assert_allclose(engine.log_sum(queries, sigma).log_sum, want, rtol=0,
                                   atol=CONTRACT_TOLERANCE)
