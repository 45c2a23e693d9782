"""The density scorer of each index kind: the exact GEMM engine for ``flat``, certified IVF
scoring for ``ivf`` (:mod:`latentsieve.workers.certified`)."""

from __future__ import annotations

import numpy as np

from latentsieve.index.gemm_operand import GemmOperand
from latentsieve.index.ivf_lists import IvfLists, StoredRows
from latentsieve.index.manifest import DEFAULT_MAX_ERROR, check_sigma
from latentsieve.workers.certified import CertifiedIVF
from latentsieve.workers.density import DensityEngine, DensityScorer, DensityScores


class CertifiedDensity:
    """Eq. (1) over certified IVF lists with the :class:`DensityScorer` interface: every score
    carries its bound (``DensityScores.error_bound``), at most ``max_error`` nats (the call's,
    else ``default_max_error``) unless every list had to be summed (then exact)."""

    def __init__(self, lists: IvfLists, default_max_error: float = DEFAULT_MAX_ERROR) -> None:
        self.index = CertifiedIVF(lists)
        self.latents = StoredRows(lists)
        self.default_max_error = default_max_error
        self.last_lists_probed: np.ndarray | None = None  # of the last batch, for the record

    def log_density(
        self,
        queries: np.ndarray,
        sigma: float,
        exclude: np.ndarray | None = None,
        max_error: float | None = None,
    ) -> DensityScores:
        """Queries (Q, d) -> certified scores (Q,) nats; ``exclude`` as the exact engine's."""
        q = np.asarray(queries, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self.index.dim:
            raise ValueError(f"queries must have shape (Q, {self.index.dim}), got {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("queries contain NaN or Inf")
        bound = self.default_max_error if max_error is None else max_error
        scores = self.index.score(q, check_sigma(sigma), max_error=bound, exclude=exclude)
        self.last_lists_probed = scores.lists_probed
        return DensityScores(
            log_density=scores.estimate,
            precision=np.zeros(q.shape[0], dtype=np.uint8),
            error_bound=scores.half_width,
        )


def open_density(
    latents: np.ndarray,
    lists: IvfLists | None = None,
    device: str = "cpu",
    default_max_error: float = DEFAULT_MAX_ERROR,
    operand: GemmOperand | None = None,
) -> DensityScorer:
    """The scorer of an index: certified IVF over ``lists`` (on the CPU: its probing is a loop
    of small GEMMs) when given, else the exact engine over ``latents`` on ``device`` (with its
    stored GEMM operand when the version has one)."""
    if lists is not None:
        return CertifiedDensity(lists, default_max_error)
    return DensityEngine(latents, device=device, operand=operand)
