"""W1 and W2 on whatever device ``--device`` resolves to (a GPU when PyTorch sees one).

    python benchmarks/bench_gpu.py [--device auto|cpu|cuda[:I]] [--quick] [--w2-n N]

- W1 = N 60,000 training latents, d 512, 2,000 queries, sigma 20, the clustered data of
  ``bench_density.py``.
- W2 = N 20,000 unit-variance Gaussian training latents of d = 4x64x64 = 16,384, sigma 20,
  64 queries, the data of ``bench_sd.py``: fresh latents (unit Gaussian: the kernel is flat) and
  near-duplicates (a training latent + 0.5 N(0, I)). ``--w2-n`` shrinks N.

The engine (``DensityEngine(device=...)``, the path ``serve --device``, ``worker --device`` and
``score --device`` use) is timed against floors on the same device in the same process: a
float32 ``q @ Z.T`` in torch (both operands already on the device; ``.item()`` brings a result
to the host, as scores are), and for W2 also the float64 ``q @ Z.T`` (Z kept in float64 on the
device: what a float64 path there would cost at least). Each time is the best of
``--repeats``, every row of a workload interleaved (CUDA timings synchronise). The engine's
path per row is printed (bits: rows): 32 = float32 GEMM on the device; 64 (float64 GEMM),
1 (float32 GEMM with the dominant terms recomputed in float64) and 0 (exact terms) run on the
CPU with NumPy whatever the device (workers/density.py). Scores are checked against float64
references on a query subset. ``--quick`` (W1 N 6,000 x 500 queries, W2 N 2,000 x 16 queries)
is the smoke run; on a host without a GPU, ``--device cpu`` measures the CPU and says so.
Writes the ``gpu`` section of docs/performance.md (``--no-page``: print only).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from bench_density import cdist_reference, clustered
from bench_sd import reference as w2_reference
from report import PAGE, write_section  # benchmarks/ is on sys.path when run as a script

from latentsieve.workers.density import DensityEngine
from latentsieve.workers.devices import resolve_device
from latentsieve.workers.log_sums import merge_log_sums

SIGMA = 20.0
W2_DIM, W2_QUERIES, W2_CHECKED = 16_384, 64, 4


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall time of one ``fn()``, synchronising a CUDA device before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def best_interleaved(runs: dict[str, Callable[[], object]], device: str,
                     repeats: int) -> dict[str, float]:
    """Best time of each run over ``repeats`` rounds, every run once per round (after one
    warm-up round): the machine's noise hits every row alike."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run, device))
    return best


def paths(precision: np.ndarray) -> str:
    bits, counts = np.unique(precision, return_counts=True)
    return ", ".join(f"{b}: {c}" for b, c in zip(bits.tolist(), counts.tolist(), strict=True))


def w1(device: str, quick: bool, repeats: int) -> tuple[str, list[str]]:
    """W1's workload line and table rows."""
    n, dim, count = (6_000, 512, 500) if quick else (60_000, 512, 2_000)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, dim))
    latents, queries = clustered(rng, centres, n), clustered(rng, centres, count)
    engine = DensityEngine(latents, device=device)
    z = torch.from_numpy(latents).to(device)
    q = torch.from_numpy(queries).to(device)
    best = best_interleaved({
        "engine": lambda: engine.log_sum(queries, SIGMA).log_sum,
        "float32": lambda: (q @ z.T).sum().item(),
    }, device, repeats)
    scores = engine.log_sum(queries, SIGMA)
    subset = slice(0, 100)
    error = float(np.abs(
        merge_log_sums([scores.log_sum[subset]], None, n)
        - cdist_reference(queries[subset], latents, SIGMA)
    ).max())
    floor = best["float32"]
    rows = [
        f"| torch `q @ Z.T` float32, ({count:,} x {dim}) @ ({dim} x {n:,}) | "
        f"{floor * 1e3:,.1f} ms | {count / floor:,.0f} | **1.00x** | | |",
        f"| engine | {best['engine'] * 1e3:,.1f} ms | {count / best['engine']:,.0f} "
        f"| **{best['engine'] / floor:.2f}x** | {paths(scores.precision)} | {error:.1e} |",
    ]
    return f"W1: N {n:,}, d {dim}, {count:,} queries, sigma {SIGMA:g}, clustered", rows


def w2(device: str, quick: bool, repeats: int, n: int | None) -> tuple[str, list[str]]:
    """W2's workload line and table rows."""
    n = n or (2_000 if quick else 20_000)
    count = 16 if quick else W2_QUERIES
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((n, W2_DIM), dtype=np.float32)
    fresh = rng.standard_normal((count, W2_DIM), dtype=np.float32)
    near = latents[rng.integers(0, n, count)] + 0.5 * rng.standard_normal(
        (count, W2_DIM), dtype=np.float32
    )
    engine = DensityEngine(latents, device=device)
    z = torch.from_numpy(latents).to(device)
    q = torch.from_numpy(fresh).to(device)
    z64, q64 = z.double(), q.double()
    best = best_interleaved({
        "fresh": lambda: engine.log_sum(fresh, SIGMA).log_sum,
        "near": lambda: engine.log_sum(near, SIGMA).log_sum,
        "float32": lambda: (q @ z.T).sum().item(),
        "float64": lambda: (q64 @ z64.T).sum().item(),
    }, device, repeats)
    floor = best["float32"]
    rows = [
        f"| torch `q @ Z.T` float32, ({count} x {W2_DIM:,}) @ ({W2_DIM:,} x {n:,}) | "
        f"{floor * 1e3:,.1f} ms | {count / floor:,.0f} | **1.00x** | | |",
        f"| torch `q @ Z.T` float64 (Z kept in float64 on the device) "
        f"| {best['float64'] * 1e3:,.1f} ms | {count / best['float64']:,.0f} "
        f"| **{best['float64'] / floor:.2f}x** | | |",
    ]
    for name, queries, label in (("fresh", fresh, "engine, fresh latents"),
                                 ("near", near, "engine, near-duplicates")):
        scores = engine.log_sum(queries, SIGMA)
        want = w2_reference(queries[:W2_CHECKED], latents, SIGMA)
        error = float(np.abs(scores.log_sum[:W2_CHECKED] - want).max())
        rows.append(
            f"| {label} | {best[name] * 1e3:,.1f} ms | {count / best[name]:,.0f} "
            f"| **{best[name] / floor:.2f}x** | {paths(scores.precision)} | {error:.1e} |"
        )
    workload = (f"W2: N {n:,}, d 4x64x64 = {W2_DIM:,}, {count} queries, sigma {SIGMA:g}, "
                "unit Gaussian")
    return workload, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true",
                        help="W1 N 6,000 x 500 queries, W2 N 2,000 x 16 queries")
    parser.add_argument("--w2-n", type=int, default=None,
                        help="W2 training latents (default 20,000; 2,000 with --quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-page", action="store_true", help="print only")
    parser.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if gpu else platform.machine()
    header = ("| measurement | time | latents/s | vs float32 floor | paths (bits: rows) "
              "| max error (nats) |\n|---|---:|---:|---:|---|---:|")
    parts = []
    for workload, rows in (w1(device, args.quick, args.repeats),
                           w2(device, args.quick, args.repeats, args.w2_n)):
        parts.append(f"### {workload}\n\n{header}\n" + "\n".join(rows))
    load = os.getloadavg()[0]
    machine = (f"device {device} ({name}), torch {torch.__version__}; "
               f"{os.cpu_count()} CPU cores; 1-minute load average {load:.2f} at the end")
    command = "python benchmarks/bench_gpu.py" + (" --quick" if args.quick else "") + (
        f" --w2-n {args.w2_n}" if args.w2_n else "") + f" --device {args.device}"
    note = (
        "" if gpu else
        " **No GPU: these are CPU figures (the engine's CPU path against a torch matmul on "
        "the CPU); they say nothing of a GPU.** Run it on a GPU host (`--device cuda`) to "
        "measure one."
    )
    text = (
        "## W1 and W2 on the scoring device (`--device`)\n\n"
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine}."
        f"{note} Best of {args.repeats}, the rows of each workload interleaved; floors are "
        "torch matmuls on the same device in the same run. Errors: W1 against a float64 "
        f"cdist reference on 100 queries, W2 against float64 direct differences on the first "
        f"{W2_CHECKED} queries. Paths: 32 = float32 GEMM on the device; 64 (float64 GEMM), 1 "
        "(float32 GEMM, dominant terms recomputed exactly, certified) and 0 run on the CPU "
        "whatever the device. Data: the benchmark's docstring.\n\n" + "\n\n".join(parts) + "\n"
    )
    print(text)
    if not args.no_page:
        write_section("gpu", text, args.out)


if __name__ == "__main__":
    main()
