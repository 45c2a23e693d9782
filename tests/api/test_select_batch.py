"""``POST /select`` over a posted batch: a back end ranks its own previews (x0-predictions,
finished latents) in one call and gets the best ``keep`` back, each with its ``index`` in the
batch. Expected rankings come from ``SyncScorer`` (the float64 engine in process), not from
the route under test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager

from latentsieve.index.store import LatentStore
from latentsieve.service.app import create_app
from latentsieve.service.client import AsyncLatentSieveClient, encode_latents
from latentsieve.service.offline import SyncScorer
from latentsieve.service.settings import Settings

pytestmark = pytest.mark.anyio
MODEL = "digits-vae"


@pytest.fixture(scope="module")
def scorer(store_root: Path) -> Iterator[SyncScorer]:
    with SyncScorer(LatentStore(store_root).load(MODEL)) as scorer:
        yield scorer


@pytest.fixture(scope="module")
def previews() -> np.ndarray:
    return np.random.default_rng(21).standard_normal((40, 8)).astype(np.float32) * 1.5


async def test_the_best_of_a_posted_batch_come_first_with_their_positions(
    app_client: httpx.AsyncClient, scorer: SyncScorer, previews: np.ndarray
) -> None:
    for latents in (previews.tolist(), encode_latents(previews)):
        response = await app_client.post(
            "/select", json={"model": MODEL, "latents": latents, "keep": 5}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        scores = scorer.score(previews).log_density
        best = np.argsort(-scores, kind="stable")[:5].tolist()
        assert [result["index"] for result in body["results"]] == best
        assert all("seed" not in result or result["seed"] is None for result in body["results"])
        np.testing.assert_allclose([r["log_density"] for r in body["results"]], scores[best],
                                   rtol=0, atol=1e-4)
        accepted = [r["index"] for r in body["results"] if r["accept"]]
        assert body["accepted"] == accepted  # batch positions, best first


async def test_min_distance_keeps_posted_latents_apart(
    app_client: httpx.AsyncClient, previews: np.ndarray
) -> None:
    batch = np.concatenate([previews[:1], previews[:1] + 1e-3, previews[1:10]])
    plain = (await app_client.post(
        "/select", json={"model": MODEL, "latents": batch.tolist(), "keep": 11})).json()
    assert sorted(r["index"] for r in plain["results"]) == list(range(11))
    spread = (await app_client.post("/select", json={
        "model": MODEL, "latents": batch.tolist(), "keep": 11, "min_distance": 0.5})).json()
    kept = [r["index"] for r in spread["results"]]
    assert not {0, 1} <= set(kept)  # the near-duplicate pair cannot both be kept
    rows = batch[kept]
    gaps = np.linalg.norm(rows[:, None] - rows[None], axis=-1) + np.eye(len(kept)) * 1e9
    assert gaps.min() >= 0.5


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"latents": [[0.0] * 8], "count": 4, "keep": 1}, 422, "not both"),
        ({"latents": [[0.0] * 8], "start": 0, "keep": 1}, 422, "not both"),
        ({"keep": 1}, 422, "send 'count'"),
        ({"latents": None, "keep": 1}, 422, "must not be null"),
        ({"count": None, "keep": 1}, 422, "must not be null"),
        ({"latents": [[0.0] * 8] * 3, "keep": 4}, 422, "keep (4) must be <= the 3 latents"),
        ({"latents": [[0.0] * 7], "keep": 1}, 422, "takes 8"),
        ({"latents": {"dtype": "float32", "shape": [1, 8],
                      "data": encode_latents(np.full((1, 8), np.nan, np.float32))["data"]},
          "keep": 1}, 422, "finite"),
        ({"latents": {"dtype": "float32", "shape": [10**6, 8], "data": "x"}, "keep": 1}, 413,
         "at most"),
    ],
)
async def test_bad_batches(
    app_client: httpx.AsyncClient, body: dict[str, Any], status: int, says: str
) -> None:
    response = await app_client.post("/select", json={"model": MODEL, **body})
    assert response.status_code == status, response.text
    assert says in response.json()["detail"], response.text


async def test_a_batch_over_max_batch_is_413(settings: Settings, serve: Any) -> None:
    async with serve(settings.model_copy(update={"max_batch": 4})) as client:
        response = await client.post("/select", json={
            "model": MODEL, "latents": [[0.0] * 8] * 5, "keep": 1})
    assert response.status_code == 413 and "at most 4" in response.json()["detail"]


async def test_the_client_ranks_a_batch(
    settings: Settings, scorer: SyncScorer, previews: np.ndarray
) -> None:
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60) as manager:
        client = AsyncLatentSieveClient(
            "http://gateway", transport=httpx.ASGITransport(app=manager.app)
        )
        answer = await client.select(MODEL, latents=previews.reshape(40, 2, 4), keep=3)
        with pytest.raises(ValueError, match="not both"):
            await client.select(MODEL, count=4, keep=1, latents=previews)
        await client.aclose()
    best = np.argsort(-scorer.score(previews).log_density, kind="stable")[:3].tolist()
    assert [result.index for result in answer.results] == best


async def test_the_openapi_document_describes_batch_select(app_client: httpx.AsyncClient) -> None:
    spec = (await app_client.get("/openapi.json")).json()
    select = spec["components"]["schemas"]["SelectRequest"]
    assert "latents" in select["properties"] and "oneOf" in select
    assert select["properties"]["latents"]["oneOf"][0]["maxItems"] == 4096
    assert "index" in spec["components"]["schemas"]["ScoreResult"]["properties"]
