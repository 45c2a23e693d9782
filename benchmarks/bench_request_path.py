"""Server time of one cached ``POST /score``, in process: the ASGI app called directly, with no
HTTP server or client in the way, against ``GET /healthz`` of the same app in the same run.

    python benchmarks/bench_request_path.py             # prints the table
    python benchmarks/bench_request_path.py --profile   # and a cProfile of the cached requests

The workload is bench_http's cached-hit request: 16 latents of d = 512, base64, already scored
(a W1-shaped store of N = 6,000; N does not matter to a cache hit). A cached request is pure
interpreter time, and at concurrency c a saturated single-process server answers in about c
times it, so this is the number to move for the cached-hit p99 of ``bench_http.py``. Best of
5 rounds of 2,000 requests each; healthz and score rounds interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from asgi_lifespan import LifespanManager
from bench_http import QueryStream, build_store, clustered, score_body
from fastapi import FastAPI

from latentsieve.service.app import create_app
from latentsieve.service.settings import Settings

ROUNDS, PER_ROUND = 5, 2_000


async def call(app: FastAPI, method: str, path: str, body: bytes = b"") -> None:
    """One request straight into the ASGI app; raises unless it answers 200."""
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:  # nothing more will come: wait as a client that keeps the line open
            await asyncio.sleep(3600)
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    if status != 200:
        raise RuntimeError(f"{method} {path} answered {status}")


async def per_request_us(app: FastAPI, method: str, path: str, body: bytes) -> float:
    started = time.perf_counter()
    for _ in range(PER_ROUND):
        await call(app, method, path, body)
    return (time.perf_counter() - started) / PER_ROUND * 1e6


async def measure(store: Path, body: bytes, profile: bool) -> tuple[float, float]:
    app = create_app(Settings(store=store))
    async with LifespanManager(app, startup_timeout=120):
        for _ in range(200):  # the first call scores the latents; the rest are cache hits
            await call(app, "POST", "/score", body)
            await call(app, "GET", "/healthz")
        healthz = score = float("inf")
        for _ in range(ROUNDS):
            healthz = min(healthz, await per_request_us(app, "GET", "/healthz", b""))
            score = min(score, await per_request_us(app, "POST", "/score", body))
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(PER_ROUND):
                await call(app, "POST", "/score", body)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return healthz, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="cProfile the cached requests")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 512), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="bench-path-") as folder:
        store = Path(folder) / "store"
        build_store(store, clustered(6_000, 512, rng, centres))
        body = score_body(QueryStream(512, centres).take(16))
        healthz, score = asyncio.run(measure(store, body, args.profile))
    print("| request (in process, best of 5 x 2,000) | us per request | vs GET /healthz |")
    print("|---|---:|---:|")
    print(f"| GET /healthz (FastAPI route: the floor) | {healthz:.0f} | 1.00x |")
    print(f"| POST /score, 16 x 512 base64, cached | {score:.0f} | {score / healthz:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
