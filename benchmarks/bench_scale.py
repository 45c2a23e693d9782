"""Certified IVF scoring at scale, against exact (flat) scoring run in the same process.

    python benchmarks/bench_scale.py                       # N 1,000,000 at d 64 (and --dims 512)
    python benchmarks/bench_scale.py --n 200000 --dims 64 512 --queries 300

Data: ``--clusters`` clusters, each a Gaussian on its own random ``--intrinsic``-dimensional
subspace (unit variance per axis) around a centre ~ N(0, I), plus N(0, 0.05^2) noise in every
dimension: latents that lie near low-dimensional pieces, as a generator's do. Queries are fresh
draws of the same mixture (held out). Two bandwidths:

- 1-NN scale: the product's ``--sigma auto`` (median distance to the nearest training latent);
- cluster scale: sqrt(intrinsic), a cluster's RMS radius, where the other clusters still carry
  a few percent of the mass.

For each: flat (the exact GEMM engine) and certified IVF timed interleaved (best of
``--repeats``), the certified half-width (max over queries) and the true error against flat
(max), lists probed, and the float16 store's shift against the float32 store. Memory: the bytes
each scorer holds and the process's resident growth while building it (flat: until its first
score), against the float32 bytes of the latents (N d 4). Printed as a Markdown table
(docs/performance.md).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
from collections.abc import Callable

import numpy as np

from latentsieve.index.bandwidth import knn_median_sigma
from latentsieve.workers.certified import CertifiedIVF
from latentsieve.workers.density import DensityEngine


def manifold_clusters(
    rng: np.random.Generator, n: int, dim: int, clusters: int, intrinsic: int, noise: float
) -> np.ndarray:
    """n float32 rows: cluster centre + a random intrinsic-dim Gaussian + isotropic noise."""
    centres = rng.normal(0.0, 1.0, (clusters, dim))
    bases = np.linalg.qr(rng.normal(size=(clusters, dim, intrinsic)))[0]
    picks = rng.integers(0, clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):
        pick = picks[start : start + 50_000]
        along = np.einsum("ndk,nk->nd", bases[pick], rng.normal(size=(pick.shape[0], intrinsic)))
        out[start : start + pick.shape[0]] = (
            centres[pick] + along + noise * rng.normal(size=(pick.shape[0], dim))
        )
    return out


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def built(make: Callable[[], object]) -> tuple[object, float, int]:
    """(object, seconds, resident growth in bytes) of one construction."""
    gc.collect()
    before = resident_bytes()
    start = time.perf_counter()
    made = make()
    seconds = time.perf_counter() - start
    gc.collect()
    return made, seconds, resident_bytes() - before


def run(args: argparse.Namespace, dim: int) -> list[str]:
    rng = np.random.default_rng(args.seed)
    data = manifold_clusters(rng, args.n + args.queries, dim, args.clusters, args.intrinsic, 0.05)
    latents, queries = data[: args.n], data[args.n :]
    del data
    stored = latents.nbytes
    nlist = args.nlist or int(2 ** round(math.log2(2.0 * math.sqrt(args.n))))
    sigmas = {"1-NN": knn_median_sigma(latents).sigma, "cluster": math.sqrt(args.intrinsic)}
    def warm_flat() -> DensityEngine:  # the engine prepares its GEMM operand on first use
        engine = DensityEngine(latents)
        engine.log_density(queries[:1], 1.0)
        return engine

    flat, flat_s, flat_rss = built(warm_flat)
    ivf, build_s, ivf_rss = built(lambda: CertifiedIVF.build(latents, nlist, seed=args.seed))
    half, half_s, half_rss = built(
        lambda: CertifiedIVF.build(latents, nlist, seed=args.seed, storage="float16")
    )
    assert isinstance(flat, DensityEngine)
    assert isinstance(ivf, CertifiedIVF) and isinstance(half, CertifiedIVF)
    rows = []
    for scale, sigma in sigmas.items():
        def exact(sigma: float = sigma) -> np.ndarray:
            return flat.log_density(queries, sigma).log_density

        def certified(sigma: float = sigma) -> object:
            return ivf.score(queries, sigma, max_error=args.max_error)

        flat_t, certified_t = math.inf, math.inf
        for _ in range(args.repeats):  # interleaved: noise hits both alike
            t, want = best_of(exact, 1)
            flat_t = min(flat_t, t)
            t, got = best_of(certified, 1)
            certified_t = min(certified_t, t)
        assert isinstance(want, np.ndarray)
        error = np.abs(got.estimate - want)  # type: ignore[attr-defined]
        inside = bool(np.all(error <= got.half_width + 1e-4))  # type: ignore[attr-defined]
        fp16 = half.score(queries, sigma, max_error=args.max_error)
        shift = float(np.abs(fp16.estimate - got.estimate).max())  # type: ignore[attr-defined]
        rows.append(
            f"| {args.n:,} | {dim} | {nlist} | {scale} ({sigma:.3g}) | {flat_t:.2f} "
            f"| {certified_t:.2f} | **{flat_t / certified_t:.2f}x** "
            f"| {got.half_width.max():.4f} | {error.max():.1e} | {inside} "  # type: ignore[attr-defined]
            f"| {got.lists_probed.mean():.1f} / {got.lists_probed.max()} "  # type: ignore[attr-defined]
            f"| {shift:.1e} |"
        )
    rows.append(
        f"| {args.n:,} | {dim} | memory | stored float32 {stored / 2**20:.0f} MiB | flat RSS "
        f"+{flat_rss / 2**20:.0f} MiB ({flat_rss / stored:.2f}x) | certified f32 "
        f"{ivf.nbytes / 2**20:.0f} MiB ({ivf.nbytes / stored:.2f}x), RSS +{ivf_rss / 2**20:.0f} "
        f"MiB | certified f16 {half.nbytes / 2**20:.0f} MiB ({half.nbytes / stored:.2f}x), RSS "
        f"+{half_rss / 2**20:.0f} MiB | build {build_s:.0f} s (f16 {half_s:.0f} s), flat "
        f"{flat_s:.1f} s | | | | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--clusters", type=int, default=400)
    parser.add_argument("--intrinsic", type=int, default=6)
    parser.add_argument("--nlist", type=int, default=0, help="0: 2 sqrt(N), a power of two")
    parser.add_argument("--max-error", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| N | d | lists | sigma | flat s | certified s | speed-up | half-width max "
          "| true error max | inside | lists probed mean / max | float16 shift |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for dim in args.dims:
        for row in run(args, dim):
            print(row, flush=True)


if __name__ == "__main__":
    main()
