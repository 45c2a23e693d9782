"""Exact Gaussian-kernel log-sums of latents among training latents.

Equation (1) of Xu, Le & Samaras, "Assessing Sample Quality via the Latent Space of Generative
Models" (ECCV 2024), in log space and without a Gaussian normalising constant, is

    log_density(q) = log( (1/N) * sum_i exp( -||q - z_i||^2 / (2 sigma^2) ) )      [nats]

An engine here returns its sum over the training latents it holds (a shard's, or every one):

    log_sum(q) = log( sum_i exp( -||q - z_i||^2 / (2 sigma^2) ) )                  [nats]

and :mod:`latentsieve.workers.log_sums` alone divides by N (docs/contract.md §4).

The fast path is one GEMM per block of training latents. With centred latents ``z_c`` and queries
``q_c`` (centring limits cancellation) each block computes the *augmented* product

    [q_c / s2, 1 / s2, -m] . [z_c, -||z_c||^2 / 2, 1]  =  (q_c.z_c - ||z_c||^2 / 2) / s2 - m

(``s2 = sigma^2``, ``m`` a per-query shift), so the bias and the shift ride inside the matrix
multiply and the only elementwise passes left are ``exp`` and a row sum. The row constant
``-||q_c||^2 / (2 s2)`` is added once after the log-sum-exp, which equals
``-||q - z_i||^2 / (2 s2)`` summed in log space; clamping the result at log N nats is the
log-space form of clamping distances at 0 (every kernel term is <= 1).

Precision is chosen per query from an a-priori rounding bound (see :func:`rounding_bound`):
float32 when the bound is under the tolerance. Otherwise, where few terms carry the sum, a float32
GEMM picks them and they are recomputed from direct float64 differences, with a *proven* bound on
what the float32 rest can add (:func:`float32_logit_bound`, :func:`log_sum_certificate`); else
float64, and an exact re-computation of the dominant terms by direct differences when even
float64 cannot meet it (tiny ``sigma``, where every ``exp`` underflows). The float32 and
float64 passes split the latents into one range per core (:mod:`latentsieve.workers.cores`).
The streaming log-sum-exp keeps memory at one ``query_block x latent_block`` buffer per range
for any ``N`` (float32 blocks of few queries widen within ``FLOAT32_LOGITS_BYTES``, shared by
the ranges); the float64 GEMM centres the latents tile by tile into reused buffers of
``FLOAT64_TILE_BYTES`` in all.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from latentsieve.index.gemm_operand import GemmOperand, gemm_operand
from latentsieve.index.manifest import check_sigma
from latentsieve.workers.cores import run_parts, split_ranges

log = logging.getLogger(__name__)

UNIT_ROUNDOFF_F32 = 2.0**-24
UNIT_ROUNDOFF_F64 = 2.0**-53
# Safety factor of the rounding model (see rounding_bound), calibrated on measured errors.
ROUNDING_SAFETY = 8.0
# Default accuracy target of the fast path (the contract promises 1e-4 nats).
DEFAULT_TOLERANCE = 2.5e-5
# Terms more than this many nats below the largest one are dropped by the exact path.
EXACT_WINDOW_NATS = 60.0
# Largest trusted sum of shifted exps, by dtype size: past it the float32/64 sum may overflow.
_SUM_LIMIT = {4: 1e37, 8: 1e300}
# Latents per GEMM block, and the float32 logits of one block when the engine is given no block
# size: the block widens (in multiples of LATENT_BLOCK, up to N) while the block's logits
# (query rows x block, float32) fit in FLOAT32_LOGITS_BYTES. Each multi-threaded BLAS call
# starts and synchronises its threads, which costs milliseconds when other work shares the
# cores, so a call of few queries runs a few wide GEMMs, not N / LATENT_BLOCK narrow ones. W1
# (60,000 x 512) on a 2-core CPU at load 3.5-5, against NumPy q @ Z.T of the same queries: 500
# queries (4 GEMMs, was 15) 0.83-0.92x -> 0.60-0.74x, 128 queries (1) 3.1x -> 1.2x; 64 MiB was
# slower again (the exp pass leaves the cache); no change measured on an idle machine.
LATENT_BLOCK = 4096
FLOAT32_LOGITS_BYTES = 32 * 2**20
# Bytes of the float64 tile the latents are centred into before the float64 GEMM (cache-sized:
# a latent block of 4096 x 16,384 in float64 would be half a gigabyte per call).
FLOAT64_TILE_BYTES = 32 * 2**20
# Dominant-terms path: tried from this dimension up (below it its elementwise passes cost as
# much as the float64 GEMM they replace: measured 0.55x at d = 512 on a 2-core CPU),
# where the proven float32 term bound is at most this many nats; given up for a query once
# more than this fraction of N (at least the minimum) must be recomputed (a direct difference
# costs ~130 GEMM terms: at the limit the recomputation costs ~1/4 of the float32 pass), and
# predicted before the full pass from every latent's logit estimated on
# 1/DOMINANT_PROBE_SHARE of the coordinates (chunks of DOMINANT_PROBE_CHUNK, spread out).
DOMINANT_MIN_DIM = 1024
DOMINANT_MAX_TERM_ERROR = 32.0
DOMINANT_FRACTION = 1.0 / 512.0
DOMINANT_MIN_TERMS = 64
DOMINANT_PROBE_SHARE = 64
DOMINANT_PROBE_CHUNK = 16
# float32 values past this are not trusted to stay finite through the GEMM.
_F32_SAFE_MAGNITUDE = 1e30
# Rows of recomputed terms per direct-differences chunk: chunk elements (float64).
_DIRECT_CHUNK_ELEMENTS = 2**21

# Paths of DensityScores.precision.
PRECISION_FLOAT32 = 32
PRECISION_FLOAT64 = 64
PRECISION_EXACT = 0
PRECISION_DOMINANT = 1


class Float64Budget:
    """Bytes this process lets its exact engines hold as float64 copies of their centred GEMM
    operands, N x (d + 2) x 8 each (``--float64-operand-bytes``, set by ``serve`` and ``worker``;
    0, the default: none).

    An engine whose query needs the float64 path (fresh Stable-Diffusion-shaped latents, say)
    reserves its copy here the first time, builds it once (seconds at N = 20,000, d = 16,384)
    and multiplies by it from then on, instead of centring its latents into a float64 tile per
    block and call: the same numbers, 1.8x faster on W2 (docs/performance.md). An engine that
    does not fit keeps the tiles. A copy's bytes come back when its engine is freed (a reload).
    """

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` if they fit under the limit; whether they did."""
        with self._lock:
            if self.used + nbytes > self.limit:
                return False
            self.used += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


FLOAT64_OPERANDS = Float64Budget()


Backend = Literal["auto", "numpy", "torch"]
FloatArray = np.ndarray


def log_sum_reference(
    queries: np.ndarray,
    latents: np.ndarray,
    sigma: float,
    exclude: np.ndarray | None = None,
    query_block: int = 64,
) -> np.ndarray:
    """The log-sum of eq. (1) by direct float64 differences: (Q, d), (N, d) -> (Q,) nats; the
    slow ground truth of every engine here.

    ``exclude[k]`` (optional, (Q,) ints) drops training latent ``exclude[k]`` from query k's
    sum (leave-one-out).
    """
    q = np.asarray(queries, dtype=np.float64)
    z = np.asarray(latents, dtype=np.float64)
    out = np.empty(q.shape[0], dtype=np.float64)
    for start in range(0, q.shape[0], query_block):
        block = q[start : start + query_block]
        sq = ((block[:, None, :] - z[None, :, :]) ** 2).sum(-1)
        logits = -sq / (2.0 * sigma * sigma)
        if exclude is not None:
            rows = np.arange(block.shape[0])
            logits[rows, exclude[start : start + query_block]] = -np.inf
        top = logits.max(axis=1)
        out[start : start + query_block] = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return out


def log_density_reference(
    queries: np.ndarray,
    latents: np.ndarray,
    sigma: float,
    exclude: np.ndarray | None = None,
    query_block: int = 64,
) -> np.ndarray:
    """Eq. (1) by direct float64 differences: (Q, d), (N, d) -> (Q,) nats; the slow ground truth
    of a merged score. With ``exclude`` (as :func:`log_sum_reference`'s) the mean is over
    N - 1."""
    n = np.asarray(latents).shape[0] - (0 if exclude is None else 1)
    return log_sum_reference(queries, latents, sigma, exclude, query_block) - math.log(n)


def rounding_bound(
    query_norm: np.ndarray, radius: float, dim: int, sigma: float, unit_roundoff: float
) -> np.ndarray:
    """Rounding-error model of the GEMM form of eq. (1), in nats: (Q,) -> (Q,).

    ``E = c * u * (|q_c| R + R^2 + |q_c|^2) / sigma^2``: ``u`` times the magnitudes the GEMM and
    the final sum add, the logits ``(q_c.z_c - |z_c|^2/2) / sigma^2`` (``R`` bounds the centred
    training norms) and the row constant ``|q_c|^2 / (2 sigma^2)``. ``c`` = ``ROUNDING_SAFETY``
    is calibrated: over d in [8, 2048] the observed float32 error stayed under 0.37 E
    (docs/scoring.md). ``dim`` is kept for the record; the model does not grow with it.
    """
    del dim
    scale = query_norm * radius + radius * radius + query_norm * query_norm
    return np.asarray(ROUNDING_SAFETY * unit_roundoff * scale / (sigma * sigma), dtype=np.float64)


def gamma(n: float, unit_roundoff: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: a sum of n products computed in *any* order
    (blocked, threaded, with or without FMA) errs by at most ``gamma_n * sum |x_k y_k|``."""
    return n * unit_roundoff / (1.0 - n * unit_roundoff)


def float32_logit_bound(
    query_norm: np.ndarray, radius: float, dim: int, sigma: float
) -> np.ndarray:
    """Proven bound e (nats) on every term of the dominant-terms path: (Q,) -> (Q,).

    That path takes the float32 GEMM value ``l^_j = fl32([q_c/s2, 1/s2] . [z_c, -|z_c|^2/2])``
    and adds ``c = -|q_c|^2 / (2 s2)`` in float64; the claim is ``|l^_j + c - L_j| <= e`` with
    ``L_j = -||q - z_j||^2 / (2 sigma^2)`` exactly, for every j and any summation order.

    Derivation (u = 2^-24, IEEE arithmetic with gradual underflow; ``x_k`` the exact products
    ``(q - mean)_k (z - mean)_k / sigma^2`` and ``-|z - mean|^2 / (2 sigma^2)``, whatever float64
    ``mean`` the operand was centred on; ``|q_c|`` and ``R`` the float64 norms):

    1. Inputs. ``q_c / s2`` went through four roundings (``q - mean``, ``sigma * sigma``, the
       division, the float32 cast), ``z_c`` through two (``z - mean``, the cast); the norm
       column through the float64 norm (``gamma64_{d+3}``, under u for d < 2^28) and the cast,
       ``1 / s2`` through three. Each GEMM product is then ``x_k (1 + theta_6)``, |theta_n| <=
       gamma_n, plus underflow terms.
    2. The GEMM sums ``d + 1`` products (the zero shift column adds exactly 0) in some order
       (blocked, threaded, FMA or not): ``theta_{d+1}`` more, so
       ``|l^_j - l_j| <= gamma_{d+7} sum_k |x_k|``; by Cauchy-Schwarz
       ``sum_k |x_k| <= |q - mean| |z - mean| / sigma^2 + |z - mean|^2 / (2 sigma^2)``, which
       is ``(|q_c| R + R^2 / 2) / s2`` up to the float64 roundings of the norms (one more
       gamma: ``gamma_{d+8}``).
    3. Underflow: each rounding adds at most 2^-150 absolute, times the other factor where it
       rounds an input: under ``2^-149 (sqrt(d) (R + |q_c| / s2) + R^2 + 1 / s2 + d + 2)``.
    4. Float64: ``c``, the differences to the running maximum and the rescaling round values
       under ``(|q_c| + R)^2 / s2`` fewer than d + 8 times: ``gamma64_{d+8} (|q_c| + R)^2 / s2``.

    At d = 16,384, sigma = 20 and unit variance, e = 0.06 nats (measured errors there: 5e-7):
    the float32 GEMM alone cannot be certified at 1e-4 nats, so the path recomputes the terms
    that carry the sum.
    """
    s2 = sigma * sigma
    q = np.asarray(query_norm, dtype=np.float64)
    magnitude = (q * radius + 0.5 * radius * radius) / s2
    underflow = 2.0**-149 * (
        math.sqrt(dim) * (radius + q / s2) + radius * radius + 1.0 / s2 + dim + 2.0
    )
    float64 = gamma(dim + 8, UNIT_ROUNDOFF_F64) * (q + radius) ** 2 / s2
    return np.asarray(
        gamma(dim + 8, UNIT_ROUNDOFF_F32) * magnitude + float64 + underflow, dtype=np.float64
    )


def dominant_window(term_error: np.ndarray, count: int, tolerance: float) -> np.ndarray:
    """Nats below the largest float32 logit within which terms are recomputed: (Q,) -> (Q,).

    Terms further down (set R) are each at most ``e^-W`` of the largest, whose exact value is
    within ``e`` of its float32 one, so ``S_R / S <= count e^(2e - W)``; their errors can move
    the sum by at most ``(e^e - 1) S_R / S`` (see :func:`log_sum_certificate`). This W makes
    that at most ``tolerance / 2``, leaving the other half to the recomputed terms.
    """
    e = np.asarray(term_error, dtype=np.float64)
    window = math.log(count) + np.log(np.expm1(e)) + 2.0 * e + math.log(2.0 / tolerance)
    return np.maximum(window, 0.0)


def log_sum_certificate(
    term_error: np.ndarray,
    exact_error: np.ndarray,
    rest_sum: np.ndarray,
    dominant_sum: np.ndarray,
    count: int,
) -> np.ndarray:
    """Proven bound (nats) on ``|log S^ - log S|`` of the dominant-terms path: (Q,) -> (Q,).

    ``S = sum_j exp(L_j)`` exactly; ``S^ = S^_D + S^_R`` where the dominant terms D are
    recomputed with ``|L~_j - L_j| <= exact_error`` (``eps``) and the rest R keep float32
    values with ``|L^_j - L_j| <= term_error`` (``e``, :func:`float32_logit_bound`);
    ``dominant_sum`` = ``S^_D`` and ``rest_sum`` >= ``S^_R``, in the same units.

    Each term's relative error is at most ``e^e - 1`` (R) or ``e^eps - 1`` (D), so
    ``|S^ - S| <= (e^e - 1) S_R + (e^eps - 1) S_D``. With ``S_R <= e^e S^_R`` and
    ``S >= S_D >= e^-eps S^_D``: ``|S^ - S| / S <= delta = (e^e - 1) e^(e + eps) S^_R / S^_D
    + (e^eps - 1)``, plus ``gamma64_{count+32}`` for the float64 exps and sums. Then
    ``S^ / S`` lies in ``[1 - delta, 1 + delta]`` and ``|log S^ - log S| <= -log(1 - delta)``
    (infinite when delta >= 1).
    """
    e = np.asarray(term_error, dtype=np.float64)
    eps = np.asarray(exact_error, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.asarray(rest_sum, dtype=np.float64) / np.asarray(dominant_sum, np.float64)
        delta = np.expm1(e) * np.exp(e + eps) * ratio + np.expm1(eps)
        delta = delta + gamma(count + 32, UNIT_ROUNDOFF_F64)
        bound = -np.log1p(-np.minimum(delta, 1.0))
    return np.asarray(np.where(np.isfinite(delta) & (delta < 1.0), bound, np.inf))


def direct_term_error(terms: np.ndarray, dim: int, sigma: float) -> np.ndarray:
    """Bound (nats) on the float64 rounding of ``-||q - z||^2 / (2 sigma^2)`` summed from
    direct differences: (P,) -> (P,). Each difference, square and the final division round
    once and the sum of d non-negative squares adds ``gamma_{d-1}``: a relative
    ``gamma_{d+5}`` of the exact value, so ``gamma_{2d+16}`` of the computed one, plus
    underflowed squares (``2^-1075`` each)."""
    return np.asarray(
        gamma(2 * dim + 16, UNIT_ROUNDOFF_F64) * np.abs(terms)
        + dim * 2.0**-1074 / (sigma * sigma),
        dtype=np.float64,
    )


def _mask_excluded(logits: np.ndarray, exclude: np.ndarray, start: int) -> None:
    """Set logits[k, exclude[k] - start] = -inf where that latent lies in this block."""
    hit = np.flatnonzero((exclude >= start) & (exclude < start + logits.shape[1]))
    logits[hit, exclude[hit] - start] = -np.inf


@dataclass(frozen=True)
class DensityScores:
    """Scores of one batch: the log-sums (Q,) in nats of eq. (1) over the engine's training
    latents (module docstring; not divided by N) and the path that computed each row; a
    certified approximate scorer adds each row's bound (nats: the exact log-sum lies within
    ``log_sum +- error_bound``), None from exact engines."""

    log_sum: np.ndarray
    # (Q,) uint8: 32 = float32 GEMM, 64 = float64 GEMM, 0 = exact terms, 1 = float32 GEMM with
    # the dominant terms recomputed exactly, certified within the engine's tolerance (proven)
    precision: np.ndarray
    error_bound: np.ndarray | None = None


class LatentRows(Protocol):
    """Training latents by row: an (N, d) array, or rows a certified index reconstructs on
    demand (:class:`latentsieve.index.ivf_lists.StoredRows`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any, /) -> Any: ...


class DensityScorer(Protocol):
    """What calibration and the scorer need of a density engine (exact or approximate)."""

    @property
    def latents(self) -> LatentRows: ...  # (N, d) training latents in the index's space

    def log_sum(
        self,
        queries: np.ndarray,
        sigma: float,
        exclude: np.ndarray | None = None,
        max_error: float | None = None,
    ) -> DensityScores: ...


class DensityEngine:
    """Streaming exact log-sums of eq. (1) over a fixed set of training latents.

    ``latents`` is an (N, d) float32 array (a memory map is fine: it is read block by block).
    The engine multiplies by a centred, augmented float32 operand (N, d + 2) and keeps the
    float64 squared norms (N,) (:mod:`latentsieve.index.gemm_operand`): given as ``operand``
    (a stored one, memory-mapped), or made here, a second copy of the latents. The CPU GEMM
    goes through NumPy's BLAS (OpenBLAS), which on AMD CPUs runs markedly faster than the MKL
    build inside the torch wheel; CUDA uses torch. The float64 and dominant-terms paths run on
    the CPU with NumPy whatever the backend (a CUDA float32 GEMM may use TF32, outside the
    dominant-terms proof).
    """

    def __init__(
        self,
        latents: np.ndarray,
        *,
        device: str = "cpu",
        backend: Backend = "auto",
        query_block: int = 1024,
        latent_block: int | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        operand: GemmOperand | None = None,
    ) -> None:
        if latents.ndim != 2 or latents.shape[0] < 1 or latents.shape[1] < 1:
            raise ValueError(f"latents must have shape (N, d) with N, d >= 1, got {latents.shape}")
        self.latents = latents
        self.n, self.dim = int(latents.shape[0]), int(latents.shape[1])
        self.device = torch.device(device)
        if backend == "auto":
            backend = "numpy" if self.device.type == "cpu" else "torch"
        if backend == "numpy" and self.device.type != "cpu":
            raise ValueError("the numpy backend runs on the CPU only")
        self.backend: Backend = backend
        self.query_block = query_block
        # None: LATENT_BLOCK, and float32 blocks widen for few queries (_float32_width)
        self.latent_block = LATENT_BLOCK if latent_block is None else latent_block
        self._widen = latent_block is None
        self.tolerance = tolerance
        # Rows of the float64 tile the latents are centred into (at most one latent block).
        self._tile64 = max(1, min(self.latent_block, FLOAT64_TILE_BYTES // (8 * (self.dim + 2))))

        if operand is None:
            operand = gemm_operand(latents, self.latent_block)
        elif (operand.n, operand.dim) != (self.n, self.dim):
            raise ValueError(f"the GEMM operand is {operand.n} x {operand.dim}, the latents "
                             f"{self.n} x {self.dim}")
        self.mean = operand.mean
        self.augmented = operand.augmented
        self.sq_norms = operand.sq_norms
        self.radius = float(np.sqrt(self.sq_norms.max()))
        self._operand64: np.ndarray | None = None  # FLOAT64_OPERANDS: made at first need
        self._operand64_lock = threading.Lock()
        self._augmented_torch: torch.Tensor | None = None
        if self.backend == "torch":
            with warnings.catch_warnings():  # a read-only memory map: copied to the device
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self._augmented_torch = torch.from_numpy(self.augmented).to(self.device)

    def log_sum(
        self,
        queries: np.ndarray,
        sigma: float,
        exclude: np.ndarray | None = None,
        max_error: float | None = None,
    ) -> DensityScores:
        """The log-sums of eq. (1) for a batch: queries (Q, d) -> (Q,) float64 nats.

        ``exclude`` (Q,) ints: leave-one-out, training latent ``exclude[k]`` is left out of
        query k's sum. ``max_error`` is for approximate scorers: this one is exact (within
        1e-4 nats of float64), so it meets any.
        """
        del max_error
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {q.shape}")
        sigma = check_sigma(sigma)
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64)
            if exclude.shape != (q.shape[0],) or self.n < 2:
                raise ValueError("exclude needs one index per query and N >= 2")
            if exclude.size and (exclude.min() < 0 or exclude.max() >= self.n):
                raise ValueError("exclude indices must lie in [0, N)")
        q64 = q.astype(np.float64)
        q_centred = q64 - self.mean
        if not np.all(np.isfinite(q_centred)):
            raise ValueError("queries contain NaN or Inf")
        q_sq = np.einsum("ij,ij->i", q_centred, q_centred)
        count = self.n - (0 if exclude is None else 1)
        q_norm = np.sqrt(q_sq)
        bound32 = rounding_bound(q_norm, self.radius, self.dim, sigma, UNIT_ROUNDOFF_F32)
        bound64 = rounding_bound(q_norm, self.radius, self.dim, sigma, UNIT_ROUNDOFF_F64)

        out = np.empty(q.shape[0], dtype=np.float64)
        precision = np.full(q.shape[0], PRECISION_FLOAT32, dtype=np.uint8)
        fast = np.flatnonzero(bound32 <= self.tolerance)
        others = np.flatnonzero(bound32 > self.tolerance)
        term_error = float32_logit_bound(q_norm, self.radius, self.dim, sigma)
        tried = others[self._dominant_eligible(q_norm[others], term_error[others], sigma)]
        certified = np.zeros(q.shape[0], dtype=bool)
        for start in range(0, tried.size, self.query_block):
            rows = tried[start : start + self.query_block]
            values, ok = self._log_sum_dominant(
                q64[rows], q_centred[rows], q_sq[rows], sigma,
                None if exclude is None else exclude[rows], term_error[rows],
            )
            out[rows[ok]] = values[ok]
            certified[rows[ok]] = True
        precision[certified] = PRECISION_DOMINANT
        others = others[~certified[others]]
        slow_parts = [others[bound64[others] <= self.tolerance]]
        exact = others[bound64[others] > self.tolerance]
        for start in range(0, fast.size, self.query_block):
            rows = fast[start : start + self.query_block]
            out[rows], ok = self._lse_shifted(
                q_centred[rows], sigma, None if exclude is None else exclude[rows], np.float32
            )
            slow_parts.append(rows[~ok])
        slow = np.sort(np.concatenate(slow_parts))
        precision[slow] = PRECISION_FLOAT64
        for start in range(0, slow.size, self.query_block):
            rows = slow[start : start + self.query_block]
            rows_exclude = None if exclude is None else exclude[rows]
            out[rows], ok = self._lse_shifted(q_centred[rows], sigma, rows_exclude, np.float64)
            if not ok.all():  # a later block overflowed the first block's shift: rescale
                again = rows[~ok]
                out[again] = self._lse_rescaled(
                    q_centred[again], sigma, None if exclude is None else exclude[again]
                )[0]
        gemm = np.union1d(fast, slow)
        out[gemm] += -q_sq[gemm] / (2.0 * sigma * sigma)
        if exact.size:
            precision[exact] = PRECISION_EXACT
            out[exact] = self._log_sum_exact(
                q[exact], q_centred[exact], sigma, None if exclude is None else exclude[exact]
            )
        np.minimum(out, math.log(count), out=out)
        return DensityScores(log_sum=out, precision=precision)

    def _augmented_query(self, q_centred: np.ndarray, sigma: float, dtype: type) -> np.ndarray:
        """``[q_c / s2, 1 / s2, 0]`` in ``dtype``: (B, d) -> (B, d + 2); the last column is the
        shift the streaming log-sum-exp sets (0: none)."""
        s2 = sigma * sigma
        q_aug: np.ndarray = np.empty((q_centred.shape[0], self.dim + 2), dtype=dtype)
        q_aug[:, : self.dim] = q_centred / s2
        q_aug[:, self.dim] = 1.0 / s2
        q_aug[:, self.dim + 1] = 0.0
        return q_aug

    def _lse_shifted(
        self, q_centred: np.ndarray, sigma: float, exclude: np.ndarray | None, dtype: type
    ) -> tuple[np.ndarray, np.ndarray]:
        """log-sum-exp over N of (q_c.z_c - |z_c|^2/2)/s2 by augmented GEMMs in ``dtype``:
        (B, d) -> lse (B,), ok (B,).

        The shift is the first block's row maximum; rows whose later blocks overflow it (or
        whose first block held no term) come back with ok = False.
        """
        q_aug = self._augmented_query(q_centred, sigma, dtype)
        if dtype == np.float32 and self.backend == "torch":
            shift, sums = self._exp_sums_torch(q_aug, exclude)
        else:
            shift, sums = self._exp_sums_split(q_aug, exclude)
        limit = _SUM_LIMIT[np.dtype(dtype).itemsize]
        ok = np.isfinite(sums) & (sums > 0) & (sums < limit)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = shift + np.log(sums)
        return lse, ok

    def _float32_width(self, rows: int) -> int:
        """Latents per float32 GEMM block for ``rows`` queries: ``latent_block`` when one was
        given, else widened while the block's logits fit in ``FLOAT32_LOGITS_BYTES``."""
        if not self._widen:
            return self.latent_block
        fits = FLOAT32_LOGITS_BYTES // (4 * max(rows, 1)) // self.latent_block
        return min(self.n, max(1, fits) * self.latent_block)

    def _augmented_block(self, start: int) -> np.ndarray:
        """Rows [start, start + block) of the stored float32 [z_c, -|z_c|^2/2, 1]."""
        return self.augmented[start : start + self.latent_block]

    def _product64(self, q_aug: np.ndarray, start: int, out: np.ndarray, tile: np.ndarray) -> None:
        """``out`` (B, m) = ``q_aug`` (B, d + 2) . [z_c, -|z_c|^2/2, 1] of latents
        [start, start + m) in float64, tile by tile: each tile of raw latents is centred into
        ``tile`` (:meth:`_centre64`) and multiplied while it is still in cache; or by the kept
        float64 operand (``FLOAT64_OPERANDS``)."""
        operand = self._float64_operand()
        if operand is not None:  # the same values, centred once
            np.matmul(q_aug, operand[start : start + out.shape[1]].T, out=out)
            return
        rows = tile.shape[0]
        for offset in range(0, out.shape[1], rows):
            first = start + offset
            block = tile[: min(rows, out.shape[1] - offset)]
            self._centre64(first, block)
            np.matmul(q_aug, block.T, out=out[:, offset : offset + block.shape[0]])

    def _centre64(self, first: int, out: np.ndarray) -> None:
        """``out`` (m, d + 2) = float64 [z_c, -|z_c|^2/2, 1] of latents [first, first + m):
        one ufunc pass, the exact float32 -> float64 cast then one rounding, as
        ``astype(float64) - mean``."""
        stop = first + out.shape[0]
        np.subtract(self.latents[first:stop], self.mean, out=out[:, : self.dim])
        out[:, self.dim] = -0.5 * self.sq_norms[first:stop]
        out[:, self.dim + 1] = 1.0

    def _float64_operand(self) -> np.ndarray | None:
        """The centred float64 operand [z_c, -|z_c|^2/2, 1] (N, d + 2), made once when
        ``FLOAT64_OPERANDS`` has room for it; None: multiply tile by tile."""
        if self._operand64 is not None:
            return self._operand64
        nbytes = self.n * (self.dim + 2) * 8
        with self._operand64_lock:
            if self._operand64 is None and FLOAT64_OPERANDS.reserve(nbytes):
                try:
                    operand = np.empty((self.n, self.dim + 2))
                    for start in range(0, self.n, self._tile64):  # the tiles' values, kept
                        self._centre64(start, operand[start : start + self._tile64])
                except BaseException:  # MemoryError, an interrupted build: give the bytes back
                    FLOAT64_OPERANDS.release(nbytes)
                    raise
                weakref.finalize(self, FLOAT64_OPERANDS.release, nbytes)
                self._operand64 = operand
                log.info("float64 operand kept", extra={
                    "n": self.n, "dim": self.dim, "bytes": nbytes,
                    "budget_used": FLOAT64_OPERANDS.used, "budget": FLOAT64_OPERANDS.limit})
        return self._operand64

    def _blocks(self) -> range:
        return range(0, self.n, self.latent_block)

    def _exp_sums_split(
        self, q_aug: np.ndarray, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row shift (B,) and sum of exp(logit - shift) (B,) over all N latents, in
        ``q_aug``'s dtype, the latents split into one contiguous range per core
        when the pass is worth it (:func:`~latentsieve.workers.cores.split_ranges`).

        Each range has its own shift (its first block's row maximum); the ranges are merged
        in float64 as ``sum_p S_p exp(m_p - m)`` with ``m`` the largest: ``log S`` moves by
        a few float64 roundings. A range that overflowed or held no term gives the row a
        non-finite or zero sum, as one range would.
        """
        rows = q_aug.shape[0]
        ranges = split_ranges(self.n, rows * self.n * (self.dim + 2))
        if len(ranges) == 1:
            return self._exp_sums_range(q_aug, exclude, 0, self.n, 1)
        results = run_parts([
            functools.partial(self._exp_sums_range, q_aug.copy(), exclude, lo, hi, len(ranges))
            for lo, hi in ranges
        ])
        shifts = np.stack([shift for shift, _ in results])
        shift = shifts.max(axis=0)
        sums = np.zeros(rows)
        with np.errstate(invalid="ignore", over="ignore"):
            for part_shift, part_sums in results:
                sums += part_sums * np.exp(part_shift - shift)
        return shift, sums

    def _exp_sums_range(
        self, q_aug: np.ndarray, exclude: np.ndarray | None, first: int, stop: int, parts: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row shift (B,) and sum of exp(logit - shift) (B,) over latents [first, stop),
        block by block; ``q_aug``'s shift column is set here (the caller's copy).

        The GEMM runs in ``q_aug``'s dtype (the logits' rounding is what needs float64); the
        shifted exponents, at most a few hundred nats, are exponentiated in float32, which adds
        under u32 * (log N + 10) nats to the log-sum (float32 exp is ~5x faster than float64).
        Float32 blocks are ``_float32_width`` latents (the logits budget shared by ``parts``
        ranges); float64 blocks are ``latent_block`` latents, centred tile by tile
        (:meth:`_product64`).
        """
        rows = q_aug.shape[0]
        float32 = q_aug.dtype == np.float32
        width = self._float32_width(rows * parts) if float32 else self.latent_block
        width = min(width, stop - first)
        buffer = np.empty((rows, width), dtype=q_aug.dtype)
        exps = buffer if float32 else np.empty((rows, width), np.float32)
        tile = None if float32 else np.empty((max(1, self._tile64 // parts), self.dim + 2))
        sums = np.zeros(rows, dtype=np.float64)
        shift = np.zeros(rows, dtype=np.float64)
        for start in range(first, stop, width):
            logits = buffer[:, : min(width, stop - start)]
            if tile is None:
                np.matmul(q_aug, self.augmented[start : start + logits.shape[1]].T, out=logits)
            else:
                self._product64(q_aug, start, logits, tile)
            if exclude is not None:
                _mask_excluded(logits, exclude, start)
            if start == first:
                top = logits.max(axis=1)
                top[~np.isfinite(top)] = 0.0
                logits -= top[:, None]
                shift[:] = top
                q_aug[:, self.dim + 1] = -top
            terms = exps[:, : logits.shape[1]]
            with np.errstate(over="ignore"):  # overflow is detected by the caller (ok mask)
                np.exp(logits, out=terms, dtype=np.float32, casting="same_kind")
            sums += terms.sum(axis=1)
        return shift, sums

    def _exp_sums_torch(
        self, q_aug: np.ndarray, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._augmented_torch is not None
        q_t = torch.from_numpy(q_aug).to(self.device)
        rows = q_t.shape[0]
        sums = torch.zeros(rows, dtype=torch.float64, device=self.device)
        shift = torch.zeros(rows, dtype=torch.float32, device=self.device)
        ex = None if exclude is None else torch.from_numpy(exclude).to(self.device)
        for start in self._blocks():
            block = self._augmented_torch[start : start + self.latent_block]
            logits = q_t @ block.T
            if ex is not None:
                hit = torch.nonzero((ex >= start) & (ex < start + block.shape[0])).flatten()
                logits[hit, ex[hit] - start] = -torch.inf
            if start == 0:
                top = logits.amax(dim=1)
                top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
                logits -= top[:, None]
                shift = top
                q_t[:, self.dim + 1] = -top
            sums += logits.exp_().sum(dim=1, dtype=torch.float64)
        return shift.double().cpu().numpy(), sums.cpu().numpy()

    def _logits64(
        self, q_aug: np.ndarray, start: int, exclude: np.ndarray | None, tile: np.ndarray
    ) -> np.ndarray:
        """(q_c.z_c - |z_c|^2/2)/s2 in float64 against block ``start``: float64 ``q_aug``
        (B, d + 2) -> (B, block), with each query's excluded training latent at -inf."""
        logits = np.empty((q_aug.shape[0], min(self.latent_block, self.n - start)))
        self._product64(q_aug, start, logits, tile)
        if exclude is not None:
            _mask_excluded(logits, exclude, start)
        return logits

    def _lse_rescaled(
        self, q_centred: np.ndarray, sigma: float, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Streaming float64 log-sum-exp of (q_c.z_c - |z_c|^2/2)/s2: (B, d) -> lse, max (B,)."""
        q_aug = self._augmented_query(q_centred, sigma, np.float64)
        tile = np.empty((self._tile64, self.dim + 2))
        rows = q_centred.shape[0]
        running_max = np.full(rows, -np.inf)
        sums = np.zeros(rows)
        for start in self._blocks():
            logits = self._logits64(q_aug, start, exclude, tile)
            new_max = np.maximum(running_max, logits.max(axis=1))
            safe = np.where(np.isfinite(new_max), new_max, 0.0)
            with np.errstate(invalid="ignore"):
                sums = sums * np.exp(running_max - safe) + np.exp(logits - safe[:, None]).sum(1)
            running_max = new_max
        return running_max + np.log(sums), running_max

    def _direct_logits(
        self, q: np.ndarray, rows: np.ndarray, cols: np.ndarray, s2: float
    ) -> np.ndarray:
        """``-||q[rows[p]] - z[cols[p]]||^2 / (2 s2)`` from float64 differences of the raw
        latents: (B, d) float64 queries, (P,) pairs -> (P,) nats, query by query in chunks of
        ``_DIRECT_CHUNK_ELEMENTS`` (error: :func:`direct_term_error`)."""
        terms = np.empty(rows.size)
        if not rows.size:
            return terms
        order = np.argsort(rows, kind="stable")
        step = max(1, _DIRECT_CHUNK_ELEMENTS // self.dim)
        buffer = np.empty((min(step, rows.size), self.dim))
        for group in np.split(order, np.flatnonzero(np.diff(rows[order])) + 1):
            query = q[rows[group[0]]]
            for start in range(0, group.size, step):
                part = group[start : start + step]
                diff = buffer[: part.size]
                np.subtract(self.latents[cols[part]], query, out=diff)
                np.square(diff, out=diff)
                terms[part] = diff.sum(axis=1)  # summed as log_density_reference sums
        return -terms / (2.0 * s2)

    def _dominant_eligible(
        self, q_norm: np.ndarray, term_error: np.ndarray, sigma: float
    ) -> np.ndarray:
        """Rows (B,) bool the dominant-terms path may try: a CPU float32 GEMM whose inputs stay
        finite and whose proven term error leaves the float32 logits worth ranking."""
        s2 = sigma * sigma
        if (self.backend != "numpy" or self.dim < DOMINANT_MIN_DIM
                or 1.0 / s2 > _F32_SAFE_MAGNITUDE):
            return np.zeros(q_norm.shape, dtype=bool)
        return np.asarray(
            (term_error <= DOMINANT_MAX_TERM_ERROR) & (q_norm / s2 <= _F32_SAFE_MAGNITUDE)
        )

    def _dominant_probe(
        self, q_aug: np.ndarray, q_norm: np.ndarray, window: np.ndarray, sigma: float,
        limit: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows (B,) bool worth a full float32 pass, and a likely lower bound (B,) on each
        row's largest float32 logit.

        Every latent's logit is estimated from k = d / ``DOMINANT_PROBE_SHARE`` coordinates
        (scaled up, plus the exact ``|z_c|^2`` column), with a typical error of
        ``|q_c| R / (s2 sqrt(k))`` (coordinates that share the product evenly). A row is worth
        the pass when at most ``limit`` estimates lie within ``window`` plus two such errors of
        the largest; the largest minus four errors is the lower bound. Every latent is
        scored, so a single near-duplicate is not missed; two cheap passes (maximum, then
        count). Speed only: the certificate decides."""
        rows_in = q_aug.shape[0]
        width = DOMINANT_PROBE_CHUNK
        chunks = max(1, self.dim // (DOMINANT_PROBE_SHARE * width))
        stride = self.dim // chunks
        if width * 4 > stride:
            return np.ones(rows_in, dtype=bool), np.full(rows_in, -np.inf)
        size = chunks * width
        q_part = np.empty((q_aug.shape[0], size + 1), dtype=np.float32)
        spread = q_aug[:, : chunks * stride].reshape(-1, chunks, stride)[:, :, :width]
        q_part[:, :size] = spread.reshape(-1, size) * np.float32(self.dim / size)
        q_part[:, size] = q_aug[:, self.dim]  # 1 / s2, against the exact -|z_c|^2 / 2
        part = np.empty((min(self.latent_block, self.n), size + 1), dtype=np.float32)

        def estimates(start: int) -> np.ndarray:
            block = self._augmented_block(start)
            rows = part[: block.shape[0]]
            spread = block[:, : chunks * stride].reshape(block.shape[0], chunks, stride)
            rows[:, :size].reshape(-1, chunks, width)[:] = spread[:, :, :width]
            rows[:, size] = block[:, self.dim]
            return np.asarray(q_part @ rows.T)

        top = np.full(q_aug.shape[0], -np.inf, dtype=np.float32)
        for start in self._blocks():
            np.maximum(top, estimates(start).max(axis=1), out=top)
        noise = q_norm * self.radius / (sigma * sigma * math.sqrt(size))
        floor = (top - 2.0 * noise - window).astype(np.float32)
        inside = np.zeros(rows_in, dtype=np.int64)
        for start in self._blocks():
            inside += np.count_nonzero(estimates(start) >= floor[:, None], axis=1)
        return np.asarray(inside <= limit), np.asarray(top - 4.0 * noise, dtype=np.float64)

    def _log_sum_dominant(
        self,
        q: np.ndarray,
        q_centred: np.ndarray,
        q_sq: np.ndarray,
        sigma: float,
        exclude: np.ndarray | None,
        term_error: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Log-sums of eq. (1) with a proven error under ``tolerance``: (B, d) -> (B,) nats,
        ok (B,) (rows not ok are left to the float64 paths).

        One float32 GEMM pass ranks the terms (each within ``e`` = :func:`float32_logit_bound`
        of its exact value). Terms within ``W`` = :func:`dominant_window` of the running
        maximum are kept and recomputed from direct float64 differences
        (:meth:`_direct_logits`); the rest are summed from their float32 values, relative to
        the running maximum in float64. A row is given up once it keeps more than
        ``DOMINANT_FRACTION`` of N (or when the probe predicts so) and is accepted when
        :func:`log_sum_certificate` is at most ``tolerance``.
        """
        s2 = sigma * sigma
        rows = q.shape[0]
        count = self.n - (0 if exclude is None else 1)
        window = dominant_window(term_error, count, self.tolerance)
        limit = max(DOMINANT_MIN_TERMS, int(count * DOMINANT_FRACTION))
        q_aug = self._augmented_query(q_centred, sigma, np.float32)
        alive, hint = self._dominant_probe(q_aug, np.sqrt(q_sq), window, sigma, limit)
        top = np.full(rows, -np.inf)  # running maximum of the float32 logits
        rest = np.zeros(rows)  # sum over unkept terms of exp(logit - top)
        kept = np.zeros(rows, dtype=np.int64)
        kept_rows: list[np.ndarray] = []
        kept_cols: list[np.ndarray] = []
        kept_logits: list[np.ndarray] = []
        buffer = np.empty((rows, min(self.latent_block, self.n)))
        for start in self._blocks():
            live = np.flatnonzero(alive)
            if not live.size:
                break
            q_live = q_aug if live.size == rows else q_aug[live]
            logits = np.matmul(q_live, self._augmented_block(start).T)  # float32
            if exclude is not None:
                _mask_excluded(logits, exclude[live], start)
            new_top = np.maximum(top[live], logits.max(axis=1))
            finite = np.isfinite(new_top)
            safe = np.where(finite, new_top, 0.0)
            # which terms are kept only steers the work: the certificate holds for any split.
            # The probe's likely maximum keeps a flat bulk seen before a near-duplicate out.
            floor = np.where(finite, np.maximum(new_top, hint[live]) - window[live], np.inf)
            floor = floor.astype(np.float32)
            picked = logits >= floor[:, None]
            r, c = np.nonzero(picked)
            kept_rows.append(live[r])
            kept_cols.append(c + start)
            kept_logits.append(logits[r, c].astype(np.float64))
            # float32 logit - float64 maximum: the exact cast, then one float64 rounding
            terms = np.subtract(logits, safe[:, None], out=buffer[: live.size, : logits.shape[1]])
            np.exp(terms, out=terms)
            terms[picked] = 0.0
            rest[live] = rest[live] * np.exp(top[live] - safe) + terms.sum(axis=1)
            top[live] = new_top
            kept[live] += np.bincount(r, minlength=live.size)
            alive[live[kept[live] > limit]] = False

        ok = alive & np.isfinite(top)
        values = np.full(rows, np.nan)
        if not ok.any():
            return values, ok
        r = np.concatenate(kept_rows)
        c = np.concatenate(kept_cols)
        logit = np.concatenate(kept_logits)
        mine = ok[r]
        r, c, logit = r[mine], c[mine], logit[mine]
        inside = logit >= top[r] - window[r]  # kept before the maximum rose: to the rest
        np.add.at(rest, r[~inside], np.exp(logit[~inside] - top[r[~inside]]))
        r, c = r[inside], c[inside]
        terms = self._direct_logits(q, r, c, s2)
        best = np.full(rows, -np.inf)
        np.maximum.at(best, r, terms)
        dominant_sum = np.zeros(rows)
        np.add.at(dominant_sum, r, np.exp(terms - best[r]))
        exact_error = np.zeros(rows)
        np.maximum.at(exact_error, r, direct_term_error(terms, self.dim, sigma))
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            # the float32 maximum in exact units (row constant -|q_c|^2 / 2 s2), relative to best
            scale = np.exp(top - q_sq / (2.0 * s2) - best)
            rest_sum = rest * scale
            rest_bound = (rest + count * 2.0**-1022) * scale  # + exps that underflowed to 0
            values = best + np.log(dominant_sum + rest_sum)
        bound = log_sum_certificate(term_error, exact_error, rest_bound, dominant_sum, count)
        # rounding of the sum above, whose log term is at most about log(count)
        bound += 4.0 * UNIT_ROUNDOFF_F64 * (np.abs(best) + math.log(count) + 1.0)
        ok &= np.isfinite(values) & (bound <= self.tolerance)
        return values, ok

    def _log_sum_exact(
        self, q: np.ndarray, q_centred: np.ndarray, sigma: float, exclude: np.ndarray | None
    ) -> np.ndarray:
        """Log-sums of eq. (1) from direct float64 differences of the dominant terms: (B, d) ->
        (B,) nats.

        A float64 GEMM pass finds each row's largest logit; a second pass keeps the terms within
        ``EXACT_WINDOW_NATS`` plus twice the GEMM's rounding bound of it and recomputes them as
        ``-||q - z_i||^2 / (2 sigma^2)``; the dropped terms weigh under N * e^-60 of the sum.
        """
        s2 = sigma * sigma
        _, top = self._lse_rescaled(q_centred, sigma, exclude)
        bound = rounding_bound(
            np.sqrt((q_centred**2).sum(1)), self.radius, self.dim, sigma, UNIT_ROUNDOFF_F64
        )
        floor = top - EXACT_WINDOW_NATS - 2.0 * bound
        q_aug = self._augmented_query(q_centred, sigma, np.float64)
        tile = np.empty((self._tile64, self.dim + 2))
        kept_rows: list[np.ndarray] = []
        kept_cols: list[np.ndarray] = []
        for start in self._blocks():
            logits = self._logits64(q_aug, start, exclude, tile)
            r, c = np.nonzero(logits >= floor[:, None])
            kept_rows.append(r)
            kept_cols.append(start + c)
        rows = np.concatenate(kept_rows)
        terms = self._direct_logits(q.astype(np.float64), rows, np.concatenate(kept_cols), s2)
        best = np.full(q.shape[0], -np.inf)
        np.maximum.at(best, rows, terms)
        sums = np.zeros(q.shape[0])
        np.add.at(sums, rows, np.exp(terms - best[rows]))
        return np.asarray(best + np.log(sums))
