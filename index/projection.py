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
