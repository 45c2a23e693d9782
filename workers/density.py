"""Exact Gaussian-kernel log-density of latents among training latents.

Implements equation (1) of Xu, Le & Samaras, "Assessing Sample Quality via the Latent Space of
Generative Models" (ECCV 2024), in log space and without a Gaussian normalising constant:

    log_density(q) = log( (1/N) * sum_i exp( -||q - z_i||^2 / (2 sigma^2) ) )      [nats]

The fast path is one GEMM per block of training latents. With centred latents ``z_c`` and queries
``q_c`` (centring limits cancellation) each block computes the *augmented* product

    [q_c / s2, 1 / s2, -m] . [z_c, -||z_c||^2 / 2, 1]  =  (q_c.z_c - ||z_c||^2 / 2) / s2 - m

(``s2 = sigma^2``, ``m`` a per-query shift), so the bias and the shift ride inside the matrix
multiply and the only elementwise passes left are ``exp`` and a row sum. The row constant
``-||q_c||^2 / (2 s2)`` is added once after the log-sum-exp, which equals
``-||q - z_i||^2 / (2 s2)`` summed in log space; clamping the result at 0 nats is the log-space
form of clamping distances at 0 (every kernel term is <= 1).

Precision is chosen per query from an a-priori rounding bound (see :func:`rounding_bound`):
float32 when the bound is under the tolerance, float64 otherwise, and an exact re-computation of
the dominant terms by direct differences when even float64 cannot meet it (tiny ``sigma``, where
every ``exp`` underflows). The streaming log-sum-exp keeps memory at one
``query_block x latent_block`` buffer for any ``N``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from latentsieve.index.gemm_operand import GemmOperand, gemm_operand
from latentsieve.index.manifest import check_sigma

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

Backend = Literal["auto", "numpy", "torch"]
FloatArray = np.ndarray


def log_density_reference(
    queries: np.ndarray,
    latents: np.ndarray,
    sigma: float,
    exclude: np.ndarray | None = None,
    query_block: int = 64,
) -> np.ndarray:
    """Eq. (1) by direct float64 differences: (Q, d), (N, d) -> (Q,) nats; the slow ground truth.

    ``exclude[k]`` (optional, (Q,) ints) drops training latent ``exclude[k]`` from query k's
    sum and divides by N - 1 (leave-one-out).
    """
    q = np.asarray(queries, dtype=np.float64)
    z = np.asarray(latents, dtype=np.float64)
    n = z.shape[0] - (0 if exclude is None else 1)
    out = np.empty(q.shape[0], dtype=np.float64)
    for start in range(0, q.shape[0], query_block):
        block = q[start : start + query_block]
        sq = ((block[:, None, :] - z[None, :, :]) ** 2).sum(-1)
        logits = -sq / (2.0 * sigma * sigma)
        if exclude is not None:
            rows = np.arange(block.shape[0])
            logits[rows, exclude[start : start + query_block]] = -np.inf
        top = logits.max(axis=1)
        out[start : start + query_block] = (
            top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - math.log(n)
        )
    return out


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


def _mask_excluded(logits: np.ndarray, exclude: np.ndarray, start: int) -> None:
    """Set logits[k, exclude[k] - start] = -inf where that latent lies in this block."""
    hit = np.flatnonzero((exclude >= start) & (exclude < start + logits.shape[1]))
    logits[hit, exclude[hit] - start] = -np.inf


@dataclass(frozen=True)
class DensityScores:
    """Scores of one batch: log densities (Q,) in nats and the path that computed each row;
    a certified approximate scorer adds each row's bound (nats: the exact value lies within
    ``log_density +- error_bound``), None from exact engines."""

    log_density: np.ndarray
    precision: np.ndarray  # (Q,) uint8: 32 = float32 GEMM, 64 = float64 GEMM, 0 = exact terms
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

    def log_density(
        self,
        queries: np.ndarray,
        sigma: float,
        exclude: np.ndarray | None = None,
        max_error: float | None = None,
    ) -> DensityScores: ...


class DensityEngine:
    """Streaming exact scorer of eq. (1) over a fixed set of training latents.

    ``latents`` is an (N, d) float32 array (a memory map is fine: it is read block by block).
    The engine multiplies by a centred, augmented float32 operand (N, d + 2) and keeps the
    float64 squared norms (N,) (:mod:`latentsieve.index.gemm_operand`): given as ``operand``
    (a stored one, memory-mapped), or made here, a second copy of the latents. The CPU GEMM
    goes through NumPy's BLAS (OpenBLAS), which on AMD CPUs runs markedly faster than the MKL
    build inside the torch wheel; CUDA uses torch.
    """

    def __init__(
        self,
        latents: np.ndarray,
        *,
        device: str = "cpu",
        backend: Backend = "auto",
        query_block: int = 1024,
        latent_block: int = 4096,
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
        self.latent_block = latent_block
        self.tolerance = tolerance

        if operand is None:
            operand = gemm_operand(latents, latent_block)
        elif (operand.n, operand.dim) != (self.n, self.dim):
            raise ValueError(f"the GEMM operand is {operand.n} x {operand.dim}, the latents "
                             f"{self.n} x {self.dim}")
        self.mean = operand.mean
        self.augmented = operand.augmented
        self.sq_norms = operand.sq_norms
        self.radius = float(np.sqrt(self.sq_norms.max()))
        self._augmented_torch: torch.Tensor | None = None
        if self.backend == "torch":
            with warnings.catch_warnings():  # a read-only memory map: copied to the device
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self._augmented_torch = torch.from_numpy(self.augmented).to(self.device)

    def log_density(
        self,
        queries: np.ndarray,
        sigma: float,
        exclude: np.ndarray | None = None,
        max_error: float | None = None,
    ) -> DensityScores:
        """Eq. (1) for a batch: queries (Q, d) -> log densities (Q,) float64 nats.

        ``exclude`` (Q,) ints: leave-one-out, training latent ``exclude[k]`` is left out of
        query k's sum and the mean is over N - 1 latents. ``max_error`` is for approximate
        scorers: this one is exact (within 1e-4 nats of float64), so it meets any.
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
        q_centred = q.astype(np.float64) - self.mean
        if not np.all(np.isfinite(q_centred)):
            raise ValueError("queries contain NaN or Inf")
        q_sq = np.einsum("ij,ij->i", q_centred, q_centred)
        count = self.n - (0 if exclude is None else 1)
        q_norm = np.sqrt(q_sq)
        bound32 = rounding_bound(q_norm, self.radius, self.dim, sigma, UNIT_ROUNDOFF_F32)
        bound64 = rounding_bound(q_norm, self.radius, self.dim, sigma, UNIT_ROUNDOFF_F64)

        out = np.empty(q.shape[0], dtype=np.float64)
        precision = np.full(q.shape[0], 32, dtype=np.uint8)
        fast = np.flatnonzero(bound32 <= self.tolerance)
        slow = np.flatnonzero((bound32 > self.tolerance) & (bound64 <= self.tolerance))
        exact = np.flatnonzero(bound64 > self.tolerance)
        slow_parts = [slow]
        for start in range(0, fast.size, self.query_block):
            rows = fast[start : start + self.query_block]
            out[rows], ok = self._lse_shifted(
                q_centred[rows], sigma, None if exclude is None else exclude[rows], np.float32
            )
            slow_parts.append(rows[~ok])
        slow = np.sort(np.concatenate(slow_parts))
        precision[slow] = 64
        for start in range(0, slow.size, self.query_block):
            rows = slow[start : start + self.query_block]
            rows_exclude = None if exclude is None else exclude[rows]
            out[rows], ok = self._lse_shifted(q_centred[rows], sigma, rows_exclude, np.float64)
            if not ok.all():  # a later block overflowed the first block's shift: rescale
                again = rows[~ok]
                out[again] = self._lse_rescaled(
                    q_centred[again], sigma, None if exclude is None else exclude[again]
                )[0]
        out += -q_sq / (2.0 * sigma * sigma) - math.log(count)
        if exact.size:
            precision[exact] = 0
            out[exact] = self._log_density_exact(
                q[exact], q_centred[exact], sigma, None if exclude is None else exclude[exact]
            )
        np.minimum(out, 0.0, out=out)
        return DensityScores(log_density=out, precision=precision)

    def _lse_shifted(
        self, q_centred: np.ndarray, sigma: float, exclude: np.ndarray | None, dtype: type
    ) -> tuple[np.ndarray, np.ndarray]:
        """log-sum-exp over N of (q_c.z_c - |z_c|^2/2)/s2 by augmented GEMMs in ``dtype``:
        (B, d) -> lse (B,), ok (B,).

        The shift is the first block's row maximum; rows whose later blocks overflow it (or
        whose first block held no term) come back with ok = False.
        """
        s2 = sigma * sigma
        rows = q_centred.shape[0]
        q_aug: np.ndarray = np.empty((rows, self.dim + 2), dtype=dtype)
        q_aug[:, : self.dim] = q_centred / s2
        q_aug[:, self.dim] = 1.0 / s2
        q_aug[:, self.dim + 1] = 0.0
        if dtype == np.float32 and self.backend == "torch":
            shift, sums = self._exp_sums_torch(q_aug, exclude)
        elif dtype == np.float32:
            shift, sums = self._exp_sums_numpy(q_aug, exclude, self._augmented_block)
        else:
            shift, sums = self._exp_sums_numpy(q_aug, exclude, self._augmented_block64)
        limit = _SUM_LIMIT[np.dtype(dtype).itemsize]
        ok = np.isfinite(sums) & (sums > 0) & (sums < limit)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = shift + np.log(sums)
        return lse, ok

    def _augmented_block(self, start: int) -> np.ndarray:
        """Rows [start, start + block) of the stored float32 [z_c, -|z_c|^2/2, 1]."""
        return self.augmented[start : start + self.latent_block]

    def _augmented_block64(self, start: int) -> np.ndarray:
        """The same rows in float64, centred from the raw float32 latents (no float32 rounding
        of the centring)."""
        centred, norms = self._centred_block(start)
        block = np.empty((centred.shape[0], self.dim + 2))
        block[:, : self.dim] = centred
        block[:, self.dim] = -0.5 * norms
        block[:, self.dim + 1] = 1.0
        return block

    def _blocks(self) -> range:
        return range(0, self.n, self.latent_block)

    def _exp_sums_numpy(
        self,
        q_aug: np.ndarray,
        exclude: np.ndarray | None,
        block_at: Callable[[int], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row shift (B,) and sum of exp(logit - shift) (B,), one GEMM per latent block.

        The GEMM runs in ``q_aug``'s dtype (the logits' rounding is what needs float64); the
        shifted exponents, at most a few hundred nats, are exponentiated in float32, which adds
        under u32 * (log N + 10) nats to the log-sum (float32 exp is ~5x faster than float64).
        """
        rows = q_aug.shape[0]
        width = min(self.latent_block, self.n)
        buffer = np.empty((rows, width), dtype=q_aug.dtype)
        exps = buffer if q_aug.dtype == np.float32 else np.empty((rows, width), np.float32)
        sums = np.zeros(rows, dtype=np.float64)
        shift = np.zeros(rows, dtype=np.float64)
        for start in self._blocks():
            block = block_at(start)
            logits = buffer[:, : block.shape[0]]
            np.matmul(q_aug, block.T, out=logits)
            if exclude is not None:
                _mask_excluded(logits, exclude, start)
            if start == 0:
                top = logits.max(axis=1)
                top[~np.isfinite(top)] = 0.0
                logits -= top[:, None]
                shift[:] = top
                q_aug[:, self.dim + 1] = -top
            terms = exps[:, : block.shape[0]]
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

    def _centred_block(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Training latents [start, start + block) centred in float64, and their |z_c|^2."""
        block = self.latents[start : start + self.latent_block].astype(np.float64) - self.mean
        return block, self.sq_norms[start : start + block.shape[0]]

    def _logits64(
        self, q_centred: np.ndarray, s2: float, start: int, exclude: np.ndarray | None
    ) -> np.ndarray:
        """(q_c.z_c - |z_c|^2/2)/s2 in float64 against block ``start``: (B, d) -> (B, block),
        with each query's excluded training latent at -inf."""
        block, norms = self._centred_block(start)
        logits = (q_centred @ block.T - 0.5 * norms) / s2
        if exclude is not None:
            _mask_excluded(logits, exclude, start)
        return np.asarray(logits)

    def _lse_rescaled(
        self, q_centred: np.ndarray, sigma: float, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Streaming float64 log-sum-exp of (q_c.z_c - |z_c|^2/2)/s2: (B, d) -> lse, max (B,)."""
        s2 = sigma * sigma
        rows = q_centred.shape[0]
        running_max = np.full(rows, -np.inf)
        sums = np.zeros(rows)
        for start in self._blocks():
            logits = self._logits64(q_centred, s2, start, exclude)
            new_max = np.maximum(running_max, logits.max(axis=1))
            safe = np.where(np.isfinite(new_max), new_max, 0.0)
            with np.errstate(invalid="ignore"):
                sums = sums * np.exp(running_max - safe) + np.exp(logits - safe[:, None]).sum(1)
            running_max = new_max
        return running_max + np.log(sums), running_max

    def _log_density_exact(
        self, q: np.ndarray, q_centred: np.ndarray, sigma: float, exclude: np.ndarray | None
    ) -> np.ndarray:
        """Eq. (1) from direct float64 differences of the dominant terms: (B, d) -> (B,) nats.

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
        q64 = q.astype(np.float64)
        best = np.full(q.shape[0], -np.inf)
        kept_rows: list[np.ndarray] = []
        kept_terms: list[np.ndarray] = []
        for start in self._blocks():
            logits = self._logits64(q_centred, s2, start, exclude)
            r, c = np.nonzero(logits >= floor[:, None])
            raw = self.latents[start + c].astype(np.float64)
            terms = -((q64[r] - raw) ** 2).sum(axis=1) / (2.0 * s2)
            np.maximum.at(best, r, terms)
            kept_rows.append(r)
            kept_terms.append(terms)
        rows = np.concatenate(kept_rows)
        terms = np.concatenate(kept_terms)
        sums = np.zeros(q.shape[0])
        np.add.at(sums, rows, np.exp(terms - best[rows]))
        count = self.n - (0 if exclude is None else 1)
        return np.asarray(best + np.log(sums) - math.log(count))
