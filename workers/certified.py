"""Eq. (1) over an IVF partition of the training latents, with a certified error interval.

Equation (1) of Xu, Le & Samaras (ECCV 2024), in nats, as :mod:`latentsieve.workers.density`
defines it:

    log_density(q) = log( (1/N) * sum_i exp( -||q - z_i||^2 / (2 sigma^2) ) )

The N latents are split into L lists. For each list l the build stores its count n_l, the exact
member mean mu_l, the radius r_l = max ||x - mu_l|| and the mean squared spread
m_l = mean ||x - mu_l||^2. With f(t) = exp(-t / (2 sigma^2)), D = ||q - mu_l|| and
S_l(q) = sum_{x in l} f(||q - x||^2), every member's squared distance lies in [a, b] =
[max(0, D - r_l)^2, (D + r_l)^2] and the members' mean squared distance is E = D^2 + m_l, so, f
being convex and decreasing,

    n_l f(E)  <=  S_l(q)  <=  n_l [ (b - E)/(b - a) f(a) + (E - a)/(b - a) f(b) ]  <=  n_l f(a)

(Jensen below, the Edmundson-Madansky chord above, the ball bound last). A query's lists are
probed (summed exactly, float64 differences) in order of their upper bound, a few per round and
all open queries at once, until the interval [log S_low, log S_high] - log N is at most
``2 * max_error`` wide or every list is summed. Everything stays in log space, so a tiny sigma
(exponents of -1e8) gives finite, valid bounds.

Rounding: the bounds are evaluated on conservative inputs. D^2 comes from a GEMM on centred
coordinates, with the a-priori error bound (d + 8) u (|q_c| + |mu_c|)^2 (u the float64 unit
roundoff; it also covers the centring); the stored mean differs from the members' true mean by
at most 2 u (|mu| + sqrt(d) n r), which moves E by at most twice that times D; r and m carry a
relative error of (d + n + 8) u. Then [a, b] is widened outward, E is taken at the end of its
range that loosens each bound (E is clipped into [a, b]), and every log bound and the final
interval are widened by REL_SLACK |value| + ABS_SLACK (+ (N + L) u for the log-sum-exp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from latentsieve.index.manifest import check_sigma

UNIT_ROUNDOFF = float(np.finfo(np.float64).eps)  # 2^-52, generous for round-to-nearest
REL_SLACK = 1e-12  # relative outward widening of every log bound (nats)
ABS_SLACK = 1e-12  # absolute outward widening of every log bound (nats)
BOUND_BLOCK = 1 << 18  # (query, list) cells per block of the bound computation
GATHER_BLOCK = 1 << 21  # float64 elements of one gathered (members, d) block when probing


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


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """log sum_j exp(x_ij) for each row i, shifted by the row maximum; -inf for an all -inf row."""
    top = x.max(axis=1)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.asarray(shift + np.log(np.exp(x - shift[:, None]).sum(axis=1)))


# --- Per-list statistics ------------------------------------------------------------------------


@dataclass(frozen=True)
class ListStats:
    """Per-list statistics of a partition, float64, one entry per list (``means`` is (L, d)).

    ``means`` are the exact member means (not k-means centroids), ``radii`` the largest member
    distance from the mean, ``spreads`` the mean squared member distance from it. Empty lists
    have count 0 and zeros elsewhere.
    """

    counts: np.ndarray
    means: np.ndarray
    radii: np.ndarray
    spreads: np.ndarray


def _offsets(counts: np.ndarray) -> np.ndarray:
    """Start of each list in the grouped array, plus the total: (L + 1,) int64."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _grouped_stats(grouped: np.ndarray, counts: np.ndarray) -> ListStats:
    """ListStats of latents already grouped by list (list l is rows offsets[l]:offsets[l+1])."""
    x = np.asarray(grouped, dtype=np.float64)
    nlist, dim = counts.shape[0], x.shape[1]
    full = np.flatnonzero(counts)
    starts = _offsets(counts)[full]
    sizes = counts[full].astype(np.float64)[:, None]
    rows_list = np.repeat(np.arange(nlist), counts)
    means = np.zeros((nlist, dim))
    means[full] = np.add.reduceat(x, starts, axis=0) / sizes
    # One correction pass: the mean of the residuals pulls the mean to within rounding of exact.
    means[full] += np.add.reduceat(x - means[rows_list], starts, axis=0) / sizes
    residual = x - means[rows_list]
    sq = np.einsum("ij,ij->i", residual, residual)
    radii = np.zeros(nlist)
    spreads = np.zeros(nlist)
    radii[full] = np.sqrt(np.maximum.reduceat(sq, starts))
    spreads[full] = np.add.reduceat(sq, starts) / sizes[:, 0]
    return ListStats(counts.astype(np.int64), means, radii, spreads)


def _check_partition(latents: np.ndarray, labels: np.ndarray, nlist: int) -> np.ndarray:
    """Validated labels as int64 (N,) for (N, d) finite latents and nlist lists."""
    if latents.ndim != 2 or latents.shape[0] < 1 or latents.shape[1] < 1:
        raise ValueError(f"latents must have shape (N, d) with N, d >= 1, got {latents.shape}")
    if not np.all(np.isfinite(latents)):
        raise ValueError("latents contain NaN or Inf")
    if nlist < 1:
        raise ValueError(f"nlist must be >= 1, got {nlist}")
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != latents.shape[0] or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError("labels must be N integers")
    lab = lab.astype(np.int64)
    if lab.min() < 0 or lab.max() >= nlist:
        raise ValueError(f"labels must lie in [0, {nlist})")
    return lab


def list_stats(latents: np.ndarray, labels: np.ndarray, nlist: int) -> ListStats:
    """Count, exact mean, radius and mean squared spread of each of ``nlist`` lists.

    ``latents`` (N, d), ``labels`` (N,) ints in [0, nlist); lists may be empty.
    """
    x = np.asarray(latents)
    lab = _check_partition(x, labels, nlist)
    order = np.argsort(lab, kind="stable")
    return _grouped_stats(x[order], np.bincount(lab, minlength=nlist))


# --- Per-list bounds ----------------------------------------------------------------------------


def _bounds_block(
    q: np.ndarray, stats: ListStats, centre: np.ndarray, two_s2: float
) -> tuple[np.ndarray, np.ndarray]:
    """log_list_bounds for one block of float64 queries (see there)."""
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
    sq_tol = (dim + 8) * UNIT_ROUNDOFF * (q_norm + mu_norm) ** 2 + REL_SLACK * sq
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
    lower = np.where(empty, -np.inf, widen_down(lower))
    upper = np.where(empty, -np.inf, widen_up(upper))
    return lower, upper


def log_list_bounds(
    queries: np.ndarray, stats: ListStats, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Certified (log lower, log upper) of S_l(q) for every query and list: two (Q, L) arrays.

    Empty lists get -inf in both. Queries are (Q, d), float32 or float64; computed in float64.
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
        lower[start:stop], upper[start:stop] = _bounds_block(q[start:stop], stats, centre, two_s2)
    return lower, upper


# --- The index ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertifiedScores:
    """Scores of a batch, float64 (Q,) nats: the exact eq. (1) lies in [low, high].

    ``estimate`` = (low + high) / 2, ``half_width`` = (high - low) / 2 bounds its error;
    ``lists_probed`` (int64 (Q,)) counts the lists summed exactly.
    """

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    half_width: np.ndarray
    lists_probed: np.ndarray


class CertifiedIVF:
    """Training latents grouped by IVF list, scored by eq. (1) with a certified interval."""

    def __init__(self, latents: np.ndarray, labels: np.ndarray, nlist: int) -> None:
        """Group (N, d) ``latents`` by ``labels`` (N,) ints in [0, nlist) and keep list stats.

        The grouped copy keeps float32 rows as float32 (every computation is float64).
        """
        x = np.asarray(latents)
        lab = _check_partition(x, labels, nlist)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        self.order = np.argsort(lab, kind="stable")  # grouped row k is latents[order[k]]
        self.grouped = np.ascontiguousarray(x[self.order])
        counts = np.bincount(lab, minlength=nlist)
        self.offsets = _offsets(counts)
        self.stats = _grouped_stats(self.grouped, counts)
        self.n, self.dim, self.nlist = int(x.shape[0]), int(x.shape[1]), int(nlist)

    @classmethod
    def build(
        cls, latents: np.ndarray, nlist: int, seed: int = 0, train_size: int | None = None
    ) -> CertifiedIVF:
        """k-means (faiss.Kmeans) on a sample of ``train_size`` rows (default min(N, 256 L)),
        then every row goes to its nearest centroid."""
        import faiss

        x = np.asarray(latents)
        n = x.shape[0]
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must lie in [1, N={n}], got {nlist}")
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        size = min(n, train_size if train_size is not None else 256 * nlist)
        if size < nlist:
            raise ValueError(f"train_size must be >= nlist ({nlist}), got {size}")
        rng = np.random.default_rng(seed)
        sample = x32 if size == n else x32[np.sort(rng.choice(n, size, replace=False))]
        kmeans = faiss.Kmeans(
            x.shape[1], nlist, niter=20, seed=seed, verbose=False, min_points_per_centroid=1
        )
        kmeans.train(sample)
        _, labels = kmeans.index.search(x32, 1)
        return cls(x, labels[:, 0].astype(np.int64), nlist)

    def _exact_log_sums(
        self, q: np.ndarray, pair_q: np.ndarray, pair_l: np.ndarray, sigma: float
    ) -> np.ndarray:
        """log S_l(q) summed exactly (float64 differences) for each (query, list) pair (P,)."""
        counts = self.stats.counts[pair_l]
        ends = np.cumsum(counts)
        budget = max(1, GATHER_BLOCK // self.dim)
        out = np.empty(pair_q.shape[0])
        start = 0
        while start < pair_q.shape[0]:
            base = ends[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, base + budget, side="right")))
            sizes = counts[start:stop]
            seg = _offsets(sizes)[:-1]
            rows = np.repeat(self.offsets[pair_l[start:stop]] - seg, sizes)
            rows += np.arange(rows.shape[0])
            diff = q[np.repeat(pair_q[start:stop], sizes)] - self.grouped[rows]
            logits = -np.einsum("ij,ij->i", diff, diff) / (2.0 * sigma * sigma)
            top = np.maximum.reduceat(logits, seg)
            total = np.add.reduceat(np.exp(logits - np.repeat(top, sizes)), seg)
            out[start:stop] = top + np.log(total)
            start = stop
        return out

    def _interval(self, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of eq. (1) (R,) from per-list log bounds (R, L), widened for rounding."""
        shift = math.log(self.n)
        slack = (self.n + self.nlist) * UNIT_ROUNDOFF
        return (
            widen_down(logsumexp_rows(lower) - shift - slack),
            widen_up(logsumexp_rows(upper) - shift + slack),
        )

    def score(
        self,
        queries: np.ndarray,
        sigma: float,
        max_error: float = 0.01,
        probe_step: int = 8,
        max_probe: int | None = None,
    ) -> CertifiedScores:
        """Eq. (1) for (Q, d) queries, each within ``max_error`` nats (half-width) if reachable.

        Lists are probed ``probe_step`` at a time in order of their upper bound, for all open
        queries at once, until a query's half-width is <= ``max_error``, every non-empty list
        is summed, or ``max_probe`` lists are (then the interval is only wider).
        """
        if not max_error >= 0.0:
            raise ValueError(f"max_error must be >= 0, got {max_error}")
        if probe_step < 1:
            raise ValueError(f"probe_step must be >= 1, got {probe_step}")
        if max_probe is not None and max_probe < 0:
            raise ValueError(f"max_probe must be >= 0, got {max_probe}")
        q = np.asarray(queries, dtype=np.float64)
        lower, upper = log_list_bounds(q, self.stats, sigma)
        order = np.argsort(-upper, axis=1, kind="stable")  # empty lists (-inf) last
        filled = int(np.count_nonzero(self.stats.counts))
        limit = filled if max_probe is None else min(max_probe, filled)
        probed = np.zeros(q.shape[0], dtype=np.int64)
        low, high = self._interval(lower, upper)
        open_ = (high - low > 2.0 * max_error) & (probed < limit)
        step = np.arange(probe_step)
        while open_.any():
            rows = np.flatnonzero(open_)
            columns = probed[rows, None] + step
            take = columns < limit
            pair_q = np.broadcast_to(rows[:, None], columns.shape)[take]
            pair_l = order[rows[:, None], np.minimum(columns, self.nlist - 1)][take]
            exact = self._exact_log_sums(q, pair_q, pair_l, sigma)
            lower[pair_q, pair_l] = exact
            upper[pair_q, pair_l] = exact
            probed[rows] += take.sum(axis=1)
            low[rows], high[rows] = self._interval(lower[rows], upper[rows])
            open_[rows] = (high[rows] - low[rows] > 2.0 * max_error) & (probed[rows] < limit)
        return CertifiedScores(
            estimate=(low + high) / 2.0,
            low=low,
            high=high,
            half_width=(high - low) / 2.0,
            lists_probed=probed,
        )
