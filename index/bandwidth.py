"""Choose the kernel bandwidth sigma: fixed, or a local scale from nearest-neighbour distances."""

from __future__ import annotations

import math

import faiss
import numpy as np

from latentsieve.index.errors import StoreError
from latentsieve.index.manifest import SIGMA_MAX, SIGMA_MIN, Bandwidth, check_sigma

# Chosen by docs/evidence.md: on both demo models k = 1 is within the best sigmas of the sweep
# and the earlier default, k = 10, loses most of the correlation with quality.
AUTO_K = 1
AUTO_SAMPLE = 2048
AUTO_SEED = 0


def parse_sigma(text: str | float) -> float | None:
    """``auto`` -> None; otherwise a finite float > 0."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return None
    try:
        return check_sigma(float(text))
    except ValueError as exc:
        raise StoreError(
            f"--sigma must be a finite number in [1e-100, 1e100] or 'auto', got {text!r}"
        ) from exc


def knn_median_sigma(
    latents: np.ndarray, k: int = AUTO_K, sample_size: int = AUTO_SAMPLE, seed: int = AUTO_SEED
) -> Bandwidth:
    """sigma = median over a sample of the distance to the k-th nearest other training latent.

    latents: (N, d) float32. A local scale: a latent among its k neighbours gets kernel weights
    near exp(-1/2), so densities separate crowded and sparse regions instead of all scoring the
    same as they would under a global scale (the data's diameter).
    """
    n = latents.shape[0]
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample_size, n), replace=False))
    index = faiss.IndexFlatL2(latents.shape[1])
    index.add(latents)
    squared, ids = index.search(np.ascontiguousarray(latents[rows]), k + 1)
    # Drop each row's own entry (it need not come first when duplicates tie at distance 0).
    own = ids == rows[:, None]
    has_own = own.any(axis=1)
    kth = np.where(has_own, squared[:, k], squared[:, k - 1])
    distance = float(np.median(np.sqrt(np.maximum(kth, 0.0))))
    if not math.isfinite(distance) or not SIGMA_MIN <= distance <= SIGMA_MAX:
        raise StoreError(
            f"--sigma auto: the median distance to the {k}-th neighbour is {distance}; "
            "most latents have k identical copies. Pass --sigma explicitly."
        )
    return Bandwidth(
        sigma=distance,
        rule="knn_median",
        k=k,
        sample_size=int(rows.size),
        seed=seed,
        detail=(
            f"median over {rows.size} sampled training latents of the L2 distance to their "
            f"{k}-th nearest other training latent (exact FAISS search)"
        ),
    )


def choose_bandwidth(spec: str | float, latents: np.ndarray, k: int = AUTO_K) -> Bandwidth:
    """The --sigma option: a fixed value or 'auto' (knn_median_sigma with ``k`` neighbours)."""
    sigma = parse_sigma(spec)
    if sigma is None:
        return knn_median_sigma(latents, k)
    return Bandwidth(sigma=sigma, rule="fixed", detail="given with --sigma")
