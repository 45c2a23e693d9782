"""``POST /score`` in-process: the numbers equal ``SyncScorer.score``, decisions follow the
policy, the second identical request is served from the cache."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from latentsieve.demo import index_latents
from latentsieve.index.store import LatentStore
from latentsieve.service.offline import SyncScorer
from latentsieve.service.settings import Settings
from latentsieve.workers.demo_models.digits_vae import training_latents
from latentsieve.workers.policy import PERCENTILE_BELOW_MIN, decide

pytestmark = pytest.mark.anyio
MODEL = "digits-vae"
NOSAMPLER = "nosampler"


@pytest.fixture(scope="module")
def scorer(store_root: Path) -> Iterator[SyncScorer]:
    with SyncScorer(LatentStore(store_root).load(MODEL)) as scorer:
        yield scorer


def sample_latents(count: int, dim: int = 8, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((count, dim)) * 1.2).astype(np.float32)


async def test_nested_latents_match_the_scorer(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    latents = sample_latents(5)
    response = await app_client.post("/score", json={"model": MODEL, "latents": latents.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = scorer.score(latents)
    assert body["model"] == MODEL
    assert body["index_version"] == scorer.manifest.version
    assert body["sigma"] == scorer.manifest.bandwidth.sigma
    # The demo scores in its 4 active coordinates (a stored projection): exact in that space.
    assert body["exact"] is False and scorer.manifest.projection is not None
    got = np.array([r["log_density"] for r in body["results"]])
    np.testing.assert_allclose(got, expected.log_density, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        [r["percentile"] for r in body["results"]], expected.percentile, atol=0
    )
    for result in body["results"]:
        # The demo's default policy bounds psi, so psi is computed and returned with its rank.
        assert "seed" not in result and set(result["descriptors"]) == {"psi", "psi_percentile"}
        assert result["error_bound"] == 0.0 and result["cached"] is False
        assert result["accept"] == (not result["reasons"])
    assert body["accepted"] == [i for i, r in enumerate(body["results"]) if r["accept"]]


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
async def test_base64_latents_match_nested(
    app_client: httpx.AsyncClient, scorer: SyncScorer, dtype: str
) -> None:
    latents = sample_latents(4, seed=11).astype(dtype)
    encoded = {
        "dtype": dtype,
        "shape": [4, 2, 4],
        "data": base64.b64encode(latents.astype(f"<{latents.dtype.str[1:]}").tobytes()).decode(),
    }
    response = await app_client.post("/score", json={"model": MODEL, "latents": encoded})
    assert response.status_code == 200, response.text
    expected = scorer.score(latents.astype(np.float32))
    got = [r["log_density"] for r in response.json()["results"]]
    np.testing.assert_allclose(got, expected.log_density, rtol=0, atol=1e-9)


async def test_multi_axis_nested_latents_are_flattened(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    latents = sample_latents(3, seed=5)
    response = await app_client.post(
        "/score", json={"model": MODEL, "latents": latents.reshape(3, 2, 2, 2).tolist()}
    )
    assert response.status_code == 200, response.text
    got = [r["log_density"] for r in response.json()["results"]]
    np.testing.assert_allclose(got, scorer.score(latents).log_density, atol=1e-9)


async def test_seeds_match_the_sampler(app_client: httpx.AsyncClient, scorer: SyncScorer) -> None:
    seeds = [0, 7, 2**64 - 1]
    response = await app_client.post("/score", json={"model": MODEL, "seeds": seeds})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = scorer.score(scorer.draw(seeds))
    assert [r["seed"] for r in body["results"]] == seeds
    np.testing.assert_allclose(
        [r["log_density"] for r in body["results"]], expected.log_density, atol=1e-9
    )
    assert body["accepted"] == [r["seed"] for r in body["results"] if r["accept"]]


async def test_sigma_override_changes_scores(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    latents = sample_latents(3, seed=8)
    response = await app_client.post(
        "/score", json={"model": MODEL, "latents": latents.tolist(), "sigma": 1.5}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sigma"] == 1.5
    expected = scorer.score(latents, 1.5)
    np.testing.assert_allclose(
        [r["log_density"] for r in body["results"]], expected.log_density, atol=1e-9
    )
    np.testing.assert_allclose([r["percentile"] for r in body["results"]], expected.percentile)


async def test_policy_override_and_cached_verdicts(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    # Near the data and far from it: the far ones are rejected under any strict policy.
    near = training_latents()[:3].copy()  # as sent: 8 numbers, not the 4 stored coordinates
    far = np.full((2, 8), 6.0, dtype=np.float32)
    latents = np.concatenate([near, far])
    payload = {"model": MODEL, "latents": latents.tolist()}
    first = (await app_client.post("/score", json=payload)).json()
    assert [r["cached"] for r in first["results"]] == [False] * 5
    expected = scorer.score(latents, None, {"psi"})
    reasons = decide(expected.percentile, scorer.manifest.policy, expected.descriptor_percentiles)
    assert [r["reasons"] for r in first["results"]] == reasons
    assert [r["accept"] for r in first["results"]] == [not why for why in reasons]
    assert PERCENTILE_BELOW_MIN in first["results"][3]["reasons"]  # the demo policy's floor

    # The same latents again with a policy that refuses everything: scores come from the
    # cache, the verdicts are recomputed for the new policy.
    strict = {**payload, "policy": {"min_percentile": 1.0}}
    second = (await app_client.post("/score", json=strict)).json()
    assert [r["cached"] for r in second["results"]] == [True] * 5
    assert [r["log_density"] for r in second["results"]] == [
        r["log_density"] for r in first["results"]
    ]
    below = [r["percentile"] < 1.0 for r in second["results"]]
    assert [not r["accept"] for r in second["results"]] == below
    assert second["accepted"] == [i for i, b in enumerate(below) if not b]

    lenient = {**payload, "policy": {"min_percentile": 0.0, "psi": {"max_percentile": 1.0}}}
    third = (await app_client.post("/score", json=lenient)).json()
    assert third["accepted"] == [0, 1, 2, 3, 4]
    assert all(r["cached"] and r["reasons"] == [] for r in third["results"])


async def test_cache_is_keyed_by_sigma(app_client: httpx.AsyncClient) -> None:
    latents = sample_latents(2, seed=21).tolist()
    await app_client.post("/score", json={"model": MODEL, "latents": latents})
    other = await app_client.post("/score", json={"model": MODEL, "latents": latents, "sigma": 2.0})
    assert [r["cached"] for r in other.json()["results"]] == [False, False]


async def test_no_sampler_model_scores_latents(app_client: httpx.AsyncClient) -> None:
    response = await app_client.post(
        "/score", json={"model": NOSAMPLER, "latents": [[0.0] * 6, [5.0] * 6]}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results[0]["log_density"] > results[1]["log_density"]


async def test_redis_cache_backend(
    settings: Settings, redis_url: str, serve: Callable[..., Any]
) -> None:
    latents = sample_latents(3, seed=31).tolist()
    async with serve(settings.model_copy(update={"redis_url": redis_url})) as client:
        first = await client.post("/score", json={"model": MODEL, "latents": latents})
        second = await client.post("/score", json={"model": MODEL, "latents": latents})
    assert first.status_code == second.status_code == 200
    assert [r["cached"] for r in first.json()["results"]] == [False] * 3
    assert [r["cached"] for r in second.json()["results"]] == [True] * 3
    assert second.json()["results"][0]["log_density"] == first.json()["results"][0]["log_density"]


async def test_redis_down_keeps_answering_and_counts_errors(
    settings: Settings, private_redis: Callable[..., Any], serve: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """docs/contract.md §3 / issue 3: with Redis gone the gateway computes, answers 200 and
    counts."""
    latents = sample_latents(4, seed=41).tolist()
    body = {"model": MODEL, "latents": latents}
    with private_redis(tmp_path) as (url, redis_process):
        async with serve(settings.model_copy(update={"redis_url": url})) as client:
            warm = await client.post("/score", json=body)
            assert [r["cached"] for r in warm.json()["results"]] == [False] * 4
            hit = await client.post("/score", json=body)
            assert [r["cached"] for r in hit.json()["results"]] == [True] * 4
            redis_process.kill()
            redis_process.wait()
            for _ in range(3):
                down = await client.post("/score", json=body)
                assert down.status_code == 200, down.text
                results = down.json()["results"]
                assert [r["cached"] for r in results] == [False] * 4
                assert [r["log_density"] for r in results] == [
                    r["log_density"] for r in warm.json()["results"]
                ]
            metrics = (await client.get("/metrics")).text
    errors = [
        line for line in metrics.splitlines()
        if line.startswith("latentsieve_cache_errors_total ")
    ]
    assert len(errors) == 1 and float(errors[0].split()[1]) >= 3


async def test_a_partial_policy_override_keeps_the_models_other_rules(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    """Only the fields a request sets replace the model's policy."""
    model_min = scorer.manifest.policy.min_percentile
    assert model_min > 0
    far = [[6.0] * 8]  # far from every training latent: percentile 0
    body = {"model": MODEL, "latents": far, "policy": {"psi": {"max_percentile": 1.0}}}
    result = (await app_client.post("/score", json=body)).json()["results"][0]
    assert result["percentile"] < model_min
    assert result["reasons"] == [PERCENTILE_BELOW_MIN]  # the psi bound was relaxed, not this
    relaxed = {**body, "policy": {"min_percentile": 0.0}}
    assert (await app_client.post("/score", json=relaxed)).json()["results"][0]["accept"]


async def test_percentiles_at_another_sigma_match_a_float64_reference(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    """Independent of the engine: equation (1) in float64 over the demo's kept coordinates,
    and the percentile as the share of the calibration draws (the recorded seeds, drawn here
    with torch's recipe) whose float64 score at the request's sigma is <= the score."""
    from latentsieve.workers.density import log_density_reference

    manifest = scorer.manifest
    sigma = 0.37  # not the build's sigma: percentiles need a calibration at this sigma
    assert sigma != manifest.bandwidth.sigma and manifest.projection is not None
    kept = list(manifest.projection.kept or ())
    training = index_latents().astype(np.float64)[:, kept]  # the demo index: half A
    calibration = manifest.calibration
    assert calibration.seed_start is not None
    draws = np.stack([
        torch.randn(8, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
        for seed in range(calibration.seed_start, calibration.seed_start + calibration.count)
    ])[:, kept]
    reference = np.sort(log_density_reference(draws, training, sigma))
    latents = sample_latents(6, seed=12)
    response = await app_client.post(
        "/score", json={"model": MODEL, "latents": latents.tolist(), "sigma": sigma}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    want = log_density_reference(latents[:, kept].astype(np.float64), training, sigma)
    got = np.array([r["log_density"] for r in results])
    np.testing.assert_allclose(got, want, atol=1e-4)  # docs/contract.md §1
    brute = [(reference <= value).mean() for value in got]
    # One calibration rank of slack: float32 and float64 scores may order a near-tie apart.
    np.testing.assert_allclose(
        [r["percentile"] for r in results], brute, atol=1.5 / calibration.count
    )
    # At the build's sigma the percentiles differ: the test can tell the two apart.
    assert not np.allclose(brute, scorer.score(latents).percentile)
