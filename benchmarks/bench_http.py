"""W1 through HTTP: what does the gateway add on top of the density math?

Workload W1: N = 60,000 training latents of d = 512 (100 centres ~ N(0, I), each point a centre
plus 0.5 N(0, I), float32, fixed seed), built into a temporary store with

    latentsieve index build --sigma 20 --calibration-count 2000

and served by ``latentsieve serve`` on a free loopback port. Measured in one run:

1. throughput: 2,000 fresh query latents as base64 batches of 250 per ``POST /score`` (all
   batches in flight at once, and one after another), against NumPy ``q @ Z.T`` of the same
   shapes (2,000 x 512 by 512 x 60,000, float32) timed in this process; target HTTP <= 1.5x;
2. the cost of the JSON nested-list form against the base64 form for the same 250-latent batch
   (bytes on the wire, client encoding time, round trip);
3. p50/p99 latency of single requests of 16 fresh latents at concurrency 1, 8 and 32; then
   small against large: rounds of the large batches of (1) all in flight followed by 16-latent
   requests at concurrency 32, latents/s of the second over the first per round (target >= 0.8,
   with the sizes of the batches the server computed), sent by a lean client (pre-encoded
   HTTP/1.1 on raw asyncio streams, one connection per lane: a tenth of httpx's CPU, which the
   server would otherwise share its 2 cores with), and 16-latent requests sent alone, each
   right after NumPy ``q @ Z.T`` of its own 16 latents (p50 over p50: the request's own floor);
4. p99 latency of fully cached requests (16 latents already scored) at concurrency 8, with wrk,
   from the single-process server and from ``latentsieve serve --processes N`` (N = the core count
   by default, ``--workers``), against the same server's ``GET /healthz`` p99 at concurrency
   8 in the same run; target cached p99 <= 2x that floor (a ratio holds on a noisy machine).

Every uncached measurement sends latents never sent before, so the score cache cannot help.
Request bodies are encoded before the clock starts, except in (2). Timings are wall-clock
seconds from ``time.perf_counter``; the client runs in this process, so at high concurrency
part of the latency is the client's own event loop.

    python benchmarks/bench_http.py            # full size: the http section of docs/performance.md
    python benchmarks/bench_http.py --quick    # N = 6,000 smoke run, same table
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from report import PAGE, write_section  # benchmarks/ is on sys.path when run as a script

from latentsieve.service.client import encode_latents

MODEL = "w1"
HEADERS = {"content-type": "application/json"}
THROUGHPUT_TARGET = 1.5
SMALL_TARGET = 0.8  # latents/s of 16-latent requests at c32 / of large batches, same round
SMALL_CONCURRENCY = 32
SINGLE_REQUESTS = 100
SMALL_ROUNDS = 5
CACHED_P99_TARGET_RATIO = 2.0  # x the same run's GET /healthz p99


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: ``n`` training latents of dimension ``d``; batches in latents."""

    n: int
    d: int
    queries: int
    batch: int
    small_batch: int
    requests_per_level: int
    repeats: int


FULL = Sizes(n=60_000, d=512, queries=2_000, batch=250, small_batch=16,
             requests_per_level=400, repeats=3)
QUICK = Sizes(n=6_000, d=512, queries=500, batch=250, small_batch=16,
              requests_per_level=100, repeats=2)


# OpenBLAS's threads spin-wait about 2^28 cycles (~0.1 s) after a product before they sleep
# (OPENBLAS_THREAD_TIMEOUT). On a 2-core machine a request sent right after this process's
# NumPy product shares a core with that spinning thread: measured on W1, 500 latents, embedded,
# the server's own compute of the batch took 252 ms straight after the product and 209 ms after a
# 0.3 s pause (the engine alone in process: 200-220 ms), request / NumPy 1.58x -> 1.28x. A
# benchmark that times a product and a request back to back waits this long between them
# (bench_distributed.py's sequential rounds, bench_sd.py's HTTP rounds).
SETTLE_S = 0.3


def clustered(count: int, d: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """``count`` points: a random centre plus 0.5 N(0, I), float32 (count, d)."""
    labels = rng.integers(0, len(centres), size=count)
    noise = rng.standard_normal((count, d), dtype=np.float32)
    return (centres[labels] + np.float32(0.5) * noise).astype(np.float32)


class QueryStream:
    """Fresh W1-distributed query latents; no latent is handed out twice."""

    def __init__(self, d: int, centres: np.ndarray, seed: int = 1) -> None:
        self.d = d
        self.centres = centres
        self.rng = np.random.default_rng(seed)

    def take(self, count: int) -> np.ndarray:
        return clustered(count, self.d, self.rng, self.centres)


def score_body(latents: np.ndarray, form: str = "base64") -> bytes:
    """A ``POST /score`` body for ``latents`` (n, d) in the base64 or nested-list form."""
    payload = encode_latents(latents) if form == "base64" else latents.tolist()
    return json.dumps({"model": MODEL, "latents": payload}).encode()


def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies_s) * 1e3, q))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def latentsieve() -> list[str]:
    installed = Path(sys.executable).with_name("latentsieve")
    if installed.exists():
        return [str(installed)]
    found = shutil.which("latentsieve")
    return [found] if found else [sys.executable, "-m", "latentsieve.cli"]


def clean_env() -> dict[str, str]:
    """This environment without LATENTSIEVE_* settings, so the server runs on defaults."""
    return {key: value for key, value in os.environ.items() if not key.startswith("LATENTSIEVE_")}


def build_store(store: Path, training: np.ndarray) -> float:
    """Write the W1 index into ``store``; returns the build time in seconds."""
    latents_file = store.parent / "w1-latents.npy"
    np.save(latents_file, training)
    started = time.perf_counter()
    subprocess.run(
        [*latentsieve(), "index", "build", "--store", str(store), "--model", MODEL,
         "--latents", str(latents_file), "--sigma", "20", "--calibration-count", "2000",
         "--no-progress"],
        check=True, env=clean_env(), stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


class Server:
    """``latentsieve serve`` on a free loopback port, stopped on exit."""

    def __init__(
        self, store: Path, log_path: Path, workers: int = 1, args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: LATENTSIEVE_* settings over the defaults (e.g. a longer request
        timeout)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            [*latentsieve(), "serve", "--store", str(store), "--port", str(self.port),
             "--processes", str(workers), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**clean_env(), **(env or {})},
        )

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); "
                                   f"see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server was not ready after {timeout_s} s; see {self.log.name}")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def post(client: httpx.AsyncClient, body: bytes) -> tuple[float, dict[str, Any]]:
    """One ``POST /score``; (seconds, parsed answer). Raises on a non-200 answer."""
    started = time.perf_counter()
    response = await client.post("/score", content=body, headers=HEADERS)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"/score answered {response.status_code}: {response.text[:300]}")
    return elapsed, response.json()


async def run_concurrently(
    client: httpx.AsyncClient, bodies: list[bytes], concurrency: int
) -> tuple[list[float], float, list[dict[str, Any]]]:
    """Send ``bodies`` with at most ``concurrency`` in flight: (latencies s, wall s, answers)."""
    queue = list(reversed(bodies))
    latencies: list[float] = []
    answers: list[dict[str, Any]] = []

    async def lane() -> None:
        while queue:
            elapsed, answer = await post(client, queue.pop())
            latencies.append(elapsed)
            answers.append(answer)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, answers


def numpy_baseline(queries: np.ndarray, training: np.ndarray, repeats: int) -> float:
    """Best wall time (s) of ``q @ Z.T`` in float32: the bare cost of the distances."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        product = queries @ training.T
        best = min(best, time.perf_counter() - started)
        del product
    return best


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


async def _lean_post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     request: bytes) -> None:
    """Send one pre-encoded request and read its answer (Content-Length framed); raises
    unless 200."""
    writer.write(request)
    status = (await reader.readline()).split(b" ", 2)
    length = None
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError("an answer without Content-Length")
    answer = await reader.readexactly(length)
    if len(status) < 2 or status[1] != b"200":
        raise RuntimeError(f"/score answered {status!r}: {answer[:300]!r}")


async def lean_run(url: str, bodies: list[bytes], concurrency: int) -> float:
    """``POST /score`` every body, at most ``concurrency`` in flight, each lane on its own
    keep-alive connection; wall seconds. The requests are encoded before the clock starts."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = [
        b"POST /score HTTP/1.1\r\nhost: " + host.encode() + b"\r\ncontent-type: "
        b"application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        for body in bodies
    ]
    queue = list(reversed(requests))

    async def lane() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while queue:
                await _lean_post(reader, writer, queue.pop())
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - started


async def small_against_large(url: str, sizes: Sizes, stream: QueryStream) -> list[dict[str, Any]]:
    """``SMALL_ROUNDS`` rounds of the large batches all in flight, then
    ``requests_per_level`` 16-latent requests at concurrency 32, both sent by the lean client:
    latents/s of each, their ratio, and the sizes of the batches the server computed for the
    small requests."""
    batches = sizes.queries // sizes.batch
    rounds = []
    for _ in range(SMALL_ROUNDS):
        bodies = [score_body(stream.take(sizes.batch)) for _ in range(batches)]
        large = sizes.queries / await lean_run(url, bodies, batches)
        bodies = [score_body(stream.take(sizes.small_batch))
                  for _ in range(sizes.requests_per_level)]
        before = batch_histogram([f"{url}/metrics"])
        cpu = time.process_time()
        wall = await lean_run(url, bodies, SMALL_CONCURRENCY)
        cpu = time.process_time() - cpu
        small = len(bodies) * sizes.small_batch / wall
        rounds.append({
            "large": large, "small": small, "ratio": small / large,
            "client_cpu_ms": cpu * 1e3 / len(bodies),
            "batches": describe_batches(before, batch_histogram([f"{url}/metrics"])),
        })
    return rounds


async def single_against_numpy(
    client: httpx.AsyncClient, sizes: Sizes, stream: QueryStream, training: np.ndarray
) -> dict[str, float]:
    """``SINGLE_REQUESTS`` 16-latent requests one at a time, each right after NumPy
    ``q @ Z.T`` of its own latents: both p50s and their ratio."""
    times, floors = [], []
    for _ in range(SINGLE_REQUESTS):
        queries = stream.take(sizes.small_batch)
        body = score_body(queries)
        started = time.perf_counter()
        product = queries @ training.T
        floors.append(time.perf_counter() - started)
        del product
        elapsed, _ = await post(client, body)
        times.append(elapsed)
    p50, floor = percentile_ms(times, 50), percentile_ms(floors, 50)
    return {"p50_ms": p50, "numpy_p50_ms": floor, "ratio": p50 / floor}


async def measure(
    url: str, sizes: Sizes, stream: QueryStream, training: np.ndarray
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        batches = sizes.queries // sizes.batch
        warm = [score_body(stream.take(sizes.batch)) for _ in range(batches)]
        await run_concurrently(client, warm, batches)

        concurrent_s, sequential_s = float("inf"), float("inf")
        for _ in range(sizes.repeats):
            bodies = [score_body(stream.take(sizes.batch)) for _ in range(batches)]
            _, wall, _ = await run_concurrently(client, bodies, batches)
            concurrent_s = min(concurrent_s, wall)
            bodies = [score_body(stream.take(sizes.batch)) for _ in range(batches)]
            _, wall, _ = await run_concurrently(client, bodies, 1)
            sequential_s = min(sequential_s, wall)
        results["throughput"] = {"concurrent_s": concurrent_s, "sequential_s": sequential_s,
                                 "batches": batches}

        forms: dict[str, dict[str, float]] = {}
        for form in ("base64", "json"):
            encode_s, round_trip_s, size = float("inf"), float("inf"), 0
            for _ in range(sizes.repeats + 1):
                latents = stream.take(sizes.batch)
                started = time.perf_counter()
                body = score_body(latents, form)
                encode_s = min(encode_s, time.perf_counter() - started)
                elapsed, _ = await post(client, body)
                round_trip_s = min(round_trip_s, elapsed)
                size = len(body)
            forms[form] = {"bytes": size, "encode_s": encode_s, "round_trip_s": round_trip_s}
        results["forms"] = forms

        levels: dict[int, dict[str, float]] = {}
        for concurrency in (1, 8, 32):
            await run_concurrently(
                client, [score_body(stream.take(sizes.small_batch)) for _ in range(64)],
                concurrency,
            )
            bodies = [score_body(stream.take(sizes.small_batch))
                      for _ in range(sizes.requests_per_level)]
            latencies, wall, _ = await run_concurrently(client, bodies, concurrency)
            levels[concurrency] = {
                "p50_ms": percentile_ms(latencies, 50),
                "p99_ms": percentile_ms(latencies, 99),
                "requests_per_s": len(bodies) / wall,
            }
        results["latency"] = levels
        results["small_vs_large"] = await small_against_large(url, sizes, stream)
        results["single"] = await single_against_numpy(client, sizes, stream, training)

        cached_bodies = [score_body(stream.take(sizes.small_batch)) for _ in range(64)]
        await run_concurrently(client, cached_bodies, 8)
        await run_concurrently(client, cached_bodies, 8)
        repeated = cached_bodies * max(1, sizes.requests_per_level // len(cached_bodies))
        latencies, wall, answers = await run_concurrently(client, repeated, 8)
        all_cached = all(
            bool(result["cached"]) for answer in answers for result in answer["results"]
        )
        results["cached"] = {
            "p50_ms": percentile_ms(latencies, 50),
            "p99_ms": percentile_ms(latencies, 99),
            "requests_per_s": len(repeated) / wall,
            "all_cached": all_cached,
        }
        results["cached_body"] = cached_bodies[0]
        results["one_worker"] = cached_wrk(url, cached_bodies[0])
    return results


def cached_wrk(url: str, body: bytes) -> dict[str, Any]:
    """wrk at concurrency 8 on one warmed cached-hit body, ``WRK_RUNS`` times, each right after
    a run on ``GET /healthz`` (the same server's cheapest route: the floor of HTTP + framework),
    so that each ratio compares two runs seconds apart on this noisy machine."""
    wrk(f"{url}/score", body, seconds=2)  # warms every worker's cache with this body
    floors, runs = [], []
    for _ in range(WRK_RUNS):
        floor, run = wrk(f"{url}/healthz"), wrk(f"{url}/score", body)
        if floor is not None and run is not None:
            floors.append(floor)
            runs.append({**run, "floor_p99_ms": floor["p99_ms"]})
    median = sorted(floors, key=lambda f: f["p99_ms"])[len(floors) // 2] if floors else None
    return {"floor": median, "runs": runs}


def _wrk_ms(text: str) -> float:
    """wrk's '3.39ms' / '812.00us' / '1.02s' -> milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert match is not None, text
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]
    return float(match.group(1)) * scale


WRK_RUNS = 3


def wrk(url: str, body: bytes | None = None, seconds: int = 8) -> dict[str, float] | None:
    """Latency at concurrency 8 with wrk, a C load generator that leaves the CPU to the server
    (a Python client saturates a core of this 2-core machine by itself): POST ``body`` as JSON,
    or GET without one. None when wrk is not installed (Debian package ``wrk``)."""
    binary = shutil.which("wrk")
    if binary is None:
        return None
    with tempfile.TemporaryDirectory() as folder:
        command = [binary, "-t1", "-c8", f"-d{seconds}s", "--latency"]
        if body is not None:
            body_file = Path(folder) / "body.json"
            body_file.write_bytes(body)
            script = Path(folder) / "post.lua"
            script.write_text(
                'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
            )
            command += ["-s", str(script)]
        out = subprocess.run(
            [*command, url], capture_output=True, text=True, check=True
        ).stdout
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, flags=re.MULTILINE))
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, flags=re.MULTILINE)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rate is not None and not errors, out
    return {
        "p50_ms": _wrk_ms(percentiles["50"]),
        "p99_ms": _wrk_ms(percentiles["99"]),
        "requests_per_s": float(rate.group(1)),
    }


def python_speed_us() -> float:
    """Best time of ``sum(range(1000))`` in microseconds: how fast this machine runs Python
    (the gateway's cost per request is mostly interpreter time), to compare runs across
    machines; about 8 us on a current desktop core."""
    best = float("inf")
    for _ in range(20):
        started = time.perf_counter()
        for _ in range(1000):
            sum(range(1000))
        best = min(best, (time.perf_counter() - started) / 1000)
    return best * 1e6


def report_table(sizes: Sizes, numbers: dict[str, Any], numpy_s: float, command: str,
                 build_s: float, ready_s: float, load: tuple[float, float]) -> str:
    """The markdown report; ``load`` is the 1-minute load average before and after the run."""
    throughput = numbers["throughput"]
    forms = numbers["forms"]
    levels = numbers["latency"]
    cached = numbers["cached"]
    assert isinstance(throughput, dict) and isinstance(forms, dict)
    assert isinstance(levels, dict) and isinstance(cached, dict)
    concurrent_ratio = throughput["concurrent_s"] / numpy_s
    sequential_ratio = throughput["sequential_s"] / numpy_s
    base, nested = forms["base64"], forms["json"]
    lines = [
        "## The HTTP gateway (W1 through `POST /score`)",
        "",
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, NumPy {np.__version__}. "
        "Client and server share the machine; 1-minute load average "
        f"{load[0]:.2f} before and {load[1]:.2f} after the run (above the core count means "
        "other work competed for the CPU).",
        "",
        f"W1: N = {sizes.n:,} training latents, d = {sizes.d}, 100 clusters, sigma 20, flat "
        f"(exact) index; index build {build_s:.1f} s, server ready {ready_s:.1f} s after start.",
        "",
        "### Throughput against NumPy",
        "",
        "| measurement | time | latents/s | vs NumPy | target |",
        "|---|---:|---:|---:|---:|",
        f"| NumPy `q @ Z.T`, ({sizes.queries} x {sizes.d}) @ ({sizes.d} x {sizes.n:,}) float32 "
        f"| {numpy_s * 1e3:.1f} ms | {sizes.queries / numpy_s:,.0f} | 1.00x | |",
        f"| `POST /score`, {throughput['batches']} base64 batches of {sizes.batch}, all in "
        f"flight | {throughput['concurrent_s'] * 1e3:.1f} ms "
        f"| {sizes.queries / throughput['concurrent_s']:,.0f} | {concurrent_ratio:.2f}x "
        f"| <= {THROUGHPUT_TARGET}x |",
        f"| `POST /score`, same batches one after another "
        f"| {throughput['sequential_s'] * 1e3:.1f} ms "
        f"| {sizes.queries / throughput['sequential_s']:,.0f} | {sequential_ratio:.2f}x | |",
        "",
        f"### Latent encoding, one batch of {sizes.batch} x {sizes.d}",
        "",
        "| form | body bytes | client encode | round trip (incl. scoring) |",
        "|---|---:|---:|---:|",
        f"| base64 float32 | {base['bytes']:,} | {base['encode_s'] * 1e3:.2f} ms "
        f"| {base['round_trip_s'] * 1e3:.1f} ms |",
        f"| JSON nested list | {nested['bytes']:,} | {nested['encode_s'] * 1e3:.2f} ms "
        f"| {nested['round_trip_s'] * 1e3:.1f} ms |",
        f"| JSON / base64 | {nested['bytes'] / base['bytes']:.1f}x "
        f"| {nested['encode_s'] / base['encode_s']:.1f}x "
        f"| {nested['round_trip_s'] / base['round_trip_s']:.2f}x |",
        "",
        f"### Latency, requests of {sizes.small_batch} fresh latents "
        f"({sizes.requests_per_level} requests per level)",
        "",
        "| concurrency | p50 | p99 | requests/s | latents/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for concurrency, level in levels.items():
        lines.append(
            f"| {concurrency} | {level['p50_ms']:.1f} ms | {level['p99_ms']:.1f} ms "
            f"| {level['requests_per_s']:,.0f} "
            f"| {level['requests_per_s'] * sizes.small_batch:,.0f} |"
        )
    rounds = numbers["small_vs_large"]
    single = numbers["single"]
    httpx_small = levels[SMALL_CONCURRENCY]["requests_per_s"] * sizes.small_batch
    httpx_large = sizes.queries / throughput["concurrent_s"]
    ratios = sorted(entry["ratio"] for entry in rounds)
    lines += [
        "",
        "### Small requests against large batches",
        "",
        f"Rounds of the {throughput['batches']} batches of {sizes.batch} all in flight, then "
        f"{sizes.requests_per_level} requests of {sizes.small_batch} fresh latents at "
        f"concurrency {SMALL_CONCURRENCY}, both from the lean client (pre-encoded HTTP/1.1 "
        "on raw asyncio streams; its CPU per small request is shown); computed batches from "
        "the server's `latentsieve_batch_size` histogram over the small requests. With the "
        f"httpx client of the tables above: {httpx_small:,.0f} latents/s at "
        f"c{SMALL_CONCURRENCY} against {httpx_large:,.0f} all in flight, "
        f"{httpx_small / httpx_large:.2f}.",
        "",
        f"| round | large batches, latents/s | {sizes.small_batch}-latent requests at "
        f"c{SMALL_CONCURRENCY}, latents/s | small / large | target | client CPU per small "
        "request | computed batches (size: count) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for index, entry in enumerate(rounds, 1):
        lines.append(
            f"| {index} | {entry['large']:,.0f} | {entry['small']:,.0f} | {entry['ratio']:.2f} "
            f"| >= {SMALL_TARGET} | {entry['client_cpu_ms']:.2f} ms | {entry['batches']} |"
        )
    lines += [
        "",
        f"Median small / large over {len(rounds)} rounds: {ratios[len(ratios) // 2]:.2f} "
        f"(target >= {SMALL_TARGET}). One {sizes.small_batch}-latent request at a time "
        f"({SINGLE_REQUESTS} requests, each right after NumPy `q @ Z.T` of its own latents): "
        f"p50 {single['p50_ms']:.1f} ms against the NumPy p50 {single['numpy_p50_ms']:.1f} ms, "
        f"{single['ratio']:.2f}x its own floor.",
        "",
        "### Cached hits",
        "",
        "| concurrency | p50 | p99 | requests/s | every result cached | p99 vs floor |",
        "|---:|---:|---:|---:|---|---:|",
        f"| 8 (Python httpx client) | {cached['p50_ms']:.2f} ms | {cached['p99_ms']:.2f} ms "
        f"| {cached['requests_per_s']:,.0f} | {'yes' if cached['all_cached'] else 'NO'} "
        "| |",
    ]
    configurations = [("1 worker", numbers["one_worker"])]
    if numbers.get("many_workers"):
        configurations.append(
            (f"{numbers['workers']} workers", numbers["many_workers"])
        )
    for label, measured in configurations:
        floor = measured["floor"]
        for index, run in enumerate(measured["runs"], 1):
            ratio = f"{run['p99_ms'] / run['floor_p99_ms']:.2f}x"
            lines.append(
                f"| 8 (wrk, {label}, run {index}) | {run['p50_ms']:.2f} ms "
                f"| {run['p99_ms']:.2f} ms | {run['requests_per_s']:,.0f} | same body, warmed "
                f"| {ratio} (target <= {CACHED_P99_TARGET_RATIO:.0f}x) |"
            )
        if floor:
            lines.append(
                f"| 8 (wrk, {label}, `GET /healthz`: the floor) | {floor['p50_ms']:.2f} ms "
                f"| {floor['p99_ms']:.2f} ms | {floor['requests_per_s']:,.0f} | no scoring "
                "(median of the runs) | |"
            )
    lines += [
        "",
        "The Python client shares this 2-core machine with the server and saturates a core by "
        "itself, so its latencies mostly measure the client; the wrk rows (a C load generator, "
        "when installed) are the server's own cached-hit latency. `N workers` is "
        f"`latentsieve serve --processes N` (here N = {numbers['workers']}, the core count): "
        "N gateway processes (uvicorn's) share the listening socket, and one `/metrics` sums "
        "them (docs/service.md, 'Gateway processes').",
    ]
    for label, measured in configurations:
        runs, floor = measured["runs"], measured["floor"]
        if not runs or not floor:
            continue
        p99s = sorted(run["p99_ms"] for run in runs)
        rate = sorted(run["requests_per_s"] for run in runs)[len(runs) // 2]
        ratios = sorted(run["p99_ms"] / run["floor_p99_ms"] for run in runs)
        met = sum(ratio <= CACHED_P99_TARGET_RATIO for ratio in ratios)
        lines += [
            "",
            f"{label}: cached-hit p99 over {len(runs)} wrk runs "
            f"{', '.join(f'{p:.2f}' for p in p99s)} ms, each against the `GET /healthz` run "
            f"just before it: {', '.join(f'{r:.2f}x' for r in ratios)} (median "
            f"{ratios[len(ratios) // 2]:.2f}x); the {CACHED_P99_TARGET_RATIO:.0f}x target held "
            f"in {met} of {len(runs)}. A cached `POST /score` (16 x {sizes.d} "
            f"base64) costs {floor['requests_per_s'] / rate:.2f}x the server time of "
            f"`GET /healthz` (median throughput {rate:,.0f} vs {floor['requests_per_s']:,.0f} "
            "requests/s).",
        ]
    lines += [
        "",
        "At concurrency 8 a saturated server's latency is about 8 requests' worth of its time "
        "per request divided by the cores serving, so p99 follows that cost and the machine's "
        f"speed. Python speed here: `sum(range(1000))` takes {numbers['python_us']:.1f} us.",
    ]
    lines.append("")
    return "\n".join(lines)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    """A temporary folder for the store, removed afterwards unless ``keep``."""
    folder = Path(tempfile.mkdtemp(prefix="bench-http-"))
    try:
        yield folder
    finally:
        if keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 6,000 smoke run")
    parser.add_argument("--out", type=Path, default=PAGE, help="results page (a section of it)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="also measure cached hits with this many server processes "
                             "(default: the core count; 1 skips it)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    command = "python benchmarks/bench_http.py" + (" --quick" if args.quick else "")

    load_before = os.getloadavg()[0]
    python_us = python_speed_us()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, sizes.d), dtype=np.float32)
    training = clustered(sizes.n, sizes.d, rng, centres)
    stream = QueryStream(sizes.d, centres)
    numpy_s = numpy_baseline(stream.take(sizes.queries), training, sizes.repeats + 1)

    with workdir(args.keep) as folder:
        store = folder / "store"
        build_s = build_store(store, training)
        with Server(store, folder / "serve.log") as server:
            ready_s = server.wait_ready()
            numbers = asyncio.run(measure(server.url, sizes, stream, training))
        numbers["workers"] = args.workers
        if args.workers > 1:
            with Server(store, folder / "serve-workers.log", args.workers) as server:
                server.wait_ready()
                numbers["many_workers"] = cached_wrk(server.url, numbers["cached_body"])
    numbers["python_us"] = python_us
    load = (load_before, os.getloadavg()[0])
    table = report_table(sizes, numbers, numpy_s, command, build_s, ready_s, load)
    print(table)
    write_section("http", table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
