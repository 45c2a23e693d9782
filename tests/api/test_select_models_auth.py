"""``/select`` ordering and diversity, ``/models``, API keys, health and metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from latentsieve.demo import DEMO_POLICY
from latentsieve.index.store import LatentStore
from latentsieve.service.offline import SyncScorer
from latentsieve.service.settings import Settings
from latentsieve.workers.devices import resolve_device
from latentsieve.workers.policy import decide

pytestmark = pytest.mark.anyio
MODEL = "digits-vae"


@pytest.fixture(scope="module")
def scorer(store_root: Path) -> Iterator[SyncScorer]:
    with SyncScorer(LatentStore(store_root).load(MODEL)) as scorer:
        yield scorer


async def test_select_returns_the_best_seeds_first(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    response = await app_client.post(
        "/select", json={"model": MODEL, "start": 100, "count": 200, "keep": 10}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    seeds = np.arange(100, 300)
    scores = scorer.score(scorer.draw(seeds.tolist())).log_density
    best = seeds[np.argsort(-scores, kind="stable")[:10]].tolist()
    assert [r["seed"] for r in body["results"]] == best
    # accepted: the kept seeds the model's policy (density and psi rules) accepts, in order.
    kept = scorer.score(scorer.draw(best), None, {"psi"})
    reasons = decide(kept.percentile, scorer.manifest.policy, kept.descriptor_percentiles)
    assert [r["reasons"] for r in body["results"]] == reasons
    assert body["accepted"] == [s for s, why in zip(best, reasons, strict=True) if not why]
    densities = [r["log_density"] for r in body["results"]]
    assert densities == sorted(densities, reverse=True)
    np.testing.assert_allclose(densities, np.sort(scores)[::-1][:10], atol=1e-9)


async def test_select_min_distance_keeps_latents_apart(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    min_distance = 3.0
    response = await app_client.post(
        "/select",
        json={"model": MODEL, "start": 0, "count": 300, "keep": 12, "min_distance": min_distance},
    )
    assert response.status_code == 200, response.text
    kept = response.json()["accepted"]
    assert 1 <= len(kept) <= 12
    latents = scorer.draw(kept).astype(np.float64)
    gaps = np.linalg.norm(latents[:, None, :] - latents[None, :, :], axis=-1)
    assert gaps[~np.eye(len(kept), dtype=bool)].min() >= min_distance
    # Without the constraint the top seeds crowd together more closely.
    plain = await app_client.post("/select", json={"model": MODEL, "count": 300, "keep": 12})
    plain_latents = scorer.draw(plain.json()["accepted"]).astype(np.float64)
    plain_gaps = np.linalg.norm(plain_latents[:, None] - plain_latents[None], axis=-1)
    assert plain_gaps[~np.eye(12, dtype=bool)].min() < min_distance
    assert kept[0] == plain.json()["accepted"][0]


async def test_select_with_huge_min_distance_keeps_fewer(app_client: httpx.AsyncClient) -> None:
    response = await app_client.post(
        "/select", json={"model": MODEL, "count": 50, "keep": 10, "min_distance": 1000.0}
    )
    assert response.status_code == 200
    assert len(response.json()["accepted"]) == 1


async def test_models_lists_every_served_model(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    response = await app_client.get("/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert sorted(models) == ["digits-vae", "nosampler"]
    demo = models[MODEL]
    assert demo == {
        "name": MODEL,
        "index_version": scorer.manifest.version,
        "d": 8,
        "N": scorer.manifest.n,
        "latent_shape": [8],
        "sigma": scorer.manifest.bandwidth.sigma,
        "kind": "flat",
        "exact": False,  # scored in the 4 active coordinates
        "sampler": "torch-cpu:float32:8",
        "descriptors": True,
        "generator": True,
        "policy": DEMO_POLICY.model_dump(exclude_none=True),
        "shards": 1,
        "compute": {"mode": "embedded", "device": resolve_device("auto")},
        "calibration": {
            "source": "sampler", "count": scorer.manifest.calibration.count,
            "sigma": scorer.manifest.calibration.sigma, "seed_start": 1_000_000_000,
            "latents_source": None, "latents_source_sha256": None,
        },
    }
    assert models["nosampler"]["calibration"]["source"] == "leave_one_out"
    assert models["nosampler"]["sampler"] is None
    assert models["nosampler"]["generator"] is False
    assert models["nosampler"]["sigma"] == 1.0


async def test_health_and_readiness(app_client: httpx.AsyncClient) -> None:
    assert (await app_client.get("/healthz")).status_code == 200
    ready = await app_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == ["digits-vae", "nosampler"]


async def test_not_ready_without_models(
    tmp_path: Path, serve: Callable[..., Any]
) -> None:
    async with serve(Settings(store=tmp_path / "empty")) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "no model" in ready.json()["detail"]
        missing = await client.post("/score", json={"model": MODEL, "seeds": [1]})
        assert missing.status_code == 404


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"X-API-Key": "wrong"}, 401),
        ({"Authorization": "Basic k2"}, 401),
        ({"Authorization": "Bearer k2"}, 200),
        ({"X-API-Key": "k1"}, 200),
    ],
)
async def test_api_keys(
    settings: Settings, serve: Callable[..., Any], headers: dict[str, str], status: int
) -> None:
    async with serve(settings.model_copy(update={"api_keys": ["k1", "k2"]})) as client:
        for method, path, body in [
            ("POST", "/score", {"model": MODEL, "seeds": [1]}),
            ("POST", "/select", {"model": MODEL, "count": 3, "keep": 1}),
            ("GET", "/models", None),
            ("GET", "/metrics", None),
        ]:
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code == status, (path, response.text)
            if status == 401:
                assert "API key" in response.json()["detail"]
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


def test_api_keys_from_the_environment(
    store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LATENTSIEVE_API_KEYS", " a1, b2 ,,")
    monkeypatch.setenv("LATENTSIEVE_MAX_BATCH", "17")
    settings = Settings(store=store_root)
    assert settings.api_keys == ["a1", "b2"]
    assert settings.max_batch == 17


async def test_no_keys_means_open(app_client: httpx.AsyncClient) -> None:
    assert (await app_client.get("/models")).status_code == 200


async def test_metrics_after_requests(app_client: httpx.AsyncClient) -> None:
    await app_client.post("/score", json={"model": MODEL, "seeds": [1, 2, 3]})
    await app_client.post("/score", json={"model": MODEL, "seeds": [1, 2, 3]})
    await app_client.post("/score", json={"model": MODEL, "latents": [[50.0] * 8]})
    await app_client.post("/score", json={"model": "nope", "seeds": [1]})
    response = await app_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in [
        'latentsieve_score_log_density_count{model="digits-vae"} 7.0',
        'latentsieve_score_percentile_bucket{le="0.05",model="digits-vae"}',
        'latentsieve_score_percentile_bucket{le="1.0",model="digits-vae"} 7.0',
        'latentsieve_decisions_total{decision="reject",model="digits-vae",'
        'reason="rank_sum_below_min"}',  # the demo policy's rule
        'latentsieve_decisions_total{decision="accept",model="digits-vae",reason=""}',
        'latentsieve_request_duration_seconds_count{route="/score",status="200"} 3.0',
        'latentsieve_request_duration_seconds_count{route="/score",status="404"} 1.0',
        'latentsieve_batch_size_count{model="digits-vae"} 2.0',
        'latentsieve_cache_requests_total{result="hit"} 3.0',
        'latentsieve_cache_requests_total{result="miss"} 4.0',
        'latentsieve_queue_depth{model="digits-vae"} 0.0',
        'latentsieve_index_latents{model="digits-vae",version="',
        'latentsieve_index_latents{model="nosampler",version="',
    ]:
        assert name in text, name
    assert "# TYPE latentsieve_queue_depth gauge" in text
    assert "# TYPE latentsieve_decisions_total counter" in text


async def test_log_density_buckets_cover_the_calibration(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    await app_client.post("/score", json={"model": MODEL, "seeds": [4]})
    text = (await app_client.get("/metrics")).text
    bounds = sorted(
        float(line.split('le="')[1].split('"')[0])
        for line in text.splitlines()
        if line.startswith("latentsieve_score_log_density_bucket")
        and 'model="digits-vae"' in line
        and "+Inf" not in line
    )
    calibration = scorer.manifest.calibration
    assert len(bounds) == 20
    assert bounds[0] < calibration.log_density_min
    assert bounds[-1] >= min(calibration.log_density_max, 0.0)


async def test_select_accepted_holds_only_seeds_the_policy_accepts(
    app_client: httpx.AsyncClient,
) -> None:
    strict = await app_client.post("/select", json={
        "model": MODEL, "count": 50, "keep": 3, "policy": {"min_percentile": 0.999},
    })
    body = strict.json()
    assert len(body["results"]) == 3
    assert all(not r["accept"] and "percentile_below_min" in r["reasons"] for r in body["results"])
    assert body["accepted"] == []
    mixed = (await app_client.post("/select", json={
        "model": MODEL, "count": 60, "keep": 20, "policy": {"min_percentile": 0.9},
    })).json()
    accepted = [r["seed"] for r in mixed["results"] if r["accept"]]
    assert mixed["accepted"] == accepted and 0 < len(accepted) < 20


async def test_api_keys_non_ascii_and_several_headers(
    settings: Settings, serve: Callable[..., Any]
) -> None:
    key = "clé-ünïcode-鍵"
    async with serve(settings.model_copy(update={"api_keys": [key]})) as client:
        raw = key.encode()  # sent as raw UTF-8 bytes, as HTTP carries them
        by_header = await client.get("/models", headers=[(b"x-api-key", raw)])
        assert by_header.status_code == 200
        bearer = await client.get("/models", headers=[(b"authorization", b"Bearer " + raw)])
        assert bearer.status_code == 200
        # A wrong key in one header does not hide the right one in the other.
        both = await client.get(
            "/models", headers=[(b"x-api-key", b"nope"), (b"authorization", b"Bearer " + raw)]
        )
        assert both.status_code == 200
        wrong = await client.get("/models", headers=[(b"x-api-key", b"nope")])
        assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong API key"


async def test_select_without_descriptor_rules_honours_sigma_and_the_cache(
    settings: Settings, serve: Callable[..., Any], store_root: Path, scorer: SyncScorer
) -> None:
    """A policy without descriptor bounds takes the density-only path: the kept seeds' scores at
    the request's sigma equal float64 equation (1), and a repeat is served from the cache."""
    from latentsieve.workers.density import log_density_reference

    body = {"model": MODEL, "start": 100, "count": 40, "keep": 4, "sigma": 0.9,
            "policy": {"psi": None, "rank_sum": None}}
    async with serve(settings.model_copy(update={"select_max_count": 40})) as client:
        first = (await client.post("/select", json=body)).json()
        second = (await client.post("/select", json=body)).json()
        over = await client.post("/select", json={**body, "count": 41})
    assert over.status_code == 413  # 40 is the limit itself, and allowed above
    assert first["sigma"] == 0.9 and second["sigma"] == 0.9
    rows = first["results"]
    assert [r["cached"] for r in rows] == [False] * 4
    assert [r["cached"] for r in second["results"]] == [True] * 4
    assert all("descriptors" not in r for r in rows)
    loaded = scorer.loaded
    seeds = [r["seed"] for r in rows]
    queries = loaded.to_index_space(scorer.draw(seeds))
    expected = log_density_reference(queries, np.asarray(loaded.latents), 0.9)
    np.testing.assert_allclose([r["log_density"] for r in rows], expected, atol=1e-4, rtol=0)
    everything = log_density_reference(
        loaded.to_index_space(scorer.draw(range(100, 140))), np.asarray(loaded.latents), 0.9
    )
    assert sorted(expected, reverse=True) == pytest.approx(sorted(everything)[-4:][::-1])
