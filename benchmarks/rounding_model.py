"""Measure the float32 path's error against the rounding model that routes queries to it.

    python benchmarks/rounding_model.py [SEED]

For clustered data over d in [8, 2048], offsets, cluster scales and sigma from 0.03 to 1000, the
float32 path is forced for every row (tolerance = inf) and its error against the float64
reference is divided by ``rounding_bound`` with c = 1. docs/scoring.md records the largest
ratio; ``ROUNDING_SAFETY`` must stay above it.
"""

from __future__ import annotations

import sys

import numpy as np

from latentsieve.workers.density import (
    ROUNDING_SAFETY,
    UNIT_ROUNDOFF_F32,
    DensityEngine,
    log_sum_reference,
    rounding_bound,
)

ERROR_FLOOR = 3e-7  # float32 log/sum rounding that does not scale with the logits (nats)
CASES = [  # n, d, centre scale, offset, spread
    (3000, 512, 4.0, 0.0, 1.0),
    (2000, 64, 1.0, 0.0, 1.0),
    (2000, 16, 3.0, 50.0, 1.0),
    (1000, 512, 4.0, 10.0, 1.0),
    (2000, 2048, 1.0, 0.0, 1.0),
    (2000, 8, 100.0, 0.0, 1.0),
    (2000, 128, 0.0, 0.0, 1.0),
    (2000, 128, 10.0, 0.0, 0.01),
]


def clustered(
    rng: np.random.Generator, centres: np.ndarray, count: int, spread: float, offset: float
) -> np.ndarray:
    rows = centres[rng.integers(0, centres.shape[0], count)]
    rows = rows + rng.normal(0, spread, (count, centres.shape[1]))
    return (rows + offset).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    worst = 0.0
    print("| n | d | scale | offset | spread | sigma | max error (nats) | error / model |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, d, scale, offset, spread in CASES:
        centres = rng.normal(0, scale, (20, d))
        latents = clustered(rng, centres, n, spread, offset)
        far = rng.normal(0, scale * 3 + 1, (50, d)).astype(np.float32) + offset
        queries = np.concatenate([clustered(rng, centres, 100, spread, offset), far])
        engine = DensityEngine(latents, tolerance=np.inf)
        norms = np.sqrt(((queries.astype(np.float64) - engine.mean) ** 2).sum(1))
        for sigma in (1000.0, 100.0, 20.0, 5.0, 1.0, 0.3, 0.1, 0.03):
            got = engine.log_sum(queries, sigma).log_sum
            error = np.abs(got - log_sum_reference(queries, latents, sigma))
            model = rounding_bound(norms, engine.radius, d, sigma, UNIT_ROUNDOFF_F32)
            ratio = float((np.maximum(error - ERROR_FLOOR, 0) / (model / ROUNDING_SAFETY)).max())
            worst = max(worst, ratio)
            print(f"| {n} | {d} | {scale} | {offset} | {spread} | {sigma} | "
                  f"{error.max():.1e} | {ratio:.3f} |")
    print(f"\nlargest error / model (c = 1): {worst:.3f}; ROUNDING_SAFETY = {ROUNDING_SAFETY}")
    assert worst < ROUNDING_SAFETY, "the rounding model under-estimates the float32 error"


if __name__ == "__main__":
    main()
