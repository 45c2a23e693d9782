"""The exact engine's GEMM operand, made once at build time and memory-mapped when served.

The exact engine (:mod:`latentsieve.workers.density`) multiplies queries by the training
latents centred on their mean and augmented with two columns, ``[z_c, -|z_c|^2 / 2, 1]``
(float32, N x (d + 2)), and keeps the float64 squared norms ``|z_c|^2``. Made in memory at load
time, that operand is a second full copy of the index next to the memory-mapped FAISS file. A
flat version therefore stores it beside its FAISS index (``<stem>.gemm.npy``, memory-mapped
read-only when served, and ``<stem>.gemm_norms.npz`` with the mean and norms), so serving
reads it from the page cache instead of building it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 4096  # rows per block while centring


@dataclass(frozen=True)
class GemmOperand:
    """``mean`` (d,) float64, ``augmented`` (N, d + 2) float32 ``[z_c, -|z_c|^2 / 2, 1]``,
    ``sq_norms`` (N,) float64 ``|z_c|^2``, with ``z_c = z - mean``."""

    mean: np.ndarray
    augmented: np.ndarray
    sq_norms: np.ndarray

    @property
    def n(self) -> int:
        return int(self.augmented.shape[0])

    @property
    def dim(self) -> int:
        return int(self.augmented.shape[1] - 2)


def gemm_operand(latents: np.ndarray, block: int = BLOCK) -> GemmOperand:
    """The operand of (N, d) latents (a memory map is fine: read ``block`` rows at a time);
    ValueError when a latent is not finite."""
    n, dim = latents.shape
    total = np.zeros(dim, dtype=np.float64)
    for start in range(0, n, block):
        total += latents[start : start + block].sum(axis=0, dtype=np.float64)
    mean = total / n
    augmented = np.empty((n, dim + 2), dtype=np.float32)
    sq_norms = np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        centred = latents[start : start + block].astype(np.float64) - mean
        norms = np.einsum("ij,ij->i", centred, centred)
        stop = start + centred.shape[0]
        sq_norms[start:stop] = norms
        augmented[start:stop, :dim] = centred
        augmented[start:stop, dim] = -0.5 * norms
        augmented[start:stop, dim + 1] = 1.0
    if not np.all(np.isfinite(sq_norms)):
        raise ValueError("latents contain NaN or Inf")
    return GemmOperand(mean, augmented, sq_norms)


def operand_files(index_file: str) -> tuple[str, str]:
    """The two file names stored beside FAISS file ``index_file`` (``index.faiss`` ->
    ``index.gemm.npy``, ``index.gemm_norms.npz``)."""
    stem = Path(index_file).stem
    return f"{stem}.gemm.npy", f"{stem}.gemm_norms.npz"


def save_operand(operand: GemmOperand, folder: Path, index_file: str) -> None:
    """Write the operand of the FAISS file ``index_file`` into ``folder``."""
    matrix, norms = operand_files(index_file)
    np.save(folder / matrix, operand.augmented)
    np.savez(folder / norms, mean=operand.mean, sq_norms=operand.sq_norms)


def load_operand(folder: Path, index_file: str, n: int, dim: int) -> GemmOperand:
    """The stored operand of ``index_file``, its matrix memory-mapped read-only; ValueError
    when its shapes are not those of an (n, dim) index."""
    matrix, norms = operand_files(index_file)
    augmented = np.load(folder / matrix, mmap_mode="r")
    with np.load(folder / norms) as arrays:
        mean, sq_norms = arrays["mean"], arrays["sq_norms"]
    if (augmented.shape != (n, dim + 2) or augmented.dtype != np.float32
            or mean.shape != (dim,) or sq_norms.shape != (n,)):
        raise ValueError(
            f"GEMM operand {matrix} is {augmented.shape} {augmented.dtype}, mean {mean.shape}, "
            f"norms {sq_norms.shape}; the index is {n} x {dim}"
        )
    return GemmOperand(mean, augmented, sq_norms)
