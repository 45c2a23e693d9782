"""The log-sum of eq. (1) over an IVF partition of the training latents, with a certified
error interval.

Equation (1) of Xu, Le & Samaras (ECCV 2024), in nats, as :mod:`latentsieve.workers.density`
defines it, and the log-sum this index returns (:mod:`latentsieve.workers.log_sums` divides
by N):

    log_density(q) = log( (1/N) * sum_i exp( -||q - z_i||^2 / (2 sigma^2) ) )
    log_sum(q)     = log( sum_i exp( -||q - z_i||^2 / (2 sigma^2) ) )

The N latents are split into L lists. For each list l the build stores its count n_l, the exact
member mean mu_l, the radius r_l = max ||x - mu_l|| and the mean squared spread
m_l = mean ||x - mu_l||^2. With f(t) = exp(-t / (2 sigma^2)), D = ||q - mu_l|| and
S_l(q) = sum_{x in l} f(||q - x||^2), every member's squared distance lies in [a, b] =
[max(0, D - r_l)^2, (D + r_l)^2] and the members' mean squared distance is E = D^2 + m_l, so, f
being convex and decreasing,

    n_l f(E)  <=  S_l(q)  <=  n_l [ (b - E)/(b - a) f(a) + (E - a)/(b - a) f(b) ]  <=  n_l f(a)

(Jensen below, the Edmundson-Madansky chord above, the ball bound last). For the lists that
could matter, the lists' shape tightens the upper bound: the range of q.x along their principal
axes narrows [a, b], and the variance of the members' squared distances gives the two-point
bound (:func:`log_two_point_upper`). A query's lists are probed (summed exactly: one GEMM per
list over the queries probing it, with an a-priori rounding bound) in order of their upper
bound, all open queries at once, until the interval [log S_low, log S_high] is at most
``2 * max_error`` wide or every list is summed. Everything stays in log space, so a tiny sigma
(exponents of -1e8) gives finite, valid bounds.

Rounding: the bounds are evaluated on conservative inputs. D^2 comes from a GEMM on centred
coordinates, with the a-priori error bound (d + 8) u (|q_c| + |mu_c|)^2 (u the float64 unit
roundoff; it also covers the centring); the stored mean differs from the members' true mean by
at most 2 u (|mu| + sqrt(d) n r), which moves E by at most twice that times D; r and m carry a
relative error of (d + n + 8) u. Then [a, b] is widened outward, E is taken at the end of its
range that loosens each bound (E is clipped into [a, b]), and every log bound and the final
interval are widened by REL_SLACK |value| + ABS_SLACK (+ (N + L) u for the log-sum-exp).

Dense fallback: where the bounds cannot prune (a broad sigma, or data that fills every
dimension), probing list by list costs far more than the one GEMM it replaces. A cost model,
per query and before each stage's work (:meth:`CertifiedIVF.score`), sends such queries to a
dense pass: float32 GEMMs over every stored latent, the exact engine's fast path, on an operand
made from the lists on first use; its interval is the proven rounding bound of that pass
(:func:`latentsieve.workers.density.float32_logit_bound` plus the exp and the sums), so it
stays certified. ``CertifiedScores.dense`` and ``CertifiedIVF.decisions`` record the decision.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from latentsieve.index.gemm_operand import GemmOperand, gemm_operand
from latentsieve.index.ivf_lists import IvfLists, ListStats, kmeans_labels
from latentsieve.index.manifest import check_sigma
from latentsieve.workers.cores import run_parts, split_ranges
from latentsieve.workers.density import float32_logit_bound, gamma

log = logging.getLogger(__name__)

UNIT_ROUNDOFF = float(np.finfo(np.float64).eps)  # 2^-52, generous for round-to-nearest
REL_SLACK = 1e-12  # relative outward widening of every log bound (nats)
ABS_SLACK = 1e-12  # absolute outward widening of every log bound (nats)
BOUND_BLOCK = 1 << 18  # (query, list) cells per block of the bound computation
REFINE_SHARE = 1e-6  # lists under this share of a query's lower bound skip the shape stage
PROBE_HEAD = 64  # lists per query ordered up front; the rest only if a query probes past them
GATHER_BLOCK = 1 << 21  # float64 elements of one gathered (members, d) block when probing
EXACT_SHARE = 0.05  # of max_error allowed for the rounding of exactly summed lists
EXACT_FLOOR = 1e-10  # nats: that allowance when max_error is 0
# The dense fallback (see CertifiedIVF.score): one float32 GEMM over every stored latent, as the
# exact engine scores, for the queries whose bounds cannot prune.
DENSE_BLOCK = 4096  # stored rows per GEMM of the dense pass
DENSE_QUERY_BLOCK = 1024  # queries per dense pass
DENSE_SHARE = 0.25  # of max_error: the most a dense row's half-width may be to be taken
DENSE_HEADROOM = 60.0  # nats: the shift puts the largest term any list allows at e^60
DENSE_MAX_GAP = 100.0  # nats: largest upper bound over the total's lower bound, for float32
DENSE_THRESHOLD = 0.9  # probing predicted to cost this share of the dense pass: go dense
EXP32_ERROR = 8.0 * 2.0**-24  # relative error allowed for NumPy's float32 exp (a few ulps)
FLOAT32_TINY = 2.0**-126  # a float32 exp below this may be subnormal or 0: its absolute error
# The cost model, in units of one (row, column) product of the dense pass (a query costs
# N (d + 2) there): a probed list's rows cost PROBE_ROW_FACTOR times a dense row (small GEMMs,
# gathers, the round's bookkeeping) and each probed (query, list) pair PROBE_PAIR_COST more (its
# errors, indexing and Python overhead); the bounds and the planning cost the rest per pair.
# Measured with NumPy on 2 cores at N = 1M, d = 64 (docs/performance.md, under the scale table).
PROBE_ROW_FACTOR = 3.0
PROBE_PAIR_COST = 2.0e5
BOUND_PAIR_COST = 4.5e3  # the radius bounds of one (query, list) pair
SHAPE_PAIR_COST = 3.0e4  # the shape bounds of one refined pair
PLAN_PAIR_COST = 1.6e3  # the planning (centroid bounds, predicted probing) of one pair
PLAN_SHARE = 0.07  # of the dense pass: planning dearer than this is skipped (dense at once)
BOUNDS_TRY_SHARE = 0.1  # of the dense pass: bounds this cheap are worth computing in vain
BAIL_FLOOR = 0.25  # of the dense pass: probing that was predicted cheaper may spend this first
PLAN_BUCKET_NATS = 0.25  # resolution of the predicted probe depth (nats of upper bound)
PLAN_BUCKETS = 160  # lists more than 40 nats under a query's top list share the last bucket
PLAN_MARGIN = 0.9  # of 2 max_error: what the unprobed lists may leave of the width
U32 = 2.0**-24


# --- Pure formulas (NumPy arrays in, arrays out; all broadcast) ---------------------------------


def _slack(x: np.ndarray) -> np.ndarray:
    """REL_SLACK |x| + ABS_SLACK where x is finite, 0 elsewhere (no inf - inf)."""
    return np.where(np.isfinite(x), REL_SLACK * np.abs(np.nan_to_num(x)) + ABS_SLACK, 0.0)


def widen_down(x: np.ndarray) -> np.ndarray:
    """x - (REL_SLACK |x| + ABS_SLACK) where x is finite: a log lower bound pushed past rounding."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x - _slack(x), x)


def widen_up(x: np.ndarray) -> np.ndarray:
    """x + (REL_SLACK |x| + ABS_SLACK) where x is finite: a log upper bound pushed past rounding."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x + _slack(x), x)


def ball_range(distance: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Range of members' squared distances: a = max(0, D - r)^2, b = (D + r)^2."""
    return np.maximum(distance - radius, 0.0) ** 2, (distance + radius) ** 2


def mean_sq_distance(sq_distance: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Members' mean squared distance from q: E = D^2 + m (exact when mu is the members' mean)."""
    return sq_distance + spread


def log_jensen_lower(log_count: np.ndarray, e: np.ndarray, two_s2: float) -> np.ndarray:
    """Jensen's bound: log S_l >= log(n f(E)) = log n - E / (2 sigma^2)."""
    return log_count - e / two_s2


def log_ball_upper(log_count: np.ndarray, a: np.ndarray, two_s2: float) -> np.ndarray:
    """Ball bound: log S_l <= log(n f(a)) = log n - a / (2 sigma^2)."""
    return log_count - a / two_s2


def log_chord_upper(
    log_count: np.ndarray, a: np.ndarray, b: np.ndarray, e: np.ndarray, two_s2: float
) -> np.ndarray:
    """Chord bound: log S_l <= log(n [(b-E)/(b-a) f(a) + (E-a)/(b-a) f(b)]); n f(E) when b = a."""
    a, b, e = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, e)))
    e = np.clip(e, a, b)
    width = b - a
    spread_out = width > 0.0
    safe = np.where(spread_out, width, 1.0)
    weight_a = np.where(spread_out, np.clip((b - e) / safe, 0.0, 1.0), 1.0)
    weight_b = np.where(spread_out, np.clip((e - a) / safe, 0.0, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        chord = np.logaddexp(np.log(weight_a) - a / two_s2, np.log(weight_b) - b / two_s2)
    return np.asarray(log_count + chord, dtype=np.float64)


def log_two_point_upper(
    log_count: np.ndarray, a: np.ndarray, e: np.ndarray, v: np.ndarray, two_s2: float
) -> np.ndarray:
    """Variance bound: log S_l <= log(n [p f(a) + (1-p) f(E + V/(E-a))]), p = V / (V + (E-a)^2).

    The largest mean of a convex f with f''' < 0 over distributions on [a, b] with mean E and
    variance V (V <= (E-a)(b-E)) is the two-point one on {a, E + V/(E-a)}; it grows with V, so
    an upper bound of V gives an upper bound of S_l. n f(E) when E = a (then V = 0).
    """
    a, e, v = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (a, e, v)))
    gap = np.maximum(e - a, 0.0)
    v = np.maximum(v, 0.0)
    spread_out = gap > 0.0
    safe_gap = np.where(spread_out, gap, 1.0)
    denominator = v + safe_gap * safe_gap  # 0 only when V = 0 and (E - a)^2 underflows
    share = np.where(spread_out & (denominator > 0.0), v / np.where(denominator > 0.0,
                                                                    denominator, 1.0), 0.0)
    tail = np.where(spread_out, e + v / safe_gap, e)
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log(share) - a / two_s2, np.log1p(-share) - tail / two_s2)
    return np.asarray(log_count + mixed, dtype=np.float64)


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """log sum_j exp(x_ij) for each row i, shifted by the row maximum; -inf for an all -inf row."""
    top = x.max(axis=1)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.asarray(shift + np.log(np.exp(x - shift[:, None]).sum(axis=1)))


# --- Per-list bounds ----------------------------------------------------------------------------


def _bounds_block(
    q: np.ndarray, stats: ListStats, centre: np.ndarray, two_s2: float, refine_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """log_list_bounds for one block of float64 queries (see there).

    Two stages: the radius bounds (ball, chord, Jensen) for every list, then the shape bounds
    (axes, variance) for the lists whose radius upper bound could still matter to a query,
    more than ``refine_share`` of its lower bound spread over all lists. Both stages are
    certified; the second only makes bounds tighter, so skipping it is always safe.
    """
    dim = q.shape[1]
    counts = stats.counts
    with np.errstate(divide="ignore"):
        log_count = np.log(counts.astype(np.float64))
    q_c = q - centre
    mu_c = stats.means - centre
    q_norm = np.sqrt(np.einsum("ij,ij->i", q_c, q_c))[:, None]
    mu_norm = np.sqrt(np.einsum("ij,ij->i", mu_c, mu_c))[None, :]
    sq = np.maximum(q_norm**2 + mu_norm**2 - 2.0 * (q_c @ mu_c.T), 0.0)
    # Conservative inputs: rounding of the GEMM (and the centring), of the stored mean, of r, m.
    gemm_tol = (dim + 8) * UNIT_ROUNDOFF
    sq_tol = gemm_tol * (q_norm + mu_norm) ** 2 + REL_SLACK * sq
    sq_low, sq_high = np.maximum(sq - sq_tol, 0.0), sq + sq_tol
    d_low, d_high = np.sqrt(sq_low), np.sqrt(sq_high)
    rel = (dim + counts + 8) * UNIT_ROUNDOFF + REL_SLACK
    radius = stats.radii * (1.0 + rel)
    mean_norm = np.sqrt(np.einsum("ij,ij->i", stats.means, stats.means))
    mean_error = 2.0 * UNIT_ROUNDOFF * (mean_norm + math.sqrt(dim) * counts * stats.radii)
    cross = 2.0 * d_high * mean_error
    a = ball_range(d_low, radius)[0] * (1.0 - REL_SLACK)
    b = ball_range(d_high, radius)[1] * (1.0 + REL_SLACK)
    e_low = np.maximum(mean_sq_distance(sq_low, stats.spreads * (1.0 - rel)) - cross, 0.0)
    e_high = mean_sq_distance(sq_high, stats.spreads * (1.0 + rel)) + cross
    lower = log_jensen_lower(log_count, np.clip(e_high, a, b), two_s2)
    upper = np.minimum(
        log_chord_upper(log_count, a, b, e_low, two_s2), log_ball_upper(log_count, a, two_s2)
    )
    empty = counts == 0
    lower = np.where(empty, -np.inf, lower)
    upper = np.where(empty, -np.inf, upper)
    floor = logsumexp_rows(lower) + math.log(refine_share / max(int(np.count_nonzero(counts)), 1))
    pair_q, pair_l = np.nonzero((~empty) & (upper > floor[:, None]))
    if pair_q.size:
        # Dense projections (one GEMM) are cheaper than gathering each pair's axes.
        rank = stats.rank
        proj = (q_c @ stats.axes.reshape(-1, dim).T).reshape(q.shape[0], counts.shape[0], rank)
        proj -= np.einsum("lkd,ld->lk", stats.axes, mu_c)[None]
        skew_dot = q_c @ stats.skews.T - np.einsum("ld,ld->l", mu_c, stats.skews)[None, :]
        skew_norm = np.sqrt(np.einsum("ij,ij->i", stats.skews, stats.skews))
        cells = (pair_q, pair_l)
        upper[cells] = np.minimum(upper[cells], _shape_upper(
            proj[cells], skew_dot[cells], _ShapeStats(*(
                value[pair_l] for value in (stats.axis_vars, stats.rest_vars, stats.extents,
                                            stats.rest_radii, stats.min_sqs, stats.sq_vars,
                                            skew_norm)
            )), log_count[pair_l], two_s2, gemm_tol,
            (sq_low[cells], sq_high[cells], d_high[cells], a[cells], b[cells], e_low[cells],
             e_high[cells]),
            (gemm_tol * (q_norm[pair_q, 0] + mu_norm[0, pair_l]), rel[pair_l], radius[pair_l],
             mean_error[pair_l]),
        ))
    lower = np.where(empty, -np.inf, widen_down(lower))
    upper = np.where(empty, -np.inf, widen_up(upper))
    return lower, upper


class _ShapeStats(NamedTuple):
    """The shape statistics of one list per (query, list) pair (see ListStats)."""

    axis_vars: np.ndarray
    rest_vars: np.ndarray
    extents: np.ndarray
    rest_radii: np.ndarray
    min_sqs: np.ndarray
    sq_vars: np.ndarray
    skew_norms: np.ndarray


def _shape_upper(
    proj: np.ndarray,
    skew_dot: np.ndarray,
    stats: _ShapeStats,
    log_count: np.ndarray,
    two_s2: float,
    gemm_tol: float,
    ranges: tuple[np.ndarray, ...],
    norms: tuple[np.ndarray, ...],
) -> np.ndarray:
    """Upper bounds of log S_l from the lists' shape for P (query, list) pairs: ``proj`` (P, K)
    holds v_k.(q - mean), ``skew_dot`` (P,) skew.(q - mean), the rest (P,) arrays; ``gemm_tol``
    the relative rounding of a length-d dot product, ``norms[0]`` each v_k.(q - mean)'s error.

    The range of q_c.x along the axes tightens [a, b]; the variance of the squared distances
    gives the two-point bound (see _bounds_block for the conservative inputs).
    """
    sq_low, sq_high, d_high, a, b, e_low, e_high = ranges
    proj_tol, rel, radius, mean_error = norms
    rank = proj.shape[1]
    # Members' squared distances |q_c - x|^2 = D^2 + |x|^2 - 2 q_c.x (q_c = q - the list's mean).
    # Range of q_c.x from the axes: sum_k |v_k.q_c| ext_k + |q_c outside| r_out; the squared
    # distances then lie in [D^2 - 2h + min|x|^2, D^2 + 2h + r^2].
    inside = np.einsum("pk,pk->p", proj, proj)
    outside = np.sqrt(np.maximum(sq_high - inside, 0.0) + 2.0 * proj_tol * np.sqrt(sq_high) * rank
                      + rank * proj_tol**2)
    reach = (np.einsum("pk,pk->p", np.abs(proj) + proj_tol[:, None], stats.extents)
             + outside * stats.rest_radii) * (1.0 + rel + gemm_tol) + 2.0 * d_high * mean_error
    a = np.maximum(a, (sq_low - 2.0 * reach + stats.min_sqs * (1.0 - rel)) * (1.0 - REL_SLACK))
    b = np.maximum(np.minimum(b, (sq_high + 2.0 * reach + radius**2) * (1.0 + REL_SLACK)), a)
    upper = np.minimum(
        log_chord_upper(log_count, a, b, e_low, two_s2), log_ball_upper(log_count, a, two_s2)
    )
    # Their variance: Var|x|^2 - 4 q_c.skew + 4 q_c' C q_c, the quadratic form bounded above by
    # the K axes plus the largest remaining variance on the rest of q_c.
    excess = np.maximum(stats.axis_vars - stats.rest_vars[:, None], 0.0)
    quad = np.einsum("pk,pk->p", proj * proj, excess) + stats.rest_vars * sq_high
    top_var = np.maximum(stats.axis_vars.max(axis=1, initial=0.0), stats.rest_vars)
    # (skew.q_c comes from globally centred coordinates: its rounding scales like proj_tol's.)
    var_tol = (rel + gemm_tol) * 8.0 * (stats.sq_vars + 4.0 * d_high * stats.skew_norms
                                        + 4.0 * top_var * sq_high) + 4.0 * rank * top_var * (
        2.0 * d_high * proj_tol + proj_tol**2) + 8.0 * 4.0 * proj_tol * stats.skew_norms
    var_high = (stats.sq_vars - 4.0 * skew_dot + 4.0 * quad) * (1.0 + rel) + var_tol
    # E is known to within rounding: the two-point bound at both ends of its interval.
    two_point = []
    for e in (np.clip(e_low, a, b), np.clip(e_high, a, b)):
        feasible = np.minimum(var_high, (e - a) * (b - e))  # no distribution on [a, b] has more
        two_point.append(log_two_point_upper(log_count, a, e, feasible, two_s2))
    return np.asarray(np.minimum(upper, np.maximum(*two_point)))


def log_list_bounds(
    queries: np.ndarray, stats: ListStats, sigma: float, refine_share: float = REFINE_SHARE
) -> tuple[np.ndarray, np.ndarray]:
    """Certified (log lower, log upper) of S_l(q) for every query and list: two (Q, L) arrays.

    Empty lists get -inf in both. Queries are (Q, d), float32 or float64; computed in float64.
    Lists whose radius bound is under ``refine_share`` of a query's total (spread over the
    lists) keep it; the others get the shape bounds too.
    """
    q = np.asarray(queries, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != stats.means.shape[1]:
        raise ValueError(f"queries must have shape (Q, {stats.means.shape[1]}), got {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError("queries contain NaN or Inf")
    sigma = check_sigma(sigma)
    two_s2 = 2.0 * sigma * sigma
    counts = stats.counts.astype(np.float64)
    centre = (counts @ stats.means) / max(counts.sum(), 1.0)
    nlist = stats.counts.shape[0]
    lower = np.empty((q.shape[0], nlist))
    upper = np.empty((q.shape[0], nlist))
    block = max(1, BOUND_BLOCK // max(nlist, 1))
    for start in range(0, q.shape[0], block):
        stop = start + block
        lower[start:stop], upper[start:stop] = _bounds_block(
            q[start:stop], stats, centre, two_s2, refine_share
        )
    return lower, upper


def predicted_probe(
    lower: np.ndarray, upper: np.ndarray, counts: np.ndarray, max_error: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lists (Q,) and stored rows (Q,) that probing is predicted to sum before each query's
    interval is at most ``2 max_error`` wide, from per-list log bounds (Q, L) and list sizes (L,).

    Probing sums the lists in order of their upper bound; once the lists above some level are
    summed exactly, the width is at most log(1 + R / T) with R the unprobed lists' sum of
    e^upper - e^lower and T the sum of every e^lower (an exact sum is at least its lower
    bound). The levels are buckets of ``PLAN_BUCKET_NATS`` under the query's top upper bound, so
    the prediction errs on the side of more lists, by at most one bucket. A few passes over
    (Q, L): cheap next to the bounds. A prediction, not a certificate: it only steers the work.
    """
    rows, nlist = upper.shape
    if rows == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    top = upper.max(axis=1)
    top = np.where(np.isfinite(top), top, 0.0)[:, None]
    with np.errstate(under="ignore", invalid="ignore"):
        gap = np.maximum(np.exp(upper - top) - np.exp(np.minimum(lower, upper) - top), 0.0)
        depth = (top - upper) / PLAN_BUCKET_NATS
    gap = np.nan_to_num(gap, nan=0.0)
    bucket = np.minimum(np.nan_to_num(depth, nan=PLAN_BUCKETS, posinf=PLAN_BUCKETS),
                        PLAN_BUCKETS - 1).astype(np.int64)
    index = (np.arange(rows)[:, None] * PLAN_BUCKETS + bucket).ravel()
    size = rows * PLAN_BUCKETS
    gaps = np.bincount(index, weights=gap.ravel(), minlength=size).reshape(rows, PLAN_BUCKETS)
    lists = np.bincount(index, minlength=size).reshape(rows, PLAN_BUCKETS)
    members = np.bincount(index, weights=np.broadcast_to(counts, upper.shape).ravel(),
                          minlength=size).reshape(rows, PLAN_BUCKETS)
    left = np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1]  # left[b]: lists in buckets >= b unprobed
    with np.errstate(under="ignore"):
        total = np.exp(logsumexp_rows(lower) - top[:, 0])
    budget = total * math.expm1(2.0 * max_error * PLAN_MARGIN)
    # The first bucket from which every list may stay unprobed; all of them (PLAN_BUCKETS) if none.
    fits = left <= budget[:, None]
    first = np.where(fits.any(axis=1), np.argmax(fits, axis=1), PLAN_BUCKETS)
    above = np.arange(PLAN_BUCKETS)[None, :] < first[:, None]
    probe_lists = np.where(above, lists, 0).sum(axis=1)
    probe_rows = np.where(above, members, 0).sum(axis=1)
    return probe_lists.astype(np.int64), probe_rows.astype(np.float64)


class _GroupedRows:
    """The stored latents of IvfLists in grouped (list) order, float64, read by row slices:
    what gemm_operand reads to make the dense operand (one block at a time)."""

    def __init__(self, lists: IvfLists) -> None:
        self.lists = lists
        self.shape = (lists.n, lists.dim)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.shape[0])
        labels = self.lists.labels_of(np.arange(start, stop))
        return np.asarray(self.lists.origins[labels] + self.lists.offsets[start:stop].astype(
            np.float64))


# --- The index ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertifiedScores:
    """Scores of a batch, float64 (Q,) nats: the exact log-sum of eq. (1) lies in [low, high].

    ``estimate`` = (low + high) / 2, ``half_width`` = (high - low) / 2 bounds its error;
    ``lists_probed`` (int64 (Q,)) counts the lists summed exactly (every non-empty list for a
    dense row); ``dense`` (bool (Q,)) marks the rows the cost model sent to the dense GEMM over
    every stored latent (their interval is that pass's rounding bound alone) instead of probing:
    the fallback's decision, per row, for the record.
    """

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    half_width: np.ndarray
    lists_probed: np.ndarray
    dense: np.ndarray


class _ProbeOrder:
    """Each query's lists by decreasing upper bound: the first ``PROBE_HEAD`` found by a
    partition, the full order only for queries that probe past them (it keeps the head)."""

    def __init__(self, upper: np.ndarray, limit: int) -> None:
        self.upper = upper  # the bounds the order is made from: the caller's own copy
        head = min(max(limit, 1), PROBE_HEAD, upper.shape[1])
        keys = -self.upper
        part = np.argpartition(keys, head - 1, axis=1)[:, :head] if head < upper.shape[1] \
            else np.broadcast_to(np.arange(upper.shape[1]), upper.shape)
        ranked = np.argsort(np.take_along_axis(keys, part, axis=1), axis=1, kind="stable")
        self.order = np.take_along_axis(part, ranked, axis=1)  # (Q, head), then (Q, L)

    def lists(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The lists at ``columns`` (R, C) of the order of queries ``rows`` (R,)."""
        if self.order.shape[1] < self.upper.shape[1] and (columns >= self.order.shape[1]).any():
            self._complete()
        return self.order[rows[:, None], np.minimum(columns, self.order.shape[1] - 1)]

    def _complete(self) -> None:
        """Extend every query's order to all lists, its head first and unchanged."""
        head = self.order.shape[1]
        keys = -self.upper
        np.put_along_axis(keys, self.order, np.inf, axis=1)
        rest = np.argsort(keys, axis=1, kind="stable")[:, : keys.shape[1] - head]
        self.order = np.concatenate([self.order, rest], axis=1)



class CertifiedIVF:
    """The log-sum of eq. (1) over stored IVF lists (:class:`IvfLists`) with a certified
    interval: the exact value over the stored latents (:meth:`IvfLists.reconstruct`) lies in
    [low, high]."""

    def __init__(self, lists: IvfLists) -> None:
        self.lists = lists
        self.n, self.dim, self.nlist = lists.n, lists.dim, lists.nlist
        self.stats = lists.stats
        self.origin_norms = np.sqrt(np.einsum("ij,ij->i", lists.origins, lists.origins))
        self._bias: tuple[float, np.ndarray] | None = None
        self._dense: tuple[GemmOperand, float] | None = None  # made on the first dense row
        # Rows answered since the index was opened, by path: "bounds" (no list summed),
        # "probed", "dense" (predicted by the cost model), "bailed" (probing gave up, then
        # dense). Counted without a lock: a record, not a ledger.
        self.decisions: dict[str, int] = {"bounds": 0, "probed": 0, "dense": 0, "bailed": 0}

    @classmethod
    def build(
        cls,
        latents: np.ndarray,
        nlist: int,
        seed: int = 0,
        train_size: int | None = None,
        storage: str = "float32",
        rank: int | None = None,
    ) -> CertifiedIVF:
        """Lists by k-means (:func:`kmeans_labels`), grouped and stored (:meth:`IvfLists.group`)."""
        labels = kmeans_labels(latents, nlist, seed, train_size)
        return cls(IvfLists.group(latents, labels, nlist, storage=storage, rank=rank))

    @classmethod
    def from_labels(
        cls, latents: np.ndarray, labels: np.ndarray, nlist: int, storage: str = "float32",
        rank: int | None = None,
    ) -> CertifiedIVF:
        """An index over a given partition (``labels`` (N,) ints in [0, nlist))."""
        return cls(IvfLists.group(latents, labels, nlist, storage=storage, rank=rank))

    def reconstruct(self) -> np.ndarray:
        """The stored latents, float64 (N, d), in input order."""
        return self.lists.reconstruct()

    def _exact_log_sums(
        self, q: np.ndarray, pair_q: np.ndarray, pair_l: np.ndarray, two_s2: float,
        tolerance: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Certified (low, high) of log S_l(q) for each (query, list) pair (P,): one GEMM per
        list, over all the queries that probe it.

        Per pair, the cheapest of three evaluations whose a-priori rounding bound (nats) meets
        ``tolerance``: float32 logits and exps, a float64 GEMM, or float64 differences (so a
        query's score does not depend on what it was batched with).
        """
        by_list = np.argsort(pair_l, kind="stable")
        pq, pl = pair_q[by_list], pair_l[by_list]
        labels, starts = np.unique(pl, return_index=True)
        ends = np.append(starts[1:], pl.shape[0])
        inv = 1.0 / two_s2
        q_c = q[pq] - self.lists.origins[pl]
        q_sq = np.einsum("ij,ij->i", q_c, q_c)
        q_norm = np.sqrt(q_sq)
        radius = self.lists.row_radius[pl] * (1.0 + 1e-6)
        count = self.stats.counts[pl]
        u64 = UNIT_ROUNDOFF
        # The GEMM paths score origin + offset unrounded; a stored latent is fl(origin + offset),
        # at most u (|o| + r) away: its squared distance moves by at most 2 (|q_c| + r) that.
        stored_gap = 2.0 * (q_norm + radius) * u64 * (self.origin_norms[pl] + radius) * 1.01 * inv
        # float32: logits c (2 q_c.x - |x|^2) from one GEMM of 2c q_c by the offsets, less c|x|^2:
        # each within u (d + 4) 2c |q_c| r + 3 u c r^2 (casts, GEMM, subtraction); the float32
        # exp and the shifted sum add at most (n + 8) u relative (a term g nats under the top
        # carries weight e^-g and error u g).
        u32 = 2.0**-24
        error32 = (u32 * inv * ((self.dim + 4) * 2.0 * q_norm * radius + 3.0 * radius**2)
                   + (count + 8) * u32 + (self.dim + 4) * u64 * inv * q_sq + stored_gap)
        # float64: |fl(q_c . x) - q_c . x| <= (d + 2) u |q_c| |x| (rounding q_c, then the dot);
        # the squared norms |q_c|^2 and |x|^2 within (d + 4) u of theirs.
        error64 = (((self.dim + 2) * q_norm * radius * 2.0 + (self.dim + 4) * (q_sq + radius**2))
                   * u64 * inv + count * u64 + stored_gap)
        tier = np.where(error32 <= tolerance, 32, np.where(error64 <= tolerance, 64, 0))
        scaled = (q_c * (2.0 * inv)).astype(np.float32)
        bias = self._scaled_row_sq(inv)
        log_sum = np.zeros(pl.shape[0])  # the direct pairs' rows stay unused
        low, high = np.zeros(pl.shape[0]), np.zeros(pl.shape[0])
        stored, row_sq = self.lists.offsets, self.lists.row_sq
        for label, start, end in zip(labels, starts, ends, strict=True):
            rows = slice(self.lists.bounds[label], self.lists.bounds[label + 1])
            pairs = np.arange(start, end)
            fast, exact = pairs[tier[pairs] == 32], pairs[tier[pairs] == 64]
            direct = pairs[tier[pairs] == 0]
            if fast.size:
                logits = scaled[fast] @ stored[rows].astype(np.float32, copy=False).T
                logits -= bias[rows]
                top = logits.max(axis=1)
                logits -= top[:, None]
                np.exp(logits, out=logits)
                log_sum[fast] = top + np.log(logits.sum(axis=1, dtype=np.float64))
            if exact.size:
                dots = q_c[exact] @ stored[rows].astype(np.float64).T
                sq = np.maximum(q_sq[exact, None] + row_sq[None, rows] - 2.0 * dots, 0.0)
                log_sum[exact] = logsumexp_rows(-sq * inv) + inv * q_sq[exact]
            if direct.size:
                low[direct], high[direct] = self._direct_log_sums(
                    q[pq[direct]], int(label), two_s2
                )
        log_sum -= inv * q_sq
        error = np.where(tier == 32, error32, error64)
        out_low, out_high = np.empty_like(low), np.empty_like(high)
        out_low[by_list] = np.where(tier == 0, low, log_sum - error)
        out_high[by_list] = np.where(tier == 0, high, log_sum + error)
        return out_low, out_high

    def _scaled_row_sq(self, inv: float) -> np.ndarray:
        """c |x|^2 per stored row as float32 (N,), kept for the last c = 1 / (2 sigma^2)."""
        cached = self._bias  # one read: another thread may replace it meanwhile
        if cached is None or cached[0] != inv:
            cached = (inv, (self.lists.row_sq * inv).astype(np.float32))
            self._bias = cached
        return cached[1]

    def _direct_log_sums(
        self, q: np.ndarray, label: int, two_s2: float, skip: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of log S_l(q) by float64 differences: each squared distance is within a
        relative (d + 4) u of exact, so the two sums take it at both ends of that range.
        ``skip`` (m,): the member (grouped row) query k leaves out (leave-one-out)."""
        members = self.lists.members(label)
        rel = (self.dim + 4) * UNIT_ROUNDOFF
        low, high = np.empty(q.shape[0]), np.empty(q.shape[0])
        block = max(1, GATHER_BLOCK // max(members.size, 1))
        for start in range(0, q.shape[0], block):
            diff = q[start : start + block, None, :] - members[None]
            sq = np.einsum("qnd,qnd->qn", diff, diff)
            if skip is not None:
                left = skip[start : start + block] - self.lists.bounds[label]
                sq[np.arange(left.shape[0]), left] = np.inf
            low[start : start + block] = logsumexp_rows(-sq * (1.0 + rel) / two_s2)
            high[start : start + block] = logsumexp_rows(-sq * (1.0 - rel) / two_s2)
        return low, high

    def prepare_dense(self) -> None:
        """Make the dense fallback's operand now (otherwise the first dense row makes it):
        a server may call this at load to keep that one-off cost out of a request."""
        self._dense_operand()

    def _dense_operand(self) -> tuple[GemmOperand, float]:
        """The stored latents as the exact engine's float32 operand [z_c, -|z_c|^2/2, 1] in
        grouped order (N, d + 2), and R = max |z_c|: made on the first dense row, then kept (a
        second copy of the latents, as a flat index serves; never for an index that prunes)."""
        cached = self._dense  # one read: another thread may replace it meanwhile
        if cached is None:
            operand = gemm_operand(_GroupedRows(self.lists), DENSE_BLOCK)  # type: ignore[arg-type]
            cached = (operand, float(np.sqrt(operand.sq_norms.max())))
            self._dense = cached
        return cached

    def _dense_terms(
        self, q: np.ndarray, shift: np.ndarray, sigma: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For queries (R, d) whose every term is at most e^shift (R,): q_c (R, d) and |q_c|^2
        (R,) about the dense operand's mean, the float32 shift m (R,) the GEMM subtracts, the
        bound e (R,) of each logit's rounding (nats), and the half-width (R,) the dense pass
        may leave (inf where float32 cannot hold the inputs)."""
        operand, radius = self._dense_operand()
        s2 = sigma * sigma
        q_c = q - operand.mean
        q_sq = np.einsum("ij,ij->i", q_c, q_c)
        with np.errstate(over="ignore", invalid="ignore"):
            m = (shift + q_sq / (2.0 * s2) - DENSE_HEADROOM).astype(np.float32)
            m64 = m.astype(np.float64)
            # float32_logit_bound covers a zero shift column; the shift adds gamma |m| to the
            # GEMM's sum, and m - |q_c|^2 / (2 s2) two float64 roundings.
            term = (float32_logit_bound(np.sqrt(q_sq), radius, self.dim, sigma)
                    + gamma(self.dim + 8, U32) * np.abs(m64)
                    + 4.0 * UNIT_ROUNDOFF * (np.abs(m64) + q_sq / (2.0 * s2)))
            error = term + 2.0 * (EXP32_ERROR + self._dense_sum_error())
        safe = (np.isfinite(m64) & (np.abs(m64) < 1e30) & (1.0 / s2 < 1e30)
                & (np.abs(q_c).max(axis=1, initial=0.0) / s2 < 1e30))
        return q_c, q_sq, m, term, np.where(safe & np.isfinite(error), error, np.inf)

    def _dense_sum_error(self) -> float:
        """Relative rounding of the dense pass's sums: float32 within a block, float64 across."""
        blocks = -(-self.n // DENSE_BLOCK)
        return gamma(min(DENSE_BLOCK, self.n), U32) + gamma(blocks + 1, UNIT_ROUNDOFF)

    def _dense_log_sums(
        self, q: np.ndarray, shift: np.ndarray, sigma: float, skip: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Certified (low, high) of log S(q), the sum over every stored latent, for queries
        (R, d) by float32 GEMMs over the dense operand, the exact engine's fast path.

        ``shift`` (R,): an upper bound of each query's log terms (its largest list upper
        bound); the GEMM subtracts m = shift + |q_c|^2 / (2 s2) - DENSE_HEADROOM, so no term
        passes e^60 and the float32 sums cannot overflow. ``skip`` (R,): the grouped row a query
        leaves out, -1 for none. Each logit is within e (:func:`float32_logit_bound`, plus the
        shift's share of the GEMM's rounding) of exact; each float32 exp within EXP32_ERROR
        relative, or FLOAT32_TINY absolute below the normal range; each block's float32 sum and
        the float64 sum of the blocks within gamma of theirs (any order).
        """
        operand, _ = self._dense_operand()
        s2 = sigma * sigma
        q_c, q_sq, m, term, _ = self._dense_terms(q, shift, sigma)
        m64 = m.astype(np.float64)
        q_aug = np.empty((q.shape[0], self.dim + 2), dtype=np.float32)
        q_aug[:, : self.dim] = q_c / s2
        q_aug[:, self.dim] = 1.0 / s2
        q_aug[:, self.dim + 1] = -m
        sums = np.zeros(q.shape[0])

        def block_sums(block_q: np.ndarray, block_skip: np.ndarray, lo: int, hi: int
                       ) -> np.ndarray:
            """Float64 sum over the DENSE_BLOCK blocks of latents [lo, hi) of their float32
            sums of exps: (B,)."""
            out = np.zeros(block_q.shape[0])
            buffer = np.empty((block_q.shape[0], min(DENSE_BLOCK, hi - lo)), dtype=np.float32)
            for start in range(lo, hi, DENSE_BLOCK):
                logits = buffer[:, : min(DENSE_BLOCK, hi - start)]
                np.matmul(block_q, operand.augmented[start : start + logits.shape[1]].T,
                          out=logits)
                hit = np.flatnonzero((block_skip >= start)
                                     & (block_skip < start + logits.shape[1]))
                logits[hit, block_skip[hit] - start] = -np.inf
                with np.errstate(over="ignore", under="ignore"):
                    np.exp(logits, out=logits)
                with np.errstate(over="ignore"):
                    out += logits.sum(axis=1)
            return out

        for first in range(0, q.shape[0], DENSE_QUERY_BLOCK):
            part = slice(first, first + DENSE_QUERY_BLOCK)
            block_q, block_skip = q_aug[part], skip[part]
            # one range per core, cut at DENSE_BLOCK boundaries: the blocks, and so the error
            # terms of _dense_sum_error, are those of one pass (the float64 sum in any order)
            ranges = split_ranges(self.n, block_q.shape[0] * self.n * (self.dim + 2),
                                  align=DENSE_BLOCK)
            with np.errstate(over="ignore"):
                sums[part] = np.sum(run_parts([
                    functools.partial(block_sums, block_q, block_skip, lo, hi)
                    for lo, hi in ranges
                ]), axis=0)
        summed = self._dense_sum_error()
        tiny = self.n * FLOAT32_TINY
        finite = np.isfinite(sums)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            high = (np.log(sums / (1.0 - summed) + tiny) - math.log1p(-EXP32_ERROR) + term
                    + m64 - q_sq / (2.0 * s2))
            low = (np.log(np.maximum(sums / (1.0 + summed) - tiny, 0.0))
                   - math.log1p(EXP32_ERROR) - term + m64 - q_sq / (2.0 * s2))
        # Overflow (not expected under the shift): nothing is known.
        return np.where(finite, low, -np.inf), np.where(finite, high, np.inf)

    def _interval(self, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of the log-sum (R,) from per-list log bounds (R, L), widened for
        rounding."""
        slack = (self.n + self.nlist) * UNIT_ROUNDOFF
        return (
            widen_down(logsumexp_rows(lower) - slack),
            widen_up(logsumexp_rows(upper) + slack),
        )

    def score(
        self,
        queries: np.ndarray,
        sigma: float,
        max_error: float = 0.01,
        probe_step: int = 8,
        max_probe: int | None = None,
        exclude: np.ndarray | None = None,
        dense: bool = True,
    ) -> CertifiedScores:
        """Log-sums of eq. (1) for (Q, d) queries, each within ``max_error`` nats (half-width) if
        reachable.

        Lists are probed in order of their upper bound, for all open queries at once,
        ``probe_step`` in the first round and twice as many in each next one, until a query's
        half-width is <= ``max_error``, every non-empty list is summed, or ``max_probe`` lists
        are (then the interval is only wider). ``exclude`` (Q,) input rows, -1 for none:
        leave-one-out, that row's list is summed first without it.

        The dense fallback (``dense``, without ``max_probe``, for ``max_error`` > 0): a query
        whose bounds cannot prune is summed by float32 GEMMs over every stored latent, as the
        exact engine scores, when that pass's rounding bound fits in ``DENSE_SHARE *
        max_error`` (:meth:`_dense_terms`). Decided per query from its own numbers, so a score
        does not depend on its batch, at three points, each before the work it saves:

        - from the centroid distances alone (:meth:`_centroid_bounds`, a few passes over
          (Q, L)): when probing is predicted (:func:`predicted_probe`) to cost, bounds
          included, ``DENSE_THRESHOLD`` of the dense pass or more, and the certified bounds
          alone would cost ``BOUNDS_TRY_SHARE`` of it or more (too much to try in vain);
        - from the certified bounds: when the probing they predict costs ``DENSE_THRESHOLD``
          of the dense pass or more;
        - while probing: when a query has spent twice its predicted cost (at least
          ``BAIL_FLOOR`` of the dense pass) and is still open (the bail-out).

        Costs are in dense (row, column) products: PROBE_ROW_FACTOR, PROBE_PAIR_COST,
        BOUND_PAIR_COST, SHAPE_PAIR_COST. ``dense`` in the result marks the rows answered so.
        """
        if not max_error >= 0.0:
            raise ValueError(f"max_error must be >= 0, got {max_error}")
        if probe_step < 1:
            raise ValueError(f"probe_step must be >= 1, got {probe_step}")
        if max_probe is not None and max_probe < 0:
            raise ValueError(f"max_probe must be >= 0, got {max_probe}")
        q = np.asarray(queries, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("queries contain NaN or Inf")
        sigma = check_sigma(sigma)
        out = None
        if exclude is not None:
            out = np.asarray(exclude, dtype=np.int64).reshape(-1)
            if out.shape != (q.shape[0],) or np.any(out >= self.n) or np.any(out < -1):
                raise ValueError(f"exclude must be {q.shape[0]} rows in [-1, {self.n})")
            if np.any(out >= 0) and self.n < 2:
                raise ValueError("leave-one-out needs at least two stored latents")
        plan = _DensePlan(q.shape[0], self.n * (self.dim + 2.0))
        early = np.zeros(q.shape[0], dtype=bool)
        if dense and max_probe is None and max_error > 0.0 and q.shape[0]:
            filled = int(np.count_nonzero(self.stats.counts))
            if (BOUND_PAIR_COST * filled >= DENSE_THRESHOLD * plan.dense_cost
                    or PLAN_PAIR_COST * filled > PLAN_SHARE * plan.dense_cost):
                # Small for its lists: the bounds alone would cost about the dense pass, or
                # planning a share of it. Every term is at most 1 (shift 0); a query far from
                # every latent may underflow to a useless interval, and is then probed.
                rows = np.arange(q.shape[0])
                early[self._dense_eligible(q, rows, np.zeros(q.shape[0]), sigma, max_error,
                                           plan)] = True
            else:
                early[self._plan_early(q, sigma, max_error, plan)] = True
        low, high = np.zeros(q.shape[0]), np.zeros(q.shape[0])
        probed = np.zeros(q.shape[0], dtype=np.int64)
        if early.any():
            rows = np.flatnonzero(early)
            got_low, got_high = self._dense_scores(q[rows], plan.shift[rows], sigma, out, rows)
            ok = got_high - got_low <= 2.0 * max_error
            low[rows[ok]], high[rows[ok]] = got_low[ok], got_high[ok]
            plan.dense[rows[ok]] = True
            probed[rows[ok]] = int(np.count_nonzero(self.stats.counts))
            early[rows[~ok]] = False  # not expected (the check predicted the width): probe them
        rest = np.flatnonzero(~early)
        if rest.size:
            part = self._score_bounds(
                q[rest], sigma, max_error, probe_step, max_probe,
                None if out is None else out[rest], dense,
            )
            low[rest], high[rest], probed[rest] = part.low, part.high, part.lists_probed
            plan.dense[rest] = part.dense
            plan.bailed[rest] = part.bailed
        self._record(probed, plan)
        return CertifiedScores(
            estimate=(low + high) / 2.0,
            low=low,
            high=high,
            half_width=(high - low) / 2.0,
            lists_probed=probed,
            dense=plan.dense,
        )

    def _plan_early(
        self, q: np.ndarray, sigma: float, max_error: float, plan: _DensePlan
    ) -> np.ndarray:
        """The queries to send to the dense pass before any certified bound (see score), with
        their shifts written into ``plan``."""
        lower, upper = self._centroid_bounds(q, sigma)
        lists, members = predicted_probe(lower, upper, self.stats.counts, max_error)
        filled = int(np.count_nonzero(self.stats.counts))
        floor = logsumexp_rows(lower) + math.log(max(0.01 * max_error, EXACT_FLOOR)
                                                 / max(filled, 1))
        refined = np.count_nonzero(upper > floor[:, None], axis=1)
        bounds = BOUND_PAIR_COST * filled + SHAPE_PAIR_COST * refined
        path = bounds + self._probe_cost(lists, members)
        wanted = np.flatnonzero((path >= DENSE_THRESHOLD * plan.dense_cost)
                                & (bounds >= BOUNDS_TRY_SHARE * plan.dense_cost))
        return self._dense_fits(q, lower, upper, wanted, sigma, max_error, plan)

    def _centroid_bounds(self, q: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """Rough (Jensen, ball) log bounds of every list's sum, (Q, L) each, from the
        query-to-mean distances alone: for planning only (no rounding margins, not certified).
        Empty lists get -inf."""
        stats = self.stats
        inv = 1.0 / (2.0 * sigma * sigma)
        with np.errstate(divide="ignore"):
            log_count = np.log(stats.counts.astype(np.float64))
        centre = self.stats.means.mean(axis=0)
        mu_c = stats.means - centre
        mu_sq = np.einsum("ij,ij->i", mu_c, mu_c)
        lower = np.empty((q.shape[0], self.nlist))
        upper = np.empty((q.shape[0], self.nlist))
        block = max(1, BOUND_BLOCK // max(self.nlist, 1))
        for start in range(0, q.shape[0], block):
            q_c = q[start : start + block] - centre
            sq = q_c @ mu_c.T
            sq *= -2.0
            sq += mu_sq
            sq += np.einsum("ij,ij->i", q_c, q_c)[:, None]
            np.maximum(sq, 0.0, out=sq)
            near = np.sqrt(sq)
            near -= stats.radii
            np.maximum(near, 0.0, out=near)
            near *= near
            sq += stats.spreads
            lower[start : start + block] = log_count - inv * sq
            upper[start : start + block] = log_count - inv * near
        empty = stats.counts == 0
        lower[:, empty] = -np.inf
        upper[:, empty] = -np.inf
        return lower, upper

    def _dense_scores(
        self, q: np.ndarray, shift: np.ndarray, sigma: float, out: np.ndarray | None,
        rows: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of the log-sum by the dense pass for queries (R, d) that are ``rows`` of
        the batch whose leave-one-out rows are ``out`` (None: none)."""
        skip = np.full(q.shape[0], -1, dtype=np.int64)
        if out is not None:
            left = np.flatnonzero(out[rows] >= 0)
            skip[left] = self.lists.position[out[rows][left]]
        log_low, log_high = self._dense_log_sums(q, shift, sigma, skip)
        slack = (self.n + self.nlist) * UNIT_ROUNDOFF  # as _interval's
        return widen_down(log_low - slack), widen_up(log_high + slack)

    def _score_bounds(
        self,
        q: np.ndarray,
        sigma: float,
        max_error: float,
        probe_step: int,
        max_probe: int | None,
        out: np.ndarray | None,
        dense: bool,
    ) -> _Probed:
        """:meth:`score` from the certified bounds on: probing, and the dense pass for the
        queries the bounds or the bail-out send there (``dense``)."""
        # Shape bounds only where a list could hold a hundredth of the error budget.
        lower, upper = log_list_bounds(
            q, self.stats, sigma, refine_share=max(0.01 * max_error, EXACT_FLOOR)
        )
        two_s2 = 2.0 * sigma * sigma
        # Share of the error budget for rounding in exact sums (a floor when max_error is 0).
        tolerance = max(EXACT_SHARE * max_error, EXACT_FLOOR)
        filled = int(np.count_nonzero(self.stats.counts))
        limit = filled if max_probe is None else min(max_probe, filled)
        probed = np.zeros(q.shape[0], dtype=np.int64)
        ranking = upper.copy()  # the order's keys: probing overwrites ``upper``
        if out is not None:
            left = np.flatnonzero(out >= 0)
            if left.size:
                grouped = self.lists.position[out[left]]
                labels = self.lists.labels_of(grouped)
                for label in np.unique(labels):  # each row's own list, summed without it
                    mine = left[labels == label]
                    lower[mine, label], upper[mine, label] = self._direct_log_sums(
                        q[mine], int(label), two_s2, skip=grouped[labels == label]
                    )
                ranking[left, labels] = np.inf  # first in the order: already summed
                probed[left] = 1
        probe_order = _ProbeOrder(ranking, limit)
        low, high = self._interval(lower, upper)
        open_ = (high - low > 2.0 * max_error) & (probed < limit)
        plan = _DensePlan(q.shape[0], self.n * (self.dim + 2.0))
        if dense and max_probe is None and max_error > 0.0:
            rows = np.flatnonzero(open_)
            lists, members = predicted_probe(lower[rows], upper[rows], self.stats.counts,
                                             max_error)
            predicted = self._probe_cost(lists, members)
            # The bail-out: twice the prediction (the rounds double), at least a share of dense.
            plan.cap[rows] = np.maximum(2.0 * predicted, BAIL_FLOOR * plan.dense_cost)
            wanted = rows[predicted >= DENSE_THRESHOLD * plan.dense_cost]
            taken = self._dense_fits(q, lower, upper, wanted, sigma, max_error, plan)
            plan.cap[wanted] = np.inf  # asked once
            plan.pending[taken] = True
            open_[taken] = False
        step = probe_step
        while True:
            if not open_.any():
                if not plan.pending.any():
                    break
                rows = np.flatnonzero(plan.pending)
                plan.pending[rows] = False
                got_low, got_high = self._dense_scores(q[rows], plan.shift[rows], sigma, out,
                                                       rows)
                ok = got_high - got_low <= 2.0 * max_error
                done = rows[ok]
                low[done], high[done] = got_low[ok], got_high[ok]
                plan.dense[done] = True
                probed[done] = filled
                failed = rows[~ok]  # not expected (the check predicted the width): probe them
                plan.cap[failed] = np.inf
                open_[failed] = probed[failed] < limit
                continue
            rows = np.flatnonzero(open_)
            columns = probed[rows, None] + np.arange(min(step, limit))
            take = columns < limit
            pair_q = np.broadcast_to(rows[:, None], columns.shape)[take]
            pair_l = probe_order.lists(rows, columns)[take]
            lower[pair_q, pair_l], upper[pair_q, pair_l] = self._exact_log_sums(
                q, pair_q, pair_l, two_s2, tolerance
            )
            probed[rows] += take.sum(axis=1)
            plan.spent += self._probe_cost(
                np.bincount(pair_q, minlength=q.shape[0]),
                np.bincount(pair_q, weights=self.stats.counts[pair_l], minlength=q.shape[0]),
            )
            low[rows], high[rows] = self._interval(lower[rows], upper[rows])
            open_[rows] = (high[rows] - low[rows] > 2.0 * max_error) & (probed[rows] < limit)
            step *= 2
            over = np.flatnonzero(open_ & (plan.spent > plan.cap))
            if over.size:  # probing found it cannot prune: the rest costs less densely
                plan.cap[over] = np.inf  # asked once
                taken = self._dense_fits(q, lower, upper, over, sigma, max_error, plan)
                plan.pending[taken] = True
                plan.bailed[taken] = True
                open_[taken] = False
        return _Probed(low, high, probed, plan.dense, plan.bailed & plan.dense)

    def _probe_cost(self, lists: np.ndarray, members: np.ndarray) -> np.ndarray:
        """Predicted cost of probing ``lists`` (R,) lists of ``members`` (R,) stored rows in
        all, in dense (row, column) products (the dense pass costs N (d + 2) per query)."""
        return np.asarray(PROBE_ROW_FACTOR * (self.dim + 2.0) * members
                          + PROBE_PAIR_COST * lists, dtype=np.float64)

    def _dense_fits(
        self, q: np.ndarray, lower: np.ndarray, upper: np.ndarray, rows: np.ndarray,
        sigma: float, max_error: float, plan: _DensePlan,
    ) -> np.ndarray:
        """The ``rows`` the dense pass can answer (:meth:`_dense_eligible`) given per-list log
        bounds (Q, L): their shift is the largest upper bound, and their terms must lie within
        float32's range (that bound at most DENSE_MAX_GAP over the total's lower bound)."""
        if not rows.size:
            return rows
        shift = upper[rows].max(axis=1)
        fits = np.isfinite(shift) & (shift - logsumexp_rows(lower[rows]) <= DENSE_MAX_GAP)
        return self._dense_eligible(q, rows[fits], shift[fits], sigma, max_error, plan)

    def _dense_eligible(
        self, q: np.ndarray, rows: np.ndarray, shift: np.ndarray, sigma: float,
        max_error: float, plan: _DensePlan,
    ) -> np.ndarray:
        """The ``rows`` whose dense pass, with ``shift`` (R,) (log of a bound of every term),
        has a rounding bound within ``DENSE_SHARE * max_error``; their shifts go into
        ``plan``."""
        if not rows.size:
            return rows
        error = self._dense_terms(q[rows], shift, sigma)[4]
        fits = error <= DENSE_SHARE * max_error
        plan.shift[rows[fits]] = shift[fits]
        return rows[fits]

    def _record(self, probed: np.ndarray, plan: _DensePlan) -> None:
        """Count the batch's rows by path in ``decisions`` (and log the dense ones)."""
        dense = int(plan.dense.sum())
        bailed = int((plan.dense & plan.bailed).sum())
        self.decisions["dense"] += dense - bailed
        self.decisions["bailed"] += bailed
        self.decisions["probed"] += int(np.count_nonzero((probed > 0) & ~plan.dense))
        self.decisions["bounds"] += int(np.count_nonzero((probed == 0) & ~plan.dense))
        if dense:
            log.debug("certified ivf: %d of %d rows dense (%d after probing)", dense,
                      probed.shape[0], bailed)


class _Probed(NamedTuple):
    """What :meth:`CertifiedIVF._score_bounds` found for its queries."""

    low: np.ndarray
    high: np.ndarray
    lists_probed: np.ndarray
    dense: np.ndarray
    bailed: np.ndarray


@dataclass
class _DensePlan:
    """Per-row state of the dense fallback during one :meth:`CertifiedIVF.score` call."""

    dense_cost: float  # one query's dense pass, in (row, column) products
    cap: np.ndarray  # probing cost past which a row is offered to the dense pass
    spent: np.ndarray  # probing cost so far
    shift: np.ndarray  # the dense pass's shift (log of an upper bound of every term)
    pending: np.ndarray  # rows waiting for the dense pass
    dense: np.ndarray  # rows answered by it
    bailed: np.ndarray  # rows sent to it by the bail-out

    def __init__(self, rows: int, dense_cost: float) -> None:
        self.dense_cost = dense_cost
        self.cap = np.full(rows, np.inf)
        self.spent = np.zeros(rows)
        self.shift = np.full(rows, np.nan)
        self.pending = np.zeros(rows, dtype=bool)
        self.dense = np.zeros(rows, dtype=bool)
        self.bailed = np.zeros(rows, dtype=bool)
