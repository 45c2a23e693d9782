"""Descriptors through ``POST /score`` and ``/select``: the scorer's numbers, cached with the
generator, decided by policy bounds, exported as metrics (docs/contract.md §2, §3, §6)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from latentsieve.cli import main
from latentsieve.index.store import LatentStore
from latentsieve.service.offline import SyncScorer
from latentsieve.service.settings import Settings
from latentsieve.workers.demo_models.digits_vae import decoder, training_latents

pytestmark = pytest.mark.anyio
MODEL = "digits-vae"
ALL = ["psi", "nu", "delta"]


@pytest.fixture(scope="module")
def scorer(store_root: Path) -> Iterator[SyncScorer]:
    with SyncScorer(LatentStore(store_root).load(MODEL)) as scorer:
        yield scorer


def latents(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 8)).astype(np.float32)


async def test_descriptors_match_the_scorer_and_are_cached(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    batch = latents(6, seed=11)
    body = {"model": MODEL, "latents": batch.tolist(), "descriptors": ALL}
    first = (await app_client.post("/score", json=body)).json()
    expected = scorer.score(batch, None, ALL)
    for name in ALL:
        got = [result["descriptors"][name] for result in first["results"]]
        np.testing.assert_allclose(got, expected.descriptors[name], rtol=1e-12)
        ranks = [result["descriptors"][f"{name}_percentile"] for result in first["results"]]
        np.testing.assert_array_equal(ranks, expected.descriptor_percentiles[name])
        assert all(0.0 <= rank <= 1.0 for rank in ranks)
    assert all(isinstance(r["descriptors"]["delta"], int) for r in first["results"])
    assert all(r["cached"] is False for r in first["results"])
    second = (await app_client.post("/score", json=body)).json()
    assert all(r["cached"] is True for r in second["results"])
    assert [r["descriptors"] for r in second["results"]] == [
        r["descriptors"] for r in first["results"]
    ]
    # Another descriptor set is another cache entry, and returns only what it asked for.
    only_psi = (
        await app_client.post("/score", json={**body, "descriptors": ["psi"]})
    ).json()["results"]
    assert all(set(r["descriptors"]) == {"psi", "psi_percentile"} for r in only_psi)
    assert all(r["cached"] is False for r in only_psi)


async def test_policy_bounds_reject_with_reasons(app_client: httpx.AsyncClient) -> None:
    batch = latents(40, seed=12)
    policy = {"min_percentile": 0.0, "psi": {"min_percentile": 0.5}, "nu": {"max_percentile": 0.5},
              "rank_sum": None}  # the request's fields replace the model's
    body = {"model": MODEL, "latents": batch.tolist(), "policy": policy}
    results = (await app_client.post("/score", json=body)).json()["results"]
    for result in results:
        described = result["descriptors"]  # computed because the policy bounds them
        expected = []
        if described["psi_percentile"] < 0.5:
            expected.append("psi_percentile_below_min")
        if described["nu_percentile"] > 0.5:
            expected.append("nu_percentile_above_max")
        assert result["reasons"] == expected
        assert result["accept"] == (not expected)
    reasons = {reason for result in results for reason in result["reasons"]}
    assert reasons == {"psi_percentile_below_min", "nu_percentile_above_max"}
    metrics = (await app_client.get("/metrics")).text
    assert 'latentsieve_descriptor_count{model="digits-vae",name="psi"}' in metrics
    # One count per rejected latent, every failed rule in its reason label.
    rejected: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("latentsieve_decisions_total{") and 'decision="reject"' in line:
            reason = line.split('reason="')[1].split('"')[0]
            rejected[reason] = float(line.rsplit(" ", 1)[1])
    expected: dict[str, float] = {}
    for result in results:
        if result["reasons"]:
            key = ",".join(result["reasons"])
            expected[key] = expected.get(key, 0) + 1
    assert {k: v for k, v in rejected.items() if k in expected} == expected


async def test_select_decides_kept_seeds_with_descriptor_bounds(
    app_client: httpx.AsyncClient,
) -> None:
    body = {"model": MODEL, "start": 0, "count": 64, "keep": 8,
            "policy": {"psi": {"max_percentile": 0.9}}}
    answer = (await app_client.post("/select", json=body)).json()
    assert len(answer["results"]) == 8
    for result in answer["results"]:
        too_high = result["descriptors"]["psi_percentile"] > 0.9
        assert ("psi_percentile_above_max" in result["reasons"]) == too_high
    assert answer["accepted"] == [r["seed"] for r in answer["results"] if r["accept"]]


async def test_delta_on_a_torchscript_generator_is_refused(
    tmp_path: Path, serve: Callable[[Settings], AbstractAsyncContextManager[httpx.AsyncClient]]
) -> None:
    source = tmp_path / "z.npy"
    np.save(source, training_latents()[:200])
    scripted = tmp_path / "decoder.pt"
    torch.jit.script(decoder()).save(str(scripted))
    assert main(["index", "build", "--store", str(tmp_path / "store"), "--model", "scripted",
                 "--latents", str(source), "--sigma", "0.5", "--generator", str(scripted),
                 "--descriptor-calibration-count", "50", "--no-progress"]) == 0
    async with serve(Settings(store=tmp_path / "store", reload_interval_s=60.0)) as client:
        body = {"model": "scripted", "latents": latents(2, seed=1).tolist()}
        refused = await client.post("/score", json={**body, "descriptors": ["psi", "delta"]})
        assert refused.status_code == 422
        assert "computes only nu, psi" in refused.json()["detail"]
        allowed = await client.post("/score", json={**body, "descriptors": ["psi"]})
        assert allowed.status_code == 200
        assert "psi" in allowed.json()["results"][0]["descriptors"]


async def test_a_rank_sum_policy_rejects_by_the_mean_of_two_percentiles(
    app_client: httpx.AsyncClient, scorer: SyncScorer
) -> None:
    batch = latents(64, seed=21)
    body = {"model": MODEL, "latents": batch.tolist(),
            # the request's fields replace the model's (its psi bound is cleared with null)
            "policy": {"min_percentile": 0.0, "psi": None, "rank_sum": {"min_score": 0.45}}}
    answer = await app_client.post("/score", json=body)
    assert answer.status_code == 200, answer.text
    expected = scorer.score(batch, None, ["psi"])
    combined = (expected.percentile + 1.0 - expected.descriptor_percentiles["psi"]) / 2.0
    results = answer.json()["results"]
    got = [r["reasons"] == ["rank_sum_below_min"] for r in results]
    assert got == (combined < 0.45).tolist()
    assert [r["accept"] for r in results] == (combined >= 0.45).tolist()
    # psi is computed because the rule needs it, and reported with the result
    assert all("psi_percentile" in r["descriptors"] for r in results)
    assert 0 < sum(not r["accept"] for r in results) < len(results)  # the rule decided something


@pytest.mark.parametrize("rule", [{"min_score": 1.5}, {"min_score": "0.5"}, {}, {"min": 0.2},
                                  {"min_score": 0.2, "weights": [1, 1]}])
async def test_a_bad_rank_sum_is_a_422_that_names_it(
    app_client: httpx.AsyncClient, rule: dict[str, object]
) -> None:
    body = {"model": MODEL, "latents": latents(1, seed=1).tolist(),
            "policy": {"rank_sum": rule}}
    answer = await app_client.post("/score", json=body)
    assert answer.status_code == 422
    assert "rank_sum" in answer.text
