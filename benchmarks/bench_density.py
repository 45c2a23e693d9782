"""W1: exact density scoring at the paper's scale, against baselines run in the same process.

    python benchmarks/bench_density.py [--quick]   # density section of docs/performance.md

W1 = N 60,000 training latents, d 512, 2,000 queries, sigma 20, clustered synthetic data
(100 centres ~ N(0, I), points = centre + 0.5 N(0, I)). Every time is the best of ``--repeats``
runs, engine and baselines interleaved so that machine noise hits both alike (``SETTLE_S``
apart). Printed:

- engine latents/s, and engine time / NumPy ``q @ Z.T`` time (the GEMM any exact method does);
- speed-up over scikit-learn ``KernelDensity`` (exact: atol = rtol = 0) on a query subset,
  after checking both agree to 1e-4 nats (sklearn adds the Gaussian constant; it is removed);
- speed-up over a plain float64 ``cdist`` + log-sum-exp reference on a query subset.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from bench_http import SETTLE_S
from report import PAGE, write_section  # benchmarks/ is on sys.path when run as a script
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from sklearn.neighbors import KernelDensity

from latentsieve.workers.density import DensityEngine
from latentsieve.workers.log_sums import merge_log_sums


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    rows = centres[rng.integers(0, centres.shape[0], n)]
    return (rows + 0.5 * rng.standard_normal((n, centres.shape[1]))).astype(np.float32)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cdist_reference(queries: np.ndarray, latents: np.ndarray, sigma: float) -> np.ndarray:
    sq = cdist(queries.astype(np.float64), latents.astype(np.float64), "sqeuclidean")
    return np.asarray(logsumexp(-sq / (2 * sigma * sigma), axis=1) - math.log(latents.shape[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N 6,000 and 500 queries")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PAGE, help="results page (a section of it)")
    args = parser.parse_args()
    n, dim, queries_n, sigma = (6_000, 512, 500, 20.0) if args.quick else (60_000, 512, 2_000, 20.0)
    sklearn_n, cdist_n = (20, 100) if args.quick else (20, 200)

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, dim))
    latents = clustered(rng, centres, n)
    queries = clustered(rng, centres, queries_n)

    engine = DensityEngine(latents)
    scores = engine.log_sum(queries, sigma)
    density = merge_log_sums([scores.log_sum], None, n)  # eq. (1): the log-sum over N
    bits, counts = np.unique(scores.precision, return_counts=True)
    paths = dict(zip(bits.tolist(), counts.tolist(), strict=True))
    engine_times, matmul_times = [], []
    for _ in range(args.repeats):  # interleaved: noise on this machine hits both alike
        # SETTLE_S apart: OpenBLAS's threads spin ~0.1 s after the product, and the engine
        # runs its own threads on every core (workers/cores.py)
        time.sleep(SETTLE_S)
        engine_times.append(best_of(lambda: engine.log_sum(queries, sigma), 1))
        time.sleep(SETTLE_S)
        matmul_times.append(best_of(lambda: queries @ latents.T, 1))
    engine_s, matmul_s = min(engine_times), min(matmul_times)

    kde = KernelDensity(kernel="gaussian", bandwidth=sigma, atol=0, rtol=0).fit(latents)
    constant = 0.5 * dim * math.log(2 * math.pi * sigma * sigma)
    sub = queries[:sklearn_n]
    sklearn_scores = kde.score_samples(sub) + constant
    sklearn_err = float(np.abs(sklearn_scores - density[:sklearn_n]).max())
    sklearn_s = best_of(lambda: kde.score_samples(sub), 1) * queries_n / sklearn_n

    ref_sub = queries[:cdist_n]
    ref_scores = cdist_reference(ref_sub, latents, sigma)
    ref_err = float(np.abs(ref_scores - density[:cdist_n]).max())
    cdist_s = best_of(lambda: cdist_reference(ref_sub, latents, sigma), 1) * queries_n / cdist_n

    rows = [
        ("workload", f"N {n:,}, d {dim}, {queries_n:,} queries, sigma {sigma:g}"),
        ("machine", f"{platform.machine()}, {platform.processor() or 'cpu'}"),
        ("engine precision paths (bits: rows)", str(paths)),
        ("engine latents/s", f"{queries_n / engine_s:,.0f}"),
        ("NumPy q @ Z.T latents/s (same run)", f"{queries_n / matmul_s:,.0f}"),
        ("engine time / matmul time", f"{engine_s / matmul_s:.3f}  (target <= 1.3)"),
        ("scikit-learn KernelDensity latents/s", f"{queries_n / sklearn_s:,.1f}"),
        ("speed-up over scikit-learn", f"{sklearn_s / engine_s:,.0f}x  (target >= 100x)"),
        ("max |engine - sklearn| (nats)", f"{sklearn_err:.2e}  ({sklearn_n} queries)"),
        ("float64 cdist reference latents/s", f"{queries_n / cdist_s:,.1f}"),
        ("speed-up over float64 cdist", f"{cdist_s / engine_s:,.1f}x"),
        ("max |engine - cdist float64| (nats)", f"{ref_err:.2e}  ({cdist_n} queries)"),
    ]
    table = "| measure | value |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    if not args.quick:
        header = (
            "## Exact density scoring (W1)\n\nWritten by `python benchmarks/bench_density.py` "
            f"on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (best of {args.repeats}, engine and "
            "baselines interleaved in one process).\n\n"
        )
        write_section("density", header + table, args.out)
    assert sklearn_err < 1e-4 and ref_err < 1e-4, "engine disagrees with a reference"


if __name__ == "__main__":
    main()
