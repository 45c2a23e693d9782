"""W1 through the gateway in process, and over Redis Streams with 1 and 2 workers.

The same W1 store as ``bench_http.py`` (N = 60,000 x 512, sigma 20) is served three ways in one
run, each measured the same way:

- ``embedded``: ``latentsieve serve`` scoring in its own process (the README's default);
- ``1 worker`` / ``2 workers``: ``latentsieve serve --compute workers --redis URL`` with that
  many ``latentsieve worker`` processes on a private ``redis-server``.

For each: throughput of 2,000 fresh latents as 8 concurrent ``POST /score`` of 250 (ratio to
NumPy ``q @ Z.T`` of the same shapes, timed here: target <= 1.5x for embedded and for 1 worker);
p50/p99 of 16-latent requests at concurrency 8; the computed batch sizes (the workers' or the
gateway's ``latentsieve_batch_size`` histogram over that phase); the Redis hop: the p50 of
one-latent requests one at a time, against embedded. Then, with the three configurations up
at once, rounds of sequential requests of 500 latents, one configuration after the other (the
order rotated each round), each request between two NumPy ``q @ Z.T`` of its own latents (the
faster is its floor): the median of the per-request ratios (target <= 1.3x through one worker)
and the fastest request over the fastest floor. Every latent is fresh (no cache hits).

    python benchmarks/bench_distributed.py            # full size: docs/performance.md section
    python benchmarks/bench_distributed.py --quick    # N = 6,000 smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
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
    QUICK,
    SETTLE_S,
    QueryStream,
    Server,
    Sizes,
    batch_histogram,
    build_store,
    clean_env,
    clustered,
    describe_batches,
    free_port,
    latentsieve,
    numpy_baseline,
    percentile_ms,
    post,
    run_concurrently,
    score_body,
    workdir,
)
from report import PAGE, write_section

THROUGHPUT_TARGET = 1.5
HOP_REQUESTS = 100
SEQUENTIAL_ROWS = 500
SEQUENTIAL_REQUESTS = 20
SEQUENTIAL_TARGET = 1.3  # x NumPy q @ Z.T of the same latents, through one worker


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




def gemm_seconds(queries: np.ndarray, training: np.ndarray) -> float:
    """Seconds of one float32 ``q @ Z.T``."""
    started = time.perf_counter()
    product = queries @ training.T
    elapsed = time.perf_counter() - started
    del product
    return elapsed


async def sequential(
    targets: dict[str, tuple[str, list[str]]], training: np.ndarray, stream: QueryStream,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """``rounds`` rounds over every configuration (label -> gateway URL, metrics URLs), in a
    new order each round: NumPy ``q @ Z.T`` of SEQUENTIAL_ROWS fresh latents, one POST of
    them alone, the product again (the faster of the two is the request's floor: each ratio
    compares timings a moment apart on this noisy machine), with ``SETTLE_S`` between a product
    and the request on either side. The computed batches show whether
    a request was split."""
    clients = {label: httpx.AsyncClient(base_url=url, timeout=300)
               for label, (url, _) in targets.items()}
    times: dict[str, list[float]] = {label: [] for label in targets}
    floors: dict[str, list[float]] = {label: [] for label in targets}
    try:
        for client in clients.values():
            await post(client, score_body(stream.take(SEQUENTIAL_ROWS)))  # warm
        before = {label: batch_histogram(metrics) for label, (_, metrics) in targets.items()}
        order = list(targets)
        for index in range(rounds):
            for label in order[index % len(order):] + order[: index % len(order)]:
                queries = stream.take(SEQUENTIAL_ROWS)
                body = score_body(queries)
                floor = gemm_seconds(queries, training)
                await asyncio.sleep(SETTLE_S)  # this process's BLAS threads stop spinning
                elapsed, _ = await post(clients[label], body)
                await asyncio.sleep(SETTLE_S)  # and the server's
                floors[label].append(min(floor, gemm_seconds(queries, training)))
                times[label].append(elapsed)
    finally:
        for client in clients.values():
            await client.aclose()
    results = {}
    for label, (_, metrics) in targets.items():
        ratios = np.asarray(times[label]) / np.asarray(floors[label])
        results[label] = {
            "p50_ms": percentile_ms(times[label], 50),
            "numpy_p50_ms": percentile_ms(floors[label], 50),
            "ratio": float(np.median(ratios)), "ratios": sorted(ratios.tolist()),
            "best_ratio": min(times[label]) / min(floors[label]),
            "batches": describe_batches(before[label], batch_histogram(metrics)),
        }
    return results


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


def table(sizes: Sizes, numpy_s: float, rows: dict[str, dict[str, Any]],
          sequential_rows: dict[str, dict[str, Any]], command: str) -> str:
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
        f"### Sequential requests of {SEQUENTIAL_ROWS} latents",
        "",
        "Measured after the rows above, with every configuration up at once: "
        f"{SEQUENTIAL_REQUESTS} rounds, each visiting the configurations in turn (the order "
        "rotated each round). A request is sent alone, between two NumPy `q @ Z.T` of its own "
        f"{SEQUENTIAL_ROWS} latents ({SEQUENTIAL_ROWS} x {sizes.d} @ {sizes.d} x {sizes.n:,}, "
        "float32, a fresh output each time) in this process, "
        f"{SETTLE_S:g} s apart from each (OpenBLAS's threads spin that long after a product), "
        "the faster of which is its floor; "
        "the ratio is the median of the per-request ratios; *best / best*: the fastest request "
        "over the fastest floor (load only ever slows either down).",
        "",
        "| compute | requests | request p50 | NumPy p50 | request / NumPy (median) | target "
        "| best / best | per-request ratios | computed batches (size: count) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for label, seq in sequential_rows.items():
        target = f"<= {SEQUENTIAL_TARGET}x" if label == "1 worker" else ""
        lines.append(
            f"| {label} | {len(seq['ratios'])} | {seq['p50_ms']:.1f} ms "
            f"| {seq['numpy_p50_ms']:.1f} ms | {seq['ratio']:.2f}x | {target} "
            f"| {seq['best_ratio']:.2f}x "
            f"| {', '.join(f'{r:.2f}' for r in seq['ratios'])} | {seq['batches']} |"
        )
    lines.append("")
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
    with workdir(args.keep) as folder, contextlib.ExitStack() as running:
        store = folder / "store"
        build_store(store, training)
        targets: dict[str, tuple[str, list[str]]] = {}
        server = running.enter_context(Server(store, folder / "embedded.log"))
        server.wait_ready()
        targets["embedded"] = (server.url, [f"{server.url}/metrics"])
        for count in (1, 2):
            redis_url = running.enter_context(redis_server(folder))
            logs = folder / f"workers-{count}"
            logs.mkdir()
            metrics = running.enter_context(workers(store, redis_url, count, logs))
            server = running.enter_context(Server(
                store, folder / f"gateway-{count}.log",
                args=("--compute", "workers", "--redis", redis_url),
            ))
            server.wait_ready()
            targets["1 worker" if count == 1 else f"{count} workers"] = (server.url, metrics)
        for label, (url, metrics) in targets.items():  # one at a time, the others idle
            rows[label] = asyncio.run(measure(url, metrics, sizes, stream))
        sequential_rows = asyncio.run(
            sequential(targets, training, stream, SEQUENTIAL_REQUESTS)
        )
    report = table(sizes, numpy_s, rows, sequential_rows, command)
    print(report)
    write_section("distributed", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
