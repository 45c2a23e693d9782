"""W1 through the gateway in process, and over Redis Streams with 1 and 2 workers.

The same W1 store as ``bench_http.py`` (N = 60,000 x 512, sigma 20) is served three ways in one
run, each measured the same way:

- ``embedded``: ``latentsieve serve`` scoring in its own process (the README's default);
- ``1 worker`` / ``2 workers``: ``latentsieve serve --compute workers --redis URL`` with that
  many ``latentsieve worker`` processes on a private ``redis-server``.

For each: throughput of 2,000 fresh latents as 8 concurrent ``POST /score`` of 250 (ratio to
NumPy ``q @ Z.T`` of the same shapes, timed here: target <= 1.5x for embedded and for 1 worker);
p50/p99 of 16-latent requests at concurrency 8; the computed batch sizes (the workers' or the
gateway's ``latentsieve_batch_size`` histogram over that phase); and the Redis hop: the p50 of
one-latent requests one at a time, against embedded. Every latent is fresh (no cache hits).

    python benchmarks/bench_distributed.py            # full size: docs/performance.md section
    python benchmarks/bench_distributed.py --quick    # N = 6,000 smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_http import (  # benchmarks/ is on sys.path when run as a script
    FULL,
    MODEL,
    QUICK,
    QueryStream,
    Server,
    Sizes,
    build_store,
    clean_env,
    clustered,
    free_port,
    latentsieve,
    numpy_baseline,
    percentile_ms,
    run_concurrently,
    score_body,
    workdir,
)
from report import PAGE, write_section

THROUGHPUT_TARGET = 1.5
HOP_REQUESTS = 100


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def workers(store: Path, redis_url: str, count: int, folder: Path) -> Iterator[list[str]]:
    """``count`` worker processes; yields their metrics URLs once each reports up."""
    processes: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for index in range(count):
            port = free_port()
            log = (folder / f"worker-{index}.log").open("wb")
            processes.append(subprocess.Popen(
                [*latentsieve(), "worker", "--store", str(store), "--redis", redis_url,
                 "--metrics-port", str(port), "--device", "cpu"],
                stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
            ))
            urls.append(f"http://127.0.0.1:{port}/metrics")
        for url, process in zip(urls, processes, strict=True):
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"a worker exited; see {folder}")
                with contextlib.suppress(httpx.TransportError):
                    if "latentsieve_worker_up{" in httpx.get(url, timeout=2).text:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("a worker did not start in 300 s")
                time.sleep(0.2)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def batch_histogram(urls: list[str]) -> dict[float, float]:
    """Cumulative ``latentsieve_batch_size_bucket{model="w1"}`` counts over ``urls``."""
    counts: dict[float, float] = {}
    pattern = re.compile(
        rf'^latentsieve_batch_size_bucket\{{le="([^"]+)",model="{MODEL}"\}} (\S+)$', re.M
    )
    for url in urls:
        for bound, value in pattern.findall(httpx.get(url, timeout=10).text):
            key = float("inf") if bound == "+Inf" else float(bound)
            counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def describe_batches(before: dict[float, float], after: dict[float, float]) -> str:
    """Computed batches by size bucket between two readings, e.g. '<=16: 40, <=32: 12'."""
    bounds = sorted(after)
    cumulative = [after[b] - before.get(b, 0.0) for b in bounds]
    parts, previous = [], 0.0
    for bound, total in zip(bounds, cumulative, strict=True):
        count = total - previous
        previous = total
        if count:
            label = "+Inf" if bound == float("inf") else f"{bound:g}"
            parts.append(f"<={label}: {count:.0f}")
    return ", ".join(parts) or "none"


async def measure(url: str, metrics: list[str], sizes: Sizes, stream: QueryStream) -> dict[
    str, Any
]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        batches = sizes.queries // sizes.batch
        await run_concurrently(
            client, [score_body(stream.take(sizes.batch)) for _ in range(batches)], batches
        )
        best = float("inf")
        for _ in range(sizes.repeats):
            bodies = [score_body(stream.take(sizes.batch)) for _ in range(batches)]
            _, wall, _ = await run_concurrently(client, bodies, batches)
            best = min(best, wall)
        results["throughput_s"] = best

        before = batch_histogram(metrics)
        bodies = [score_body(stream.take(sizes.small_batch))
                  for _ in range(sizes.requests_per_level)]
        latencies, wall, _ = await run_concurrently(client, bodies, 8)
        results["small"] = {
            "p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
            "requests_per_s": len(bodies) / wall,
            "batches": describe_batches(before, batch_histogram(metrics)),
        }
        bodies = [score_body(stream.take(1)) for _ in range(HOP_REQUESTS)]
        latencies, _, _ = await run_concurrently(client, bodies, 1)
        results["single_p50_ms"] = percentile_ms(latencies, 50)
    return results


def table(sizes: Sizes, numpy_s: float, rows: dict[str, dict[str, Any]], command: str) -> str:
    embedded_hop = rows["embedded"]["single_p50_ms"]
    lines = [
        "## Distributed: embedded against Redis workers",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores with "
        f"`{command}`. W1 (N = {sizes.n:,}, d = {sizes.d}, sigma 20, flat); NumPy `q @ Z.T` "
        f"for {sizes.queries:,} latents: {numpy_s * 1e3:.1f} ms. Gateway, workers, Redis and "
        "the client share this machine's cores.",
        "",
        f"| compute | {sizes.queries:,} latents (8 x {sizes.batch}) | vs NumPy | target "
        f"| 16-latent p50 / p99 at c8 | requests/s | computed batches (size: count) "
        "| 1-latent p50 | Redis hop |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for label, row in rows.items():
        ratio = row["throughput_s"] / numpy_s
        target = f"<= {THROUGHPUT_TARGET}x" if label in ("embedded", "1 worker") else ""
        hop = row["single_p50_ms"] - embedded_hop
        lines.append(
            f"| {label} | {row['throughput_s'] * 1e3:.1f} ms | {ratio:.2f}x | {target} "
            f"| {row['small']['p50_ms']:.1f} / {row['small']['p99_ms']:.1f} ms "
            f"| {row['small']['requests_per_s']:,.0f} | {row['small']['batches']} "
            f"| {row['single_p50_ms']:.2f} ms | "
            + ("" if label == "embedded" else f"{hop:+.2f} ms") + " |"
        )
    lines += [
        "",
        "The Redis hop is the extra p50 of a one-latent request sent alone (XADD, a worker's "
        "XREADGROUP, its reply XADD and the gateway's XREAD) over scoring it in process. "
        "Computed batches are counted where the GEMM runs (the gateway embedded, else the "
        "workers; a batch per shard). On a 2-core machine a second worker competes with the "
        "first for the same cores, so it adds no throughput here; on separate GPUs it would.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 6,000 smoke run")
    parser.add_argument("--out", type=Path, default=PAGE, help="results page (a section of it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    command = "python benchmarks/bench_distributed.py" + (" --quick" if args.quick else "")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, sizes.d), dtype=np.float32)
    training = clustered(sizes.n, sizes.d, rng, centres)
    stream = QueryStream(sizes.d, centres)
    numpy_s = numpy_baseline(stream.take(sizes.queries), training, sizes.repeats + 1)
    rows: dict[str, dict[str, Any]] = {}
    with workdir(args.keep) as folder:
        store = folder / "store"
        build_store(store, training)
        with Server(store, folder / "embedded.log") as server:
            server.wait_ready()
            rows["embedded"] = asyncio.run(
                measure(server.url, [f"{server.url}/metrics"], sizes, stream)
            )
        for count in (1, 2):
            with (
                redis_server(folder) as redis_url,
                workers(store, redis_url, count, folder) as metrics,
                Server(store, folder / f"gateway-{count}.log",
                       args=("--compute", "workers", "--redis", redis_url)) as server,
            ):
                server.wait_ready()
                label = "1 worker" if count == 1 else f"{count} workers"
                rows[label] = asyncio.run(measure(server.url, metrics, sizes, stream))
    report = table(sizes, numpy_s, rows, command)
    print(report)
    write_section("distributed", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
