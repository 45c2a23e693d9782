"""Certified IVF scoring at scale, against exact (flat) scoring run in the same process.

    python benchmarks/bench_scale.py                       # N 1,000,000 at d 64, both datasets
    python benchmarks/bench_scale.py --n 200000 --dims 64 512 --data full --queries 300

Two datasets (``--data``), each with held-out queries drawn from the same mixture:

- ``low``: ``--clusters`` clusters, each a Gaussian on its own random ``--intrinsic``-dimensional
  subspace (unit variance per axis) around a centre ~ N(0, I), plus N(0, 0.05^2) noise in every
  dimension: latents that lie near low-dimensional pieces, as a generator's do;
- ``full``: ``--clusters`` Gaussian clusters around centres ~ N(0, I) that fill every dimension,
  each with its own per-coordinate scales, log-uniform in ``--scales`` (default 0.1 to 0.6: a
  cluster's RMS radius is then about the ``low`` clusters' at d = 64).

Three bandwidths each:

- 1-NN scale: the product's ``--sigma auto`` (median distance to the nearest training latent);
- cluster scale: a cluster's RMS radius (sqrt(intrinsic); for ``full`` sqrt(d E[scale^2])),
  where the other clusters still carry a few percent of the mass;
- broad: ``--broad`` (8), where every cluster counts.

For each: flat (the exact GEMM engine) and certified IVF timed interleaved (best of
``--repeats``), the certified half-width (max over queries) and the true error against flat
(max), the share of rows the cost model sent to the dense fallback, lists probed (a dense row
sums every list), and the float16 store's shift against the float32 store. Flat's own time
depends on sigma: where its rounding model needs float64 (narrow sigma) it runs a float64 GEMM.
Memory: the resident growth of a fresh process that opens each stored index as the service does
and scores 50 queries at the 1-NN scale (a dense row makes the dense operand, a second copy of
the latents), against the float32 bytes of the latents (N d 4). Printed as a Markdown table
(docs/performance.md).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from report import PAGE, write_section  # benchmarks/ is on sys.path when run as a script

from latentsieve.index.bandwidth import knn_median_sigma
from latentsieve.index.gemm_operand import gemm_operand, load_operand, save_operand
from latentsieve.index.ivf_lists import IvfLists
from latentsieve.workers.certified import CertifiedIVF
from latentsieve.workers.density import DensityEngine

FRONTIER = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)  # max_error values of the frontier row


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


def full_clusters(
    rng: np.random.Generator, n: int, dim: int, clusters: int, scales: tuple[float, float]
) -> np.ndarray:
    """n float32 rows: cluster centre ~ N(0, I) + per-coordinate scales (log-uniform in
    ``scales``, one set per cluster) times N(0, I): clusters that fill every dimension."""
    low, high = (math.log(value) for value in scales)
    centres = rng.normal(0.0, 1.0, (clusters, dim)).astype(np.float32)
    spread = np.exp(rng.uniform(low, high, (clusters, dim))).astype(np.float32)
    picks = rng.integers(0, clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        pick = picks[start : start + 100_000]
        noise = rng.standard_normal((pick.shape[0], dim), dtype=np.float32)
        out[start : start + pick.shape[0]] = centres[pick] + spread[pick] * noise
    return out


def cluster_radius(dim: int, scales: tuple[float, float]) -> float:
    """RMS radius of a ``full`` cluster: sqrt(d E[s^2]), s log-uniform in ``scales``."""
    low, high = scales
    return math.sqrt(dim * (high**2 - low**2) / (2.0 * math.log(high / low)))


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


def serving_growth(kind: str, folder: Path, sigma: float) -> int:
    """Resident growth of a fresh process that opens the stored index the way the service does
    (flat: the float32 latents and the stored GEMM operand memory-mapped; ivf: the lists with
    their offsets memory-mapped) and scores 50 queries: what serving adds."""
    out = subprocess.run(
        [sys.executable, __file__, "--serve-memory", kind, str(folder), str(sigma)],
        capture_output=True, text=True, check=True,
    ).stdout
    return int(out.split()[-1])


def measure_serving(kind: str, folder: Path, sigma: float) -> int:
    queries = np.load(folder / "queries.npy")
    gc.collect()
    before = resident_bytes()
    index: object  # kept alive while measured: what it holds after scoring counts
    if kind == "flat":
        latents = np.load(folder / "latents.npy", mmap_mode="r")
        operand = load_operand(folder, "latents.faiss", *latents.shape)
        index = DensityEngine(latents, operand=operand)
        index.log_sum(queries, sigma)
    else:
        index = CertifiedIVF(IvfLists.load(folder))
        index.score(queries, sigma, max_error=0.05)
    gc.collect()
    grown = resident_bytes() - before
    del index
    return grown


def run(args: argparse.Namespace, dim: int, kind: str) -> list[str]:
    rng = np.random.default_rng(args.seed)
    total = args.n + args.queries
    if kind == "low":
        data = manifold_clusters(rng, total, dim, args.clusters, args.intrinsic, 0.05)
        radius = math.sqrt(args.intrinsic)
    else:
        data = full_clusters(rng, total, dim, args.clusters, tuple(args.scales))
        radius = cluster_radius(dim, tuple(args.scales))
    latents, queries = data[: args.n], data[args.n :]
    del data
    stored = latents.nbytes
    nlist = args.nlist or int(2 ** round(math.log2(2.0 * math.sqrt(args.n))))
    sigmas = {"1-NN": knn_median_sigma(latents).sigma, "cluster": radius, "broad": args.broad}
    def warm_flat() -> DensityEngine:  # the engine prepares its GEMM operand on first use
        engine = DensityEngine(latents)
        engine.log_sum(queries[:1], 1.0)
        return engine

    flat, _, _ = built(warm_flat)
    ivf, build_s, _ = built(lambda: CertifiedIVF.build(latents, nlist, seed=args.seed))
    half, half_s, _ = built(
        lambda: CertifiedIVF.build(latents, nlist, seed=args.seed, storage="float16")
    )
    assert isinstance(flat, DensityEngine)
    assert isinstance(ivf, CertifiedIVF) and isinstance(half, CertifiedIVF)
    start = time.perf_counter()
    ivf.prepare_dense()  # the fallback's operand, otherwise made by the first dense row
    half.prepare_dense()
    dense_s = (time.perf_counter() - start) / 2.0
    rows = []
    flat_times: dict[str, float] = {}
    for scale, sigma in sigmas.items():
        def exact(sigma: float = sigma) -> np.ndarray:
            return flat.log_sum(queries, sigma).log_sum

        def certified(sigma: float = sigma) -> object:
            return ivf.score(queries, sigma, max_error=args.max_error)

        flat_t, certified_t = math.inf, math.inf
        for _ in range(args.repeats):  # interleaved: noise hits both alike
            t, want = best_of(exact, 1)
            flat_t = min(flat_t, t)
            t, got = best_of(certified, 1)
            certified_t = min(certified_t, t)
        flat_times[scale] = flat_t
        assert isinstance(want, np.ndarray)
        error = np.abs(got.estimate - want)  # type: ignore[attr-defined]
        inside = bool(np.all(error <= got.half_width + 1e-4))  # type: ignore[attr-defined]
        fp16 = half.score(queries, sigma, max_error=args.max_error)
        shift = float(np.abs(fp16.estimate - got.estimate).max())  # type: ignore[attr-defined]
        rows.append(
            f"| {kind} | {args.n:,} | {dim} | {nlist} | {scale} ({sigma:.3g}) | {flat_t:.2f} "
            f"| {certified_t:.2f} | **{flat_t / certified_t:.2f}x** "
            f"| {got.half_width.max():.4f} | {error.max():.1e} | {inside} "  # type: ignore[attr-defined]
            f"| {got.dense.mean():.2f} "  # type: ignore[attr-defined]
            f"| {got.lists_probed.mean():.1f} / {got.lists_probed.max()} "  # type: ignore[attr-defined]
            f"| {shift:.1e} |"
        )
    # The frontier at the cluster scale: what each bound costs.
    sigma = sigmas["cluster"]
    frontier = []
    for bound in FRONTIER:
        seconds, result = best_of(
            lambda bound=bound: ivf.score(queries, sigma, max_error=bound), 1
        )
        frontier.append(
            f"{bound:g}: {result.lists_probed.mean():.1f} lists, "  # type: ignore[attr-defined]
            f"dense {result.dense.mean():.2f}, "  # type: ignore[attr-defined]
            f"{flat_times['cluster'] / seconds:.2f}x"
        )
    rows.append(f"| {kind} | {args.n:,} | {dim} | frontier | cluster, max_error: lists probed "
                f"(mean of {nlist}), dense share, speed-up | " + " | ".join(frontier) + " |"
                + " |" * (9 - len(frontier)))
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "latents.npy", latents)
        save_operand(gemm_operand(latents), Path(folder), "latents.faiss")  # as a flat build does
        np.save(Path(folder) / "queries.npy", queries[:50])
        memory = {"flat": serving_growth("flat", Path(folder), sigmas["1-NN"])}
        for name, index in (("float32", ivf), ("float16", half)):
            index.lists.save(Path(folder))
            memory[f"ivf {name}"] = serving_growth("ivf", Path(folder), sigmas["1-NN"])
    rows.append(
        f"| {kind} | {args.n:,} | {dim} | memory | float32 latents {stored / 2**20:.0f} MiB | "
        + " | ".join(f"{name}: +{grown / 2**20:.0f} MiB ({grown / stored:.2f}x)"
                     for name, grown in memory.items())
        + f" | build {build_s:.0f} s (float16 {half_s:.0f} s) | dense operand {dense_s:.1f} s "
        "| | | | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--clusters", type=int, default=400)
    parser.add_argument("--intrinsic", type=int, default=6, help="low: each piece's dimension")
    parser.add_argument("--scales", type=float, nargs=2, default=[0.1, 0.6],
                        help="full: range of the per-coordinate scales (log-uniform)")
    parser.add_argument("--data", nargs="+", choices=["low", "full"], default=["low", "full"])
    parser.add_argument("--broad", type=float, default=8.0, help="the broad sigma")
    parser.add_argument("--nlist", type=int, default=0, help="0: 2 sqrt(N), a power of two")
    parser.add_argument("--max-error", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PAGE,
                        help="results page (its 'scale' section); none with --no-page")
    parser.add_argument("--no-page", dest="out", action="store_const", const=None)
    parser.add_argument("--serve-memory", nargs=3, metavar=("KIND", "FOLDER", "SIGMA"),
                        help=argparse.SUPPRESS)  # the child process of serving_growth
    args = parser.parse_args()
    if args.serve_memory:
        kind, folder, sigma = args.serve_memory
        print(measure_serving(kind, Path(folder), float(sigma)))
        return
    load_before = os.getloadavg()[0]
    lines = [
        "| data | N | d | lists | sigma | flat s | certified s | speed-up | half-width max "
        "| true error max | inside | dense rows | lists probed mean / max | float16 shift |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: "
        "| ---: | ---: |",
    ]
    for line in lines:
        print(line)
    for dim in args.dims:
        for kind in args.data:
            for row in run(args, dim, kind):
                print(row, flush=True)
                lines.append(row)
    header = (
        "## Certified approximate scoring at scale (`--kind ivf`)\n\n"
        f"Generated by `python benchmarks/bench_scale.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} "
        f"UTC; {os.cpu_count()} CPU cores ({platform.machine()}), NumPy {np.__version__}; "
        f"1-minute load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after. "
        f"{args.queries} held-out queries, max_error {args.max_error} nats, times best of "
        f"{args.repeats} (flat and certified interleaved). Data and columns: the benchmark's "
        "docstring. *inside*: every true error within its bound (flat's own 1e-4 allowed); "
        "*dense rows*: share of queries the cost model answered by the dense fallback; "
        "*float16 shift*: largest |score with float16 offsets - score with float32 offsets|. "
        "Memory rows: resident growth of a fresh process that opens the stored index as the "
        "service does and scores 50 queries, against the float32 latents' bytes.\n\n"
    )
    if args.out is not None:
        write_section("scale", header + "\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
