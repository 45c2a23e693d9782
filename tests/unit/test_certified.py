"""Certified IVF scoring of eq. (1)'s log-sum: the float64 reference always lies inside the
interval."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentsieve.index.ivf_lists import IvfLists, list_stats
from latentsieve.workers.certified import (
    CertifiedIVF,
    log_ball_upper,
    log_chord_upper,
    log_list_bounds,
    log_two_point_upper,
)
from latentsieve.workers.density import log_sum_reference

SLACK = 1e-9  # nats: absolute slack of every comparison with the float64 reference


def examples(count: int) -> settings:
    """Hypothesis settings: ``count`` examples, no deadline (the machine may be busy)."""
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_latents(
    rng: np.random.Generator, n: int, d: int, kind: str, scale: float, offset: float
) -> np.ndarray:
    """n float32 rows: Gaussian blobs or a uniform box, a third of them duplicated rows."""
    if kind == "clustered":
        centres = rng.normal(0.0, scale, (max(1, n // 15), d))
        rows = centres[rng.integers(0, centres.shape[0], n)] + rng.normal(0, 0.1 * scale, (n, d))
    else:
        rows = rng.uniform(-scale, scale, (n, d))
    copies = rng.integers(0, n, n // 3)
    rows[rng.integers(0, n, copies.shape[0])] = rows[copies]
    return (rows + offset).astype(np.float32)


def make_queries(rng: np.random.Generator, latents: np.ndarray, scale: float) -> np.ndarray:
    """Training rows themselves, rows plus small noise, and far points (float64)."""
    n, d = latents.shape
    rows = latents[rng.integers(0, n, 3)].astype(np.float64)
    near = latents[rng.integers(0, n, 3)] + rng.normal(0.0, 0.05 * scale, (3, d))
    far = latents.mean(axis=0) + rng.normal(0.0, 4.0 * scale, (2, d))
    return np.concatenate([rows, near, far])


def make_labels(rng: np.random.Generator, latents: np.ndarray, nlist: int, how: str) -> np.ndarray:
    """Random labels (lists overlap, some empty) or nearest of nlist random rows (compact)."""
    if how == "random":
        return np.asarray(rng.integers(0, nlist, latents.shape[0]))
    pivots = latents[rng.choice(latents.shape[0], nlist, replace=False)].astype(np.float64)
    gaps = ((latents[:, None, :].astype(np.float64) - pivots[None]) ** 2).sum(-1)
    return np.asarray(np.argmin(gaps, axis=1))


def exact_list_logs(
    queries: np.ndarray, latents: np.ndarray, labels: np.ndarray, nlist: int, sigma: float
) -> np.ndarray:
    """log S_l(q) (Q, L) from the float64 reference: the log-sum of eq. (1) over list l."""
    out = np.full((queries.shape[0], nlist), -np.inf)
    for label in np.unique(labels):
        members = latents[labels == label]
        out[:, label] = log_sum_reference(queries, members, sigma)
    return out


@examples(100)
@given(
    n=st.integers(2, 300),
    d=st.integers(1, 8),
    kind=st.sampled_from(["clustered", "uniform"]),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    offset=st.sampled_from([0.0, 3.0, -200.0]),
    list_share=st.floats(0.0, 1.0),
    how=st.sampled_from(["random", "compact", "kmeans"]),
    log_sigma=st.floats(-3.0, 3.0),
    probe_step=st.sampled_from([1, 3, 8]),
    seed=st.integers(0, 2**31),
)
def test_reference_inside_interval_at_every_depth(
    n: int,
    d: int,
    kind: str,
    scale: float,
    offset: float,
    list_share: float,
    how: str,
    log_sigma: float,
    probe_step: int,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    latents = make_latents(rng, n, d, kind, scale, offset)
    nlist = 1 + int(list_share * (n - 1))
    if how == "kmeans":
        ivf = CertifiedIVF.build(latents, nlist, seed=seed % 1000)
    else:
        ivf = CertifiedIVF.from_labels(latents, make_labels(rng, latents, nlist, how), nlist)
    queries = make_queries(rng, latents, scale)
    sigma = scale * 10.0**log_sigma
    want = log_sum_reference(queries, ivf.reconstruct(), sigma)
    filled = np.count_nonzero(ivf.stats.counts)
    depths = np.arange(nlist + 1)
    if nlist > 48:  # every depth costs O(nlist^2) rounds: all shallow and deep ones, some between
        middle = rng.choice(np.arange(17, nlist - 2), 16, replace=False)
        depths = np.concatenate([depths[:17], np.sort(middle), depths[-3:]])
    for depth in depths:
        got = ivf.score(queries, sigma, max_error=0.0, probe_step=probe_step, max_probe=int(depth))
        assert np.all(got.low - SLACK <= want), (depth, got.low - want)
        assert np.all(want <= got.high + SLACK), (depth, want - got.high)
        assert np.all(got.half_width >= 0.0)
        assert np.all((got.low <= got.estimate) & (got.estimate <= got.high))
        assert np.all(got.lists_probed == min(depth, filled))  # max_error 0: probe to the cap
    loose = ivf.score(queries, sigma, max_error=0.01, probe_step=probe_step)
    assert np.all((loose.low - SLACK <= want) & (want <= loose.high + SLACK))
    assert np.all((loose.half_width <= 0.01) | (loose.lists_probed == filled))


@examples(150)
@given(
    n=st.integers(1, 200),
    d=st.integers(1, 8),
    kind=st.sampled_from(["clustered", "uniform"]),
    offset=st.sampled_from([0.0, -200.0]),
    nlist=st.integers(1, 10),
    sigma=st.sampled_from([1e-4, 1e-2, 1.0, 30.0]),
    seed=st.integers(0, 2**31),
)
def test_list_bounds_hold_even_at_tiny_sigma(
    n: int, d: int, kind: str, offset: float, nlist: int, sigma: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    latents = make_latents(rng, n, d, kind, 1.0, offset)
    labels = rng.integers(0, nlist, n)
    queries = make_queries(rng, latents, 1.0)
    lower, upper = log_list_bounds(queries, list_stats(latents, labels, nlist), sigma)
    exact = exact_list_logs(queries, latents, labels, nlist, sigma)
    filled = np.isfinite(exact)
    assert np.all(np.isfinite(lower[:, filled.any(axis=0)]))  # no -inf where S_l > 0
    assert np.array_equal(np.isfinite(upper), filled)  # empty lists: -inf
    assert np.all(lower[filled] - SLACK <= exact[filled]), (lower - exact)[filled].max()
    assert np.all(exact[filled] <= upper[filled] + SLACK), (exact - upper)[filled].max()
    assert np.all(lower[~filled] == -np.inf)


@examples(80)
@given(
    n=st.integers(2, 300),
    d=st.integers(1, 8),
    kind=st.sampled_from(["clustered", "uniform"]),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    offset=st.sampled_from([0.0, -200.0]),
    nlist=st.integers(1, 40),
    log_sigma=st.floats(-1.5, 3.0),
    probe_step=st.sampled_from([1, 8]),
    seed=st.integers(0, 2**31),
)
def test_probing_every_list_is_exact(
    n: int,
    d: int,
    kind: str,
    scale: float,
    offset: float,
    nlist: int,
    log_sigma: float,
    probe_step: int,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    latents = make_latents(rng, n, d, kind, scale, offset)
    ivf = CertifiedIVF.from_labels(latents, rng.integers(0, nlist, n), nlist)  # empty lists
    queries = make_queries(rng, latents, scale)
    sigma = scale * 10.0**log_sigma
    got = ivf.score(queries, sigma, max_error=0.0, probe_step=probe_step)
    want = log_sum_reference(queries, ivf.reconstruct(), sigma)
    np.testing.assert_allclose(got.estimate, want, rtol=0.0, atol=SLACK)
    assert np.all(got.half_width <= SLACK + 1e-11 * np.abs(want))  # only the rounding margin
    assert np.all(got.lists_probed == np.count_nonzero(ivf.stats.counts))


def blobs(rng: np.random.Generator, centres: np.ndarray, count: int) -> np.ndarray:
    """count float32 rows of unit Gaussian blobs around the given centres."""
    picks = rng.integers(0, centres.shape[0], count)
    return (centres[picks] + rng.normal(0.0, 1.0, (count, centres.shape[1]))).astype(np.float32)


def test_clustered_set_meets_max_error_and_stops_early() -> None:
    rng = np.random.default_rng(7)
    d, nlist = 16, 64
    centres = rng.normal(0.0, 6.0, (20, d))
    latents = blobs(rng, centres, 5000)
    queries = blobs(rng, centres, 300)
    ivf = CertifiedIVF.build(latents, nlist, seed=1)
    sq = ((queries[:, None, :].astype(np.float64) - latents[None]) ** 2).sum(-1)
    narrow = float(np.median(np.sqrt(sq.min(axis=1))))  # 1-NN distance
    broad = math.sqrt(d)  # a blob's RMS radius
    probes = {}
    for sigma in (narrow, broad):
        want = log_sum_reference(queries, ivf.reconstruct(), sigma)
        # Probing alone (at 5,000 latents the cost model sends most rows to the dense pass).
        got = ivf.score(queries, sigma, max_error=0.05, dense=False)
        assert not got.dense.any()
        assert np.all(got.half_width <= 0.05)
        assert np.all(np.abs(got.estimate - want) <= got.half_width + SLACK)
        probes[sigma] = got.lists_probed.mean()
        chosen = ivf.score(queries, sigma, max_error=0.05)
        assert np.all(chosen.half_width <= 0.05)
        assert np.all(np.abs(chosen.estimate - want) <= chosen.half_width + SLACK)
    assert probes[narrow] < nlist / 2, probes


@examples(200)
@given(
    a=st.floats(0.0, 1e4),
    width=st.floats(1e-3, 1e4),
    shares=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20),
    count=st.integers(1, 10**6),
    two_s2=st.floats(1e-4, 1e6),
)
def test_chord_never_looser_than_ball(
    a: float, width: float, shares: list[float], count: int, two_s2: float
) -> None:
    # Any members with squared distances t_i in [a, b] and mean E: S <= chord <= ball.
    t = a + np.array(shares) * width
    log_n = np.array(math.log(count))
    chord = float(
        log_chord_upper(log_n, np.array(a), np.array(a + width), np.array(t.mean()), two_s2)
    )
    ball = float(log_ball_upper(log_n, np.array(a), two_s2))
    members = math.log(count) + float(np.logaddexp.reduce(-t / two_s2)) - math.log(len(t))
    assert chord <= ball + 1e-12 * abs(ball) + 1e-15  # a convex combination of f(a) >= f(b)
    assert members <= chord + 1e-9 * max(1.0, abs(chord))


@examples(40)
@given(
    n=st.integers(1, 200),
    d=st.integers(1, 8),
    nlist=st.integers(1, 6),
    sigma=st.sampled_from([1e-2, 0.3, 1.0, 10.0]),
    seed=st.integers(0, 2**31),
)
def test_list_upper_bound_within_ball_bound(
    n: int, d: int, nlist: int, sigma: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    latents = make_latents(rng, n, d, "clustered", 1.0, 0.0)
    labels = rng.integers(0, nlist, n)
    queries = make_queries(rng, latents, 1.0)
    stats = list_stats(latents, labels, nlist)
    _, upper = log_list_bounds(queries, stats, sigma)
    gap = np.sqrt(((queries[:, None, :] - stats.means[None]) ** 2).sum(-1))
    with np.errstate(divide="ignore"):
        ball = np.log(stats.counts) - np.maximum(gap - stats.radii, 0.0) ** 2 / (2 * sigma**2)
    filled = stats.counts > 0
    assert np.all(upper[:, ~filled] == -np.inf)
    upper, ball = upper[:, filled], ball[:, filled]
    assert np.all(upper <= ball + 1e-9 * np.maximum(1.0, np.abs(ball)))


def test_chord_beats_the_ball_bound_by_its_spread() -> None:
    # 999 members at the origin, one at distance 10, a query 200 away: for D >= r the chord puts
    # weight 1/2 + (r^2 - m) / (4 D r) on f(a), so it sits ~log 2 under the ball bound n f(a).
    latents = np.zeros((1000, 2), dtype=np.float32)
    latents[0] = (10.0, 0.0)
    labels = np.zeros(1000, dtype=np.int64)
    stats = list_stats(latents, labels, 1)
    query = np.array([[-200.0, 0.0]])
    _, upper = log_list_bounds(query, stats, 30.0)
    gap = float(np.linalg.norm(query[0] - stats.means[0]))
    ball = math.log(1000) - (gap - float(stats.radii[0])) ** 2 / 1800.0
    exact = float(exact_list_logs(query, latents, labels, 1, 30.0)[0, 0])
    assert exact <= float(upper[0, 0]) < ball - 0.6


@examples(300)
@given(
    a=st.floats(0.0, 1e3),
    width=st.floats(1e-3, 1e3),
    shares=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30),
    extra=st.floats(1.0, 100.0),
    two_s2=st.floats(1e-3, 1e4),
)
def test_two_point_bound_holds_and_grows_with_the_variance(
    a: float, width: float, shares: list[float], extra: float, two_s2: float
) -> None:
    # Members' squared distances t_i in [a, b], mean E, variance V: S <= two-point(V) <= two-
    # point(V') for any V' >= V up to the feasible (E-a)(b-E), which is the chord bound.
    t = a + np.array(shares) * width
    e, v = float(t.mean()), float(t.var())
    log_n = np.array(math.log(len(t)))
    members = float(np.logaddexp.reduce(-t / two_s2))
    exact_v = float(log_two_point_upper(log_n, np.array(a), np.array(e), np.array(v), two_s2))
    # V' in [V, feasible]: the feasible bound is computed with cancellation and can round
    # below a V that sits at it (every t at an end), so V itself is the floor.
    feasible = (e - a) * (a + width - e)
    more_v = float(log_two_point_upper(
        log_n, np.array(a), np.array(e), np.array(max(v, min(v * extra, feasible))), two_s2
    ))
    chord = float(log_chord_upper(log_n, np.array(a), np.array(a + width), np.array(e), two_s2))
    tol = 1e-9 * max(1.0, abs(members))
    assert members <= exact_v + tol
    assert exact_v <= more_v + tol
    assert more_v <= chord + tol


@examples(60)
@given(
    n=st.integers(2, 400),
    d=st.integers(9, 48),
    intrinsic=st.integers(1, 6),
    rank=st.integers(0, 6),
    nlist=st.integers(1, 8),
    sigma=st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3]),
    offset=st.sampled_from([0.0, -100.0]),
    seed=st.integers(0, 2**31),
)
def test_shape_bounds_hold_for_flat_lists_in_high_dimensions(
    n: int, d: int, intrinsic: int, rank: int, nlist: int, sigma: float, offset: float,
    seed: int,
) -> None:
    # Lists on low-dimensional subspaces (where the axes, extents and variance bounds bite),
    # any number of kept axes, queries near and far: every list's exact sum inside its bounds.
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (nlist, d))
    bases = rng.normal(size=(nlist, d, intrinsic))
    labels = rng.integers(0, nlist, n)
    latents = (centres[labels] + np.einsum("ndk,nk->nd", bases[labels],
                                           rng.normal(size=(n, intrinsic)))
               + 0.01 * rng.normal(size=(n, d)) + offset).astype(np.float32)
    queries = make_queries(rng, latents, 1.0)
    stats = list_stats(latents, labels, nlist, rank=rank)
    lower, upper = log_list_bounds(queries, stats, sigma)
    exact = exact_list_logs(queries, latents, labels, nlist, sigma)
    filled = np.isfinite(exact)
    assert np.all(lower[filled] - SLACK <= exact[filled]), (lower - exact)[filled].max()
    assert np.all(exact[filled] <= upper[filled] + SLACK), (exact - upper)[filled].max()


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_storage_rounds_offsets_only_and_is_certified_over_what_it_stores(storage: str) -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(0.0, 6.0, (10, 12))
    latents = blobs(rng, centres, 3000) + np.float32(50.0)
    ivf = CertifiedIVF.build(latents, 16, seed=0, storage=storage)
    stored = ivf.reconstruct()
    # Offsets from each list's float64 mean are rounded: the error scales with the list radius,
    # not with the latents' magnitude (50 here).
    unit = {"float32": 2.0**-24, "float16": 2.0**-11}[storage]
    assert np.abs(stored - latents).max() <= 2 * unit * float(ivf.stats.radii.max())
    assert ivf.lists.offsets.dtype == np.dtype(storage)
    queries = blobs(rng, centres, 50) + np.float32(50.0)
    sigma = 1.5
    got = ivf.score(queries, sigma, max_error=0.01)
    want = log_sum_reference(queries, stored, sigma)
    assert np.all((got.low - SLACK <= want) & (want <= got.high + SLACK))
    assert np.all(got.half_width <= 0.01)
    # Against the float32 input, the float16 store moves scores by a measured amount (docs).
    moved = np.abs(log_sum_reference(queries, latents, sigma) - want).max()
    assert moved <= (1e-4 if storage == "float32" else 0.05), moved


def test_lists_round_trip_through_files_memory_mapped(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    latents = blobs(rng, rng.normal(0.0, 5.0, (8, 10)), 2000)
    built = CertifiedIVF.build(latents, 16, seed=0)
    built.lists.save(tmp_path)
    loaded = IvfLists.load(tmp_path)
    assert isinstance(loaded.offsets, np.memmap) and not loaded.offsets.flags.writeable
    np.testing.assert_array_equal(loaded.reconstruct(), built.reconstruct())
    rows = np.array([0, 1999, 7, 7])
    np.testing.assert_array_equal(loaded.rows(rows), built.reconstruct()[rows].astype(np.float32))
    queries = blobs(rng, rng.normal(0.0, 5.0, (8, 10)), 20)
    first = built.score(queries, 2.0, max_error=0.01)
    again = CertifiedIVF(loaded).score(queries, 2.0, max_error=0.01)
    np.testing.assert_array_equal(first.estimate, again.estimate)
    np.testing.assert_array_equal(first.half_width, again.half_width)


def test_damaged_list_files_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    CertifiedIVF.build(blobs(rng, rng.normal(0.0, 5.0, (4, 6)), 500), 8).lists.save(tmp_path)
    with np.load(tmp_path / "ivf_lists.npz") as arrays:
        parts = {name: arrays[name] for name in arrays.files}
    parts["bounds"] = parts["bounds"][::-1].copy()
    np.savez(tmp_path / "ivf_lists.npz", **parts)
    with pytest.raises(ValueError, match="boundaries"):
        IvfLists.load(tmp_path)


def test_far_from_the_origin_the_interval_holds_without_slack() -> None:
    # Latents near 1e5 in a tiny cluster at a tiny sigma, every list summed (max_error 0): the
    # interval holds with no test slack at all. (The bound's term for fl(origin + offset)
    # against the unrounded sum could not be made to matter here: a float32 offset of a float64
    # difference is a multiple of the origin's last place, so the sum is exact but across a
    # power of two.)
    rng = np.random.default_rng(11)
    latents = 1e5 + rng.normal(0.0, 1e-5, (400, 6))
    ivf = CertifiedIVF.build(latents, 4, seed=0)
    queries = latents[:20] + rng.normal(0.0, 5e-6, (20, 6))
    for sigma in (5e-6, 2e-5, 1e-4):
        got = ivf.score(queries, sigma, max_error=0.0)
        want = log_sum_reference(queries, ivf.reconstruct(), sigma)
        assert np.all((got.low <= want) & (want <= got.high)), (got.low - want, want - got.high)


def test_a_score_does_not_depend_on_its_batch() -> None:
    # The rounding path is chosen per (query, list): a far query batched with near ones does not
    # move them to another path, so their bounds stay what they were alone (a batch-wide choice
    # moved them by orders of magnitude, float32's ~1e-5 nats to float64's ~1e-12). What the
    # GEMM itself rounds may depend on the batch's shape with some BLAS kernels (OpenBLAS's
    # Haswell, Zen and Prescott kernels moved an estimate by 1e-8 nats here): that part is
    # guaranteed only within the bound, and both answers hold the float64 reference.
    rng = np.random.default_rng(12)
    centres = rng.normal(0.0, 5.0, (6, 8))
    latents = blobs(rng, centres, 3000)
    ivf = CertifiedIVF.build(latents, 16, seed=0)
    near = blobs(rng, centres, 3).astype(np.float64)
    far = near[:1] + 300.0
    for sigma in (0.5, 3.0):
        alone = ivf.score(near, sigma, max_error=0.01)
        batched = ivf.score(np.concatenate([far, near]), sigma, max_error=0.01)
        np.testing.assert_allclose(batched.half_width[1:], alone.half_width, rtol=1e-6)
        assert np.all(np.abs(batched.estimate[1:] - alone.estimate)
                      <= batched.half_width[1:] + alone.half_width)
        want = log_sum_reference(near, ivf.reconstruct(), sigma)
        for got in (alone, batched):
            rows = slice(got.low.size - near.shape[0], None)
            assert np.all((got.low[rows] <= want) & (want <= got.high[rows]))


def test_float16_offsets_out_of_range_are_refused() -> None:
    rng = np.random.default_rng(13)
    latents = rng.normal(0.0, 1e6, (200, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="beyond float16's range"):
        CertifiedIVF.build(latents, 2, seed=0, storage="float16")
