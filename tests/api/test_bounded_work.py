"""One small request cannot force unbounded work (issue 22, items 5 and 10): one calibration per
model at a time (another sigma meanwhile is 429 with Retry-After), calibrations and /select
stop when their request gives up, a failed calibration leaves nothing behind, and a deployment
can refuse per-request sigmas."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from latentsieve import cli
from latentsieve.service import main as service_main
from latentsieve.service.app import create_app
from latentsieve.service.engine import ScoringEngine
from latentsieve.service.settings import Settings
from latentsieve.workers.calibration import BLOCK
from latentsieve.workers.scoring import ModelView
from latentsieve.workers.streams import JobFailed
from latentsieve.workers.transport import Compute, Computed, Work

pytestmark = pytest.mark.anyio
MODEL = "digits-vae"
SIGMAS = (0.31, 0.47, 0.53, 0.61)  # none is the demo's own


class WatchedCompute:
    """The engine's transport, wrapped: counts the calibration blocks (work of more than one
    latent: the requests here send one) per sigma and the sigmas with work in flight at once.
    ``hold`` keeps each sigma's first block in flight until ``hold`` sigmas are in flight or
    ``release`` is set; ``fail`` raises on a sigma's first block, ``stall`` outlasts the
    request's deadline there."""

    def __init__(self, inner: Compute, hold: int = 0) -> None:
        self.inner = inner
        self.mode = inner.mode
        self.limits = inner.limits
        self.hold = hold
        self.release = asyncio.Event()
        self.arrived: dict[float, asyncio.Event] = {}
        self.in_flight: Counter[float] = Counter()
        self.most_sigmas_at_once = 0
        self.blocks: Counter[float] = Counter()
        self.fail: set[float] = set()
        self.stall: set[float] = set()
        self.started: list[float] = []  # time.monotonic() of every compute call

    def sigmas_in_flight(self) -> int:
        return sum(1 for count in self.in_flight.values() if count)

    async def compute(self, work: Work, deadline: float) -> Computed:
        self.started.append(time.monotonic())
        sigma = work.spec.sigma
        first = len(work.query) > 1 and not self.blocks[sigma]
        if len(work.query) > 1:
            self.blocks[sigma] += 1
        self.in_flight[sigma] += 1
        self.most_sigmas_at_once = max(self.most_sigmas_at_once, self.sigmas_in_flight())
        self.arrived.setdefault(sigma, asyncio.Event()).set()
        try:
            if first and sigma in self.fail:
                raise JobFailed(f"injected failure at sigma {sigma}")
            if first and sigma in self.stall:
                await asyncio.sleep(30)
            if first and self.hold:
                if self.sigmas_in_flight() >= self.hold:
                    self.release.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), 10)
            return await self.inner.compute(work, deadline)
        finally:
            self.in_flight[sigma] -= 1

    def queued_by_model(self) -> dict[str, int]:
        return self.inner.queued_by_model()

    async def start(self) -> None:
        await self.inner.start()

    def describe(self, model: str, shards: int) -> dict[str, Any]:
        return self.inner.describe(model, shards)

    def missing(self) -> list[str]:
        return self.inner.missing()

    def live_workers(self) -> dict[tuple[str, int], list[str]] | None:
        return self.inner.live_workers()

    async def stop(self) -> None:
        await self.inner.stop()


@contextlib.asynccontextmanager
async def watched(
    settings: Settings, hold: int = 0
) -> AsyncIterator[tuple[httpx.AsyncClient, ScoringEngine, WatchedCompute]]:
    """The app in-process with its compute transport wrapped in a ``WatchedCompute``."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60) as manager:
        engine: ScoringEngine = app.state.runtime.engine
        watch = WatchedCompute(engine.compute, hold)
        engine.compute = watch
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, engine, watch


def one_seed(sigma: float | None = None, seed: int = 5) -> dict[str, object]:
    body: dict[str, object] = {"model": MODEL, "seeds": [seed]}
    if sigma is not None:
        body["sigma"] = sigma
    return body


def calibration_blocks(engine: ScoringEngine) -> int:
    """Blocks of the demo's calibration set (the queue limits here are over a block)."""
    return math.ceil(engine.resolve(MODEL).view.manifest.calibration.count / BLOCK)


async def test_a_model_calibrates_one_sigma_at_a_time(settings: Settings) -> None:
    """While one sigma is calibrating, a request for the same sigma waits for it and a request
    for another sigma is 429 at once; the transport never sees two sigmas' calibrations."""
    a, others = SIGMAS[0], SIGMAS[1:]
    async with watched(settings, hold=len(SIGMAS)) as (client, engine, watch):
        first = asyncio.create_task(client.post("/score", json=one_seed(a)))
        await asyncio.wait_for(watch.arrived.setdefault(a, asyncio.Event()).wait(), 30)
        same = asyncio.create_task(client.post("/score", json=one_seed(a, seed=6)))
        refused = [asyncio.create_task(client.post("/score", json=one_seed(s)))
                   for s in others]
        # Before the first calibration may go on, every other sigma has been answered.
        done, _ = await asyncio.wait(refused, timeout=10)
        watch.release.set()
        answers = await asyncio.gather(first, same, *refused)
        # Once it is done, a refused sigma is calibrated on its retry.
        retried = await client.post("/score", json=one_seed(others[0]))
        blocks = calibration_blocks(engine)
    assert watch.most_sigmas_at_once == 1
    assert len(done) == len(others)
    assert [r.status_code for r in answers[:2]] == [200, 200], answers[1].text
    for response in answers[2:]:
        assert response.status_code == 429, response.text
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["retry-after"]) >= 1
        detail = response.json()["detail"]
        assert f"calibrating sigma {a!r}" in detail and "retry after" in detail
    assert retried.status_code == 200, retried.text
    # The waiting request reused the first one's calibration: each sigma scored once.
    assert watch.blocks == {a: blocks, others[0]: blocks}


@pytest.mark.parametrize("failure", ["compute error", "deadline"])
async def test_a_failed_calibration_leaves_nothing_behind(
    settings: Settings, failure: str
) -> None:
    """A calibration that fails (its transport errs, or its request's deadline passes) is no
    longer in flight: another sigma is not refused, and the same sigma is computed afresh."""
    sigma, other = SIGMAS[0], SIGMAS[1]
    timeout = 0.5 if failure == "deadline" else 30.0
    async with watched(settings.model_copy(update={"request_timeout_s": timeout})) as (
        client, engine, watch
    ):
        (watch.fail if failure == "compute error" else watch.stall).add(sigma)
        response = await client.post("/score", json=one_seed(sigma))
        assert response.status_code == (502 if failure == "compute error" else 504)
        assert response.json()["detail"]
        assert engine.calibrations_in_flight() == {}
        served = engine.resolve(MODEL)
        far = asyncio.get_running_loop().time() + 60
        await engine.calibration(served, other, far)  # not 429: nothing is left in flight
        before = watch.blocks[sigma]
        await engine.calibration(served, sigma, far)
        assert served.view.cached_calibration(sigma) is not None
        assert watch.blocks[sigma] - before == calibration_blocks(engine)
        assert engine.calibrations_in_flight() == {}


async def test_a_deployment_can_refuse_request_sigmas(settings: Settings) -> None:
    """``allow_request_sigma=False``: a sigma other than the index's is 422 saying so (on both
    routes) and nothing is calibrated; the index's own sigma, or none, is served."""
    strict = settings.model_copy(update={"allow_request_sigma": False})
    async with watched(strict) as (client, engine, watch):
        own = engine.resolve(MODEL).view.manifest.bandwidth.sigma
        score = await client.post("/score", json=one_seed(SIGMAS[0]))
        select = await client.post(
            "/select", json={"model": MODEL, "count": 8, "keep": 2, "sigma": SIGMAS[1]}
        )
        as_own = await client.post("/score", json=one_seed(own))
        default = await client.post("/score", json=one_seed())
    for refused in (score, select):
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"]
        assert "LATENTSIEVE_ALLOW_REQUEST_SIGMA" in detail and repr(own) in detail
    assert as_own.status_code == default.status_code == 200
    assert as_own.json()["sigma"] == own
    assert not watch.blocks  # no calibration set was rescored


def test_serve_takes_the_sigma_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``serve --no-allow-request-sigma`` (or its variable) reaches the gateway's Settings; the
    flag wins over the variable."""
    seen: list[bool] = []

    def run_server(settings: Settings, **_: object) -> None:
        seen.append(settings.allow_request_sigma)

    monkeypatch.setattr(service_main, "run_server", run_server)
    monkeypatch.setenv("LATENTSIEVE_ALLOW_REQUEST_SIGMA", "true")
    serve = ["serve", "--store", str(tmp_path)]
    assert cli.main([*serve, "--no-allow-request-sigma"]) == 0
    monkeypatch.setenv("LATENTSIEVE_ALLOW_REQUEST_SIGMA", "false")
    assert cli.main(serve) == 0
    assert cli.main([*serve, "--allow-request-sigma"]) == 0
    assert seen == [False, False, True]


class Draws:
    """Every sampler draw of the app (``ModelView.draw``, slowed down to 0.1 ms a seed): its
    seed count and when it started and ended (``time.monotonic()``; inf while running)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, float]] = []
        self.lock = threading.Lock()

    def after(self, moment: float) -> list[dict[str, float]]:
        """The draws still running at ``moment`` or started after it."""
        with self.lock:
            return [call for call in self.calls if call["end"] > moment]


@pytest.fixture
def slow_draws(monkeypatch: pytest.MonkeyPatch) -> Draws:
    draws = Draws()
    draw = ModelView.draw

    def slow_draw(self: ModelView, seeds: Sequence[int]) -> np.ndarray:
        call = {"seeds": len(seeds), "start": time.monotonic(), "end": math.inf}
        with draws.lock:
            draws.calls.append(call)
        latents = draw(self, seeds)
        time.sleep(len(seeds) * 1e-4)  # a block of 1024: 0.1 s; 20k seeds: 2 s
        call["end"] = time.monotonic()
        return latents

    monkeypatch.setattr(ModelView, "draw", slow_draw)
    return draws


async def test_select_stops_when_its_deadline_passes(
    settings: Settings, slow_draws: Draws
) -> None:
    """A /select whose deadline passes is 504, and its work stops with it: at most the chunk
    being drawn then finishes, and no draw or compute starts afterwards."""
    quick = settings.model_copy(update={"request_timeout_s": 0.4})
    async with watched(quick) as (client, _, watch):
        response = await client.post("/select", json={"model": MODEL, "count": 20_000, "keep": 4})
        answered = time.monotonic()
        await asyncio.sleep(0.3)  # time for work nobody waits for to show itself
    assert response.status_code == 504, response.text
    after = slow_draws.after(answered)
    assert all(call["start"] <= answered for call in after)
    assert sum(call["seeds"] for call in after) <= BLOCK
    assert all(started <= answered for started in watch.started)


async def test_a_calibration_stops_when_its_deadline_passes(
    settings: Settings, slow_draws: Draws
) -> None:
    """A new sigma whose request runs out of time is 504 at its deadline, not after the whole
    calibration set is drawn (10 blocks: 1 s here), and no block is drawn or scored after the
    answer but the one being drawn then."""
    quick = settings.model_copy(update={"request_timeout_s": 0.4})
    async with watched(quick) as (client, engine, watch):
        response = await client.post("/score", json=one_seed(SIGMAS[2]))
        answered = time.monotonic()
        await asyncio.sleep(0.3)
        view = engine.resolve(MODEL).view
        assert view.cached_calibration(SIGMAS[2]) is None
    assert response.status_code == 504, response.text
    with slow_draws.lock:
        drawn = sum(call["seeds"] for call in slow_draws.calls if call["seeds"] > 1)
    assert drawn < view.manifest.calibration.count
    after = slow_draws.after(answered)
    assert all(call["start"] <= answered for call in after)
    assert sum(call["seeds"] for call in after) <= BLOCK
    assert all(started <= answered for started in watch.started)
