"""Approximate density for IVF and HNSW indexes.

An approximate index scores eq. (1) of Xu, Le & Samaras (ECCV 2024) over the ``k`` neighbours it
retrieves, with exact float64 distances:

    log_density_k(q) = log( (1/N) * sum_{i in kNN(q)} exp( -||q - z_i||^2 / (2 sigma^2) ) )

which is a lower bound of the exact score (the other terms are dropped). Retrieval is itself
approximate, so no bound on the dropped mass is certified: the build measures the error against
exact scoring and records it in the manifest.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from latentsieve.index.manifest import ApproximateSearch, MeasuredError, check_sigma
from latentsieve.workers.density import DensityEngine, DensityScorer, DensityScores
from latentsieve.workers.devices import faiss_has_gpu

QUERY_CHUNK = 64  # queries per gather of neighbours: Q x k x d float64 stays small


class NeighbourDensity:
    """Eq. (1) over the ``k`` retrieved neighbours of each query; the same interface as
    :class:`latentsieve.workers.density.DensityEngine` (``latents`` (N, d) is the index-space
    copy)."""

    def __init__(
        self,
        index: faiss.Index,
        latents: np.ndarray,
        search: ApproximateSearch,
        gpu_resources: Any = None,
    ) -> None:
        self.index = index
        self.gpu_resources = gpu_resources  # a GPU index's memory pool lives as long as it
        self.latents = latents
        self.n, self.dim = int(latents.shape[0]), int(latents.shape[1])
        self.k = min(search.k, self.n)
        inner: Any = faiss.downcast_index(index)  # IndexIVFFlat or IndexHNSWFlat
        if search.nprobe is not None:
            inner.nprobe = search.nprobe
        if search.ef_search is not None:
            inner.hnsw.efSearch = search.ef_search

    def log_density(
        self, queries: np.ndarray, sigma: float, exclude: np.ndarray | None = None
    ) -> DensityScores:
        """Queries (Q, d) -> (Q,) nats over the retrieved neighbours; ``exclude`` as exact."""
        sigma = check_sigma(sigma)
        q = np.asarray(queries, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}), got {q.shape}")
        if not np.all(np.isfinite(q)):
            raise ValueError("queries contain NaN or Inf")
        k = min(self.k + (0 if exclude is None else 1), self.n)
        _, ids = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        if exclude is not None:
            ids[ids == np.asarray(exclude)[:, None]] = -1
        count = self.n - (0 if exclude is None else 1)
        out = np.empty(q.shape[0])
        for start in range(0, q.shape[0], QUERY_CHUNK):
            rows = ids[start : start + QUERY_CHUNK]
            valid = rows >= 0
            neighbours = self.latents[np.where(valid, rows, 0)].astype(np.float64)
            sq = ((neighbours - q[start : start + QUERY_CHUNK, None, :]) ** 2).sum(-1)
            logits = np.where(valid, -sq / (2.0 * sigma * sigma), -np.inf)
            top = logits.max(axis=1)
            out[start : start + QUERY_CHUNK] = (
                top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - math.log(count)
            )
        return DensityScores(log_density=out, precision=np.zeros(q.shape[0], dtype=np.uint8))


def open_density(
    kind: str,
    latents: np.ndarray,
    index: faiss.Index | None,
    search: ApproximateSearch | None,
    device: str = "cpu",
) -> DensityScorer:
    """The scorer of an index kind: the exact engine for ``flat`` (on ``device``), neighbours
    for ivf/hnsw. An ivf index moves to the GPU when ``device`` is CUDA and the FAISS build has
    GPU indexes (faiss-gpu); hnsw has no GPU form in FAISS and stays on the CPU."""
    if kind == "flat":
        return DensityEngine(latents, device=device)
    if index is None or search is None:
        raise ValueError(f"a {kind} index needs its FAISS index and search settings")
    if kind == "ivf" and device.startswith("cuda") and faiss_has_gpu():
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, int(device.split(":")[1]), index)
        return NeighbourDensity(index, latents, search, resources)
    return NeighbourDensity(index, latents, search)


def measure_error(
    approximate: DensityScorer,
    exact: DensityScorer,
    queries: np.ndarray,
    sigma: float,
    exclude: np.ndarray | None = None,
) -> MeasuredError:
    """|approximate - exact| log density (nats) over ``queries`` (n, d): max, p99, mean."""
    got = approximate.log_density(queries, sigma, exclude).log_density
    want = exact.log_density(queries, sigma, exclude).log_density
    error = np.abs(got - want)
    return MeasuredError(
        sample=int(error.size),
        max=float(error.max()),
        p99=float(np.quantile(error, 0.99)),
        mean=float(error.mean()),
    )
