"""PCA projection of the index space (``--pca DIM``): fitted at build, applied to every query."""

from __future__ import annotations

import numpy as np

_BLOCK = 65_536


def fit_pca(latents: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-``dim`` principal axes of (N, d) latents in float64: mean (d,), components (dim, d),
    explained variance ratio. Covariance accumulated in blocks, then ``eigh``."""
    n, d = latents.shape
    mean = np.zeros(d)
    for start in range(0, n, 65_536):
        mean += latents[start : start + 65_536].sum(axis=0, dtype=np.float64)
    mean /= n
    covariance = np.zeros((d, d))
    for start in range(0, n, 65_536):
        block = latents[start : start + 65_536].astype(np.float64) - mean
        covariance += block.T @ block
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1][:dim]
    components = vectors[:, order].T
    # Fix each axis' sign (largest coordinate positive) so the projection is reproducible.
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    components *= np.where(signs == 0, 1.0, signs)[:, None]
    total = float(values.clip(min=0).sum())
    ratio = float(values[order].clip(min=0).sum() / total) if total > 0 else 1.0
    return mean, components, min(ratio, 1.0)


def project(latents: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, dim) float32: (z - mean) @ components.T in float64."""
    centred = np.asarray(latents, dtype=np.float64) - mean
    return np.ascontiguousarray(centred @ components.T, dtype=np.float32)


ACTIVE_THRESHOLD = 0.1


def coordinate_variances(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate mean (d,) and variance (d,) of (N, d) latents, float64, in blocks."""
    n, d = latents.shape
    mean = np.zeros(d)
    for start in range(0, n, _BLOCK):
        mean += latents[start : start + _BLOCK].sum(axis=0, dtype=np.float64)
    mean /= n
    variance = np.zeros(d)
    for start in range(0, n, _BLOCK):
        block = latents[start : start + _BLOCK].astype(np.float64) - mean
        variance += (block * block).sum(axis=0)
    return mean, variance / n


def fit_active(
    latents: np.ndarray, threshold: float, reference: np.ndarray | float, standardize: bool
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Keep coordinate j of (N, d) latents unless it collapsed: var_j < threshold * reference_j
    *and* var_j < threshold * max_k var_k (Burda et al., 2016's activity of a VAE unit is the
    variance of its encoder means). The second test keeps latents that are merely on a smaller
    scale than the queries in every coordinate: a coordinate is dropped only when it is small
    against the queries and against the other coordinates. With ``standardize`` each kept
    coordinate is scaled by 1 / sd_j. Returns mean (d,), components (d', d), the variance ratio
    kept, and the kept coordinates (d',) in ascending order (never empty)."""
    mean, variance = coordinate_variances(latents)
    floor = np.minimum(np.broadcast_to(reference, variance.shape), variance.max())
    kept = np.flatnonzero(variance >= threshold * floor)
    components = np.zeros((kept.size, latents.shape[1]))
    scale = 1.0 / np.sqrt(np.maximum(variance[kept], 1e-300)) if standardize else 1.0
    components[np.arange(kept.size), kept] = scale
    total = float(variance.sum())
    ratio = float(variance[kept].sum() / total) if total > 0 else 1.0
    return mean, components, min(ratio, 1.0), kept
