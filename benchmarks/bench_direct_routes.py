"""Cached-hit ``POST /score`` through a real uvicorn on loopback: the hot routes dispatched
past FastAPI (``DirectRoutes``, the shadow router the gateway had until issue 20) against the
plain FastAPI routes it has now, with and without a body-size middleware.

Issue 20's rule: the shadow router stays only if the plain routes are more than 1.3x its
cached-hit p99. The plain configuration the rule names is FastAPI's routing plus a plain ASGI
middleware that answers a body over ``LATENTSIEVE_MAX_BODY_BYTES`` with 413 (LitServe's
``MaxSizeMiddleware`` pattern), so that is measured as well as the routes as shipped (which read
their own bodies under the same limits, ``service/requests.py``, and need no middleware).
``DirectRoutes`` is carried in this file, as it was in ``service/direct_routes.py``, so that
the comparison can be run again.

Workload: bench_http's cached hit, 16 latents of d = 512 as base64 (a W1-shaped store of
N = 6,000; N does not matter to a cache hit), and the same with 500 latents. Each configuration
is its own uvicorn process (httptools, uvloop, no access log, as ``latentsieve serve``), with
the body already scored. Then ``--rounds`` rounds; in each, wrk (concurrency 8, one thread)
runs ``--seconds`` against every configuration in turn, in a new order each round, so that each
ratio compares runs seconds apart. Ratios are per round against that round's DirectRoutes run;
the table gives their median. Besides wrk's latencies the table gives the server process's CPU
time per request (``/proc/PID/stat``, over the same run): the cost that latency at a saturating
concurrency follows, and a number that other work on the machine does not inflate the way it
inflates a p99.

    python benchmarks/bench_direct_routes.py             # 5 rounds of 8 s per configuration
    python benchmarks/bench_direct_routes.py --quick     # 2 rounds of 3 s

Needs wrk (Debian package ``wrk``): a Python client saturates a core of a 2-core machine by
itself, and would measure mostly itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from bench_http import QueryStream, build_store, clustered, free_port, score_body, wrk
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from latentsieve.service.errors import ServiceError, error_response

RULE = 1.3  # DirectRoutes stays only if the plain routes are more than this x its p99
CONFIGURATIONS = ("direct", "plain", "plain+limit")
LABELS = {
    "direct": "DirectRoutes (as it was)",
    "plain": "plain FastAPI routes (as shipped)",
    "plain+limit": "plain FastAPI routes + body-size middleware",
}
Endpoint = Callable[[Request], Awaitable[Response]]
Runs = dict[str, dict[str, list[dict[str, float]]]]  # body -> configuration -> one per round


class DirectRoutes:
    """The shadow router as it was: ``(method, path) -> endpoint`` called straight from ASGI
    with a Starlette ``Request``, ``ServiceError`` turned into the one error body, every other
    request passed on to the app."""

    def __init__(self, app: ASGIApp, routes: Mapping[tuple[str, str], Endpoint]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = (
            self.routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await endpoint(Request(scope, receive))
        except ServiceError as exc:
            response = error_response(exc.status, exc.detail, exc.headers)
        await response(scope, receive, send)


class BodySizeLimit:
    """A plain ASGI middleware that answers a body over ``max_bytes`` with the gateway's 413:
    declared (Content-Length) before the app runs, or counted as the route reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                refusal = error_response(
                    413, f"the body is {int(value)} bytes; at most {self.max_bytes} are allowed"
                )
                await refusal(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise ServiceError(413, f"the body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def serve(configuration: str, store: Path, port: int) -> None:
    """Run one configuration's gateway on ``port`` until terminated (``--serve``)."""
    import uvicorn

    from latentsieve.logs import uvicorn_log_config
    from latentsieve.service.app import create_app
    from latentsieve.service.routers import scoring
    from latentsieve.service.settings import Settings

    settings = Settings(store=store, port=port, max_batch=1000)
    app = create_app(settings, drain_on_signals=True)
    # Starlette builds the middleware stack on the first request; the last entry is the
    # innermost, where the shadow router was (inside auth, drain and the request metrics).
    if configuration == "direct":
        routes = {("POST", "/score"): scoring.score, ("POST", "/select"): scoring.select}
        app.user_middleware.append(Middleware(DirectRoutes, routes=routes))
    elif configuration == "plain+limit":
        app.user_middleware.append(Middleware(BodySizeLimit, max_bytes=settings.max_body_bytes))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            access_log=False, log_config=uvicorn_log_config())
    uvicorn.Server(config).run()


class Server:
    """One configuration in its own process on a free loopback port."""

    def __init__(self, configuration: str, store: Path, log: Path) -> None:
        self.configuration = configuration
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("wb")
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("LATENTSIEVE_")}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", configuration, "--store", str(store),
             "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.configuration} exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.configuration} was not ready; see {self.log.name}")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def warm(url: str, body: bytes) -> None:
    """Score ``body``, then check that the next answer is all cache hits."""
    for _ in range(2):
        response = httpx.post(f"{url}/score", content=body, timeout=120,
                              headers={"content-type": "application/json"})
        response.raise_for_status()
    assert all(result["cached"] for result in response.json()["results"]), url


def measure(servers: dict[str, Server], bodies: dict[str, bytes], rounds: int,
            seconds: int) -> Runs:
    """wrk's numbers and the server's CPU per request, configurations interleaved."""
    runs: Runs = {name: {configuration: [] for configuration in servers} for name in bodies}
    order = list(servers)
    shuffle = random.Random(0)
    for _ in range(rounds):
        for name, body in bodies.items():
            shuffle.shuffle(order)
            for configuration in order:
                server = servers[configuration]
                before = server.cpu_s()
                numbers = wrk(f"{server.url}/score", body, seconds=seconds)
                assert numbers is not None
                requests = numbers["requests_per_s"] * seconds
                numbers["cpu_us"] = (server.cpu_s() - before) / requests * 1e6
                runs[name][configuration].append(numbers)
    return runs


def ratios(runs: list[dict[str, float]], base: list[dict[str, float]], key: str) -> list[float]:
    return [run[key] / ref[key] for run, ref in zip(runs, base, strict=True)]


def report(runs: Runs, command: str, load: tuple[float, float], seconds: int) -> str:
    lines = [
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}; 1-minute load average {load[0]:.2f} before and "
        f"{load[1]:.2f} after (wrk, the servers and any other work share the cores). wrk at "
        f"concurrency 8, {seconds} s per run; each ratio is against the DirectRoutes run of "
        "the same round; medians over the rounds.",
        "",
        "| cached body | configuration | p50 | p99 | requests/s | server CPU per request "
        "| p99 vs DirectRoutes (per round) | CPU vs DirectRoutes |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    verdicts = []
    for name, by_configuration in runs.items():
        base = by_configuration["direct"]
        for configuration, numbers in by_configuration.items():
            p99 = ratios(numbers, base, "p99_ms")
            cpu = ratios(numbers, base, "cpu_us")
            lines.append(
                f"| {name} | {LABELS[configuration]} "
                f"| {statistics.median(r['p50_ms'] for r in numbers):.2f} ms "
                f"| {statistics.median(r['p99_ms'] for r in numbers):.2f} ms "
                f"| {statistics.median(r['requests_per_s'] for r in numbers):,.0f} "
                f"| {statistics.median(r['cpu_us'] for r in numbers):.0f} us "
                f"| {statistics.median(p99):.2f}x ({', '.join(f'{r:.2f}' for r in p99)}) "
                f"| {statistics.median(cpu):.2f}x |"
            )
            if configuration != "direct":
                verdicts.append((name, configuration, statistics.median(p99)))
    lines.append("")
    for name, configuration, median in verdicts:
        verdict = (f"over {RULE}x: DirectRoutes would stay" if median > RULE
                   else f"within {RULE}x: DirectRoutes goes")
        lines.append(f"- {name}, {LABELS[configuration]}: p99 {median:.2f}x DirectRoutes' "
                     f"({verdict}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8, help="length of one wrk run")
    parser.add_argument("--serve", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.store, args.port)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 2
    rounds, seconds = (2, 3) if args.quick else (args.rounds, args.seconds)
    command = "python benchmarks/bench_direct_routes.py" + (" --quick" if args.quick else "")
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((100, 512), dtype=np.float32)
    stream = QueryStream(512, centres)
    bodies = {"16 x 512 base64": score_body(stream.take(16)),
              "500 x 512 base64": score_body(stream.take(500))}
    with tempfile.TemporaryDirectory(prefix="bench-direct-") as folder:
        store = Path(folder) / "store"
        build_store(store, clustered(6_000, 512, rng, centres))
        servers: dict[str, Server] = {}
        try:
            for configuration in CONFIGURATIONS:
                servers[configuration] = Server(configuration, store,
                                                Path(folder) / f"{configuration}.log")
            for server in servers.values():
                server.wait_ready()
                for body in bodies.values():
                    warm(server.url, body)
            runs = measure(servers, bodies, rounds, seconds)
        finally:
            for server in servers.values():
                server.stop()
    print(report(runs, command, (load_before, os.getloadavg()[0]), seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
