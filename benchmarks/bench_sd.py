"""W2: exact density scoring of Stable-Diffusion-shaped latents, against NumPy's GEMM.

    python benchmarks/bench_sd.py [--n 20000] [--repeats 3] [--before REV] [--no-page]

W2 = N 20,000 training latents of d = 4x64x64 = 16,384, unit-variance Gaussian, sigma 20 (the
paper's), a flat index, 64 query latents (one request's worth). The latents (1.3 GB) and the
engine's GEMM operand (1.3 GB) are shared by every engine below; the float64 floor row adds a
float64 copy (2.6 GB). ``--n`` shrinks N. The engine is measured directly, not through HTTP
(building and serving a 16,384-d flat version on this machine would time the index build, not
the scoring).

Two query sets: *fresh* latents (unit Gaussian: the kernel is flat, every training latent
carries the sum) and *near-duplicates* (a training latent + 0.5 N(0, I): one latent carries
it). Each time is the best of ``--repeats``, all rows interleaved in one process, and is
printed as a ratio to NumPy ``q @ Z.T`` in float32 of the same shapes:

- ``before``: the engine at ``--before`` (git revision, loaded from ``git show``): float64,
  re-centring every latent block in fresh float64 arrays per call;
- ``after``: the engine as it is (the path per row is printed);
- ``float32 forced`` (``tolerance=inf``): the calibrated float32 path. It is *not* certified
  here: its rounding model says 6e-5 nats (over the 2.5e-5 tolerance) and the proven
  per-term bound is 0.06 nats;
- ``float64 GEMM floor``: ``q @ Z.T`` in float64 with Z kept in float64 (twice the memory):
  the least any float64 method costs.

Errors are against a float64 log-sum-exp of direct differences on the first 4 queries.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from report import PAGE, write_section  # benchmarks/ is on sys.path when run as a script
from scipy.special import logsumexp

from latentsieve.index.gemm_operand import gemm_operand
from latentsieve.workers.density import (
    DEFAULT_TOLERANCE,
    UNIT_ROUNDOFF_F32,
    DensityEngine,
    float32_logit_bound,
    rounding_bound,
)

ROOT = Path(__file__).resolve().parents[1]
DIM, SIGMA, QUERIES, CHECKED = 16_384, 20.0, 64, 4
BEFORE = "6e87c38"  # the last revision before the dominant-terms path and the float64 tiles


def engine_at(revision: str) -> type | None:
    """``DensityEngine`` of workers/density.py at a git revision, or None without git."""
    try:
        source = subprocess.run(
            ["git", "show", f"{revision}:workers/density.py"], cwd=ROOT, capture_output=True,
            text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("density_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:workers/density.py", "exec"), module.__dict__)
    engine: type = module.DensityEngine
    return engine


def reference(queries: np.ndarray, latents: np.ndarray, sigma: float) -> np.ndarray:
    """Eq. (1) from float64 differences, 2,000 latents at a time: (Q, d) -> (Q,) nats."""
    out = np.empty(queries.shape[0])
    for k, query in enumerate(queries.astype(np.float64)):
        parts = []
        for start in range(0, latents.shape[0], 2000):
            diff = latents[start : start + 2000] - query
            parts.append(-np.einsum("ij,ij->i", diff, diff) / (2.0 * sigma * sigma))
        out[k] = logsumexp(np.concatenate(parts)) - math.log(latents.shape[0])
    return out


def paths(precision: np.ndarray) -> str:
    bits, counts = np.unique(precision, return_counts=True)
    return ", ".join(f"{b}: {c}" for b, c in zip(bits.tolist(), counts.tolist(), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="training latents (W2: 20,000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' engine")
    parser.add_argument("--no-page", action="store_true", help="print only")
    parser.add_argument("--out", type=Path, default=ROOT / PAGE,
                        help="results page (a section of it)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.n, DIM), dtype=np.float32)
    fresh = rng.standard_normal((QUERIES, DIM), dtype=np.float32)
    picked = rng.integers(0, args.n, QUERIES)
    near = latents[picked] + 0.5 * rng.standard_normal((QUERIES, DIM), dtype=np.float32)
    operand = gemm_operand(latents)
    after = DensityEngine(latents, operand=operand)
    forced32 = DensityEngine(latents, operand=operand, tolerance=math.inf)
    before_class = engine_at(args.before)
    before = None if before_class is None else before_class(latents, operand=operand)
    latents64 = latents.astype(np.float64)
    fresh64 = fresh.astype(np.float64)

    runs: dict[str, Callable[[], object]] = {
        "numpy": lambda: fresh @ latents.T,
        "after fresh": lambda: after.log_density(fresh, SIGMA),
        "after near": lambda: after.log_density(near, SIGMA),
        "float32 forced": lambda: forced32.log_density(fresh, SIGMA),
        "float64 floor": lambda: fresh64 @ latents64.T,
    }
    if before is not None:
        runs["before fresh"] = lambda: before.log_density(fresh, SIGMA)
        runs["before near"] = lambda: before.log_density(near, SIGMA)
    for run in runs.values():  # warm: BLAS threads, page cache
        run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(args.repeats):  # interleaved: noise on this machine hits every row alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)

    want = {"fresh": reference(fresh[:CHECKED], latents, SIGMA),
            "near": reference(near[:CHECKED], latents, SIGMA)}
    queries = {"fresh": fresh, "near": near}

    def row(label: str, name: str, engine: object | None, kind: str, proof: str) -> str:
        paths_cell = error_cell = ""
        if engine is not None:
            scores = engine.log_density(queries[kind], SIGMA)  # type: ignore[attr-defined]
            paths_cell = paths(scores.precision)
            error = np.abs(scores.log_density[:CHECKED] - want[kind]).max()
            error_cell = f"{error:.1e}"
        ratio = best[name] / best["numpy"]
        return (f"| {label} | {best[name] * 1e3:,.0f} ms | **{ratio:.2f}x** | {paths_cell} | "
                f"{error_cell} | {proof} |")

    q_norm = np.sqrt(((fresh.astype(np.float64) - after.mean) ** 2).sum(1))
    proven = float(float32_logit_bound(q_norm, after.radius, DIM, SIGMA).max())
    model = float(rounding_bound(q_norm, after.radius, DIM, SIGMA, UNIT_ROUNDOFF_F32).max())
    lines = [
        "| measurement | time | vs NumPy | paths (bits: rows) | max error (nats) | guarantee |",
        "|---|---:|---:|---|---:|---|",
        row(f"NumPy `q @ Z.T`, ({QUERIES} x {DIM:,}) @ ({DIM:,} x {args.n:,}) float32", "numpy",
            None, "fresh", ""),
    ]
    if before is not None:
        lines.append(row(f"engine before ({args.before}), fresh latents", "before fresh", before,
                         "fresh", "float64"))
    lines += [
        row("engine after, fresh latents", "after fresh", after, "fresh", "float64"),
    ]
    if before is not None:
        lines.append(row(f"engine before ({args.before}), near-duplicates", "before near", before,
                         "near", "float64"))
    lines += [
        row("engine after, near-duplicates", "after near", after, "near",
            f"proven <= {DEFAULT_TOLERANCE:g}"),
        row("float32 path forced (`tolerance=inf`), fresh", "float32 forced", forced32, "fresh",
            f"none: model {model:.1e}, proven {proven:.2f}"),
        row("float64 GEMM floor (Z kept in float64, 2x memory)", "float64 floor", None, "fresh",
            ""),
    ]
    table = "\n".join(lines)
    load = os.getloadavg()[0]
    cores = os.cpu_count()
    machine = (f"{cores} CPU cores ({platform.machine()}), no GPU; NumPy {np.__version__}; "
               f"1-minute load average {load:.2f} at the end")
    print(machine)
    print(table)
    if args.no_page:
        return
    header = (
        "## Stable-Diffusion shape (W2)\n\n"
        f"Written by `python benchmarks/bench_sd.py --n {args.n}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine}. W2: N = {args.n:,} unit-variance "
        f"Gaussian training latents of d = 4x64x64 = {DIM:,}, sigma {SIGMA:g}, {QUERIES} query "
        f"latents, best of {args.repeats} (all rows interleaved in one process). Measured on "
        "the engine directly, not through HTTP. Errors: the first "
        f"{CHECKED} queries against a float64 log-sum-exp of direct differences. Paths: "
        "64 = float64 GEMM, 32 = float32 GEMM, 1 = float32 GEMM with the dominant terms "
        "recomputed exactly (certified). Data and rows: the benchmark's docstring.\n\n"
    )
    write_section("sd", header + table, args.out)


if __name__ == "__main__":
    main()
