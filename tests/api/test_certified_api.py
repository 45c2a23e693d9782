"""A certified ``ivf`` model through the gateway (embedded compute): every score carries its
bound, ``max_error`` chooses it, the cache keeps bounds apart, bad bounds are 422. Expected
values come from float64 equation (1) over the index's stored latents."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.store import LatentStore
from latentsieve.service.settings import Settings
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.density import log_density_reference

pytestmark = pytest.mark.anyio
MODEL, DIM, SIGMA = "lists", 8, 1.5


@pytest.fixture(scope="module")
def ivf_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certified") / "store"
    rng = np.random.default_rng(8)
    centres = rng.normal(0.0, 4.0, (12, DIM))
    latents = centres[rng.integers(0, 12, 3000)] + rng.normal(0.0, 1.0, (3000, DIM))
    source = root.parent / "latents.npy"
    np.save(source, latents.astype(np.float32))
    build_version(LatentStore(root), BuildOptions(
        model=MODEL, latents_file=source, sigma=str(SIGMA), space="raw", kind="ivf", nlist=32,
        sampler="torch-cpu", calibration_count=300, progress=False,
    ), calibrate_build)
    return root


@pytest.fixture(scope="module")
def stored(ivf_store: Path) -> np.ndarray:
    lists = LatentStore(ivf_store).load(MODEL).shards[0].lists
    assert lists is not None
    return lists.reconstruct()


def queries(count: int = 12, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, 4.0, (count, DIM))).astype(np.float32)


def scores(body: dict[str, object]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    results = body["results"]
    assert isinstance(results, list)
    return (np.array([r["log_density"] for r in results]),
            np.array([r["error_bound"] for r in results]), [r["cached"] for r in results])


async def test_every_score_is_inside_its_bound_and_the_cache_keeps_bounds_apart(
    ivf_store: Path, stored: np.ndarray, serve: object
) -> None:
    sent = queries()
    want = log_density_reference(sent, stored, SIGMA)
    settings = Settings(store=ivf_store, reload_interval_s=60.0)
    async with serve(settings) as client:  # type: ignore[operator]
        seen = {}
        for max_error in (None, 0.2, 0.0, None):
            body = {"model": MODEL, "latents": sent.tolist()}
            if max_error is not None:
                body["max_error"] = max_error
            response = await client.post("/score", json=body)
            assert response.status_code == 200, response.text
            got, bounds, cached = scores(response.json())
            assert response.json()["exact"] is False
            limit = 0.01 if max_error is None else max_error
            assert np.all(bounds <= max(limit, 1e-6)), bounds
            assert np.all(np.abs(got - want) <= bounds + 1e-9)
            key = max_error
            if key in seen:  # the same bound again: served from the cache, bounds and all
                assert all(cached)
                np.testing.assert_array_equal(bounds, seen[key])
            else:
                assert not any(cached)  # another bound is another cache entry
                seen[key] = bounds
        # /select ranks the seeds' draws by the certified estimate and reports their bounds.
        picked = await client.post("/select", json={
            "model": MODEL, "count": 6, "keep": 3, "max_error": 0.2})
        assert picked.status_code == 200, picked.text
        results = picked.json()["results"]
        draws = torch.stack([torch.randn(DIM, generator=torch.Generator("cpu").manual_seed(seed))
                             for seed in range(6)]).numpy()
        exact = log_density_reference(draws, stored, SIGMA)
        chosen = [r["seed"] for r in results]
        assert [r["log_density"] for r in results] == sorted(
            (r["log_density"] for r in results), reverse=True)
        # Ranked by estimates within 0.2 nats: no seed left out beats a kept one by more.
        for kept in chosen:
            for other in set(range(6)) - set(chosen):
                assert exact[kept] >= exact[other] - 0.4
        for result in results:
            assert result["error_bound"] <= 0.2
            assert abs(result["log_density"] - exact[result["seed"]]) <= result["error_bound"]
        # Asked for exact scores (below the index's default bound), /select keeps the best three.
        exact_pick = await client.post("/select", json={
            "model": MODEL, "count": 6, "keep": 3, "max_error": 0.0})
        assert exact_pick.status_code == 200, exact_pick.text
        best = sorted(range(6), key=lambda seed: -exact[seed])[:3]
        assert [r["seed"] for r in exact_pick.json()["results"]] == best
        for result in exact_pick.json()["results"]:
            assert result["error_bound"] <= 1e-6
            assert abs(result["log_density"] - exact[result["seed"]]) <= 1e-6


@pytest.mark.parametrize("bad", [-0.01, "0.1", True, None, [0.1], {"nats": 0.1}])
async def test_a_bad_max_error_is_422_and_names_the_field(
    ivf_store: Path, serve: object, bad: object
) -> None:
    settings = Settings(store=ivf_store, reload_interval_s=60.0)
    async with serve(settings) as client:  # type: ignore[operator]
        body = {"model": MODEL, "latents": queries(2).tolist(), "max_error": bad}
        response = await client.post("/score", json=body)
        if bad is None:  # null is "not given": the index's bound
            assert response.status_code == 200, response.text
            return
        assert response.status_code == 422, response.text
        assert "max_error" in response.text


async def test_exact_models_meet_any_bound(app_client: httpx.AsyncClient) -> None:
    response = await app_client.post("/score", json={
        "model": "digits-vae", "seeds": [1, 2], "max_error": 0.0})
    assert response.status_code == 200, response.text
    assert [r["error_bound"] for r in response.json()["results"]] == [0.0, 0.0]


async def test_select_with_descriptor_rules_keeps_the_asked_bound(
    tmp_path: Path, serve: object
) -> None:
    """A certified model with a generator and the demo's psi rule: /select recomputes the kept
    seeds with descriptors, and those scores keep the bound the request asked for (0: exact),
    not the index's default (0.5 nats here, so the two differ)."""
    from latentsieve.demo import DEMO_GENERATOR, DEMO_POLICY
    from latentsieve.workers.calibration import draw_mapped_queries
    from latentsieve.workers.demo_models.digits_vae import LATENT_DIM, training_latents

    root = tmp_path / "store"
    source = tmp_path / "digits.npy"
    np.save(source, training_latents())
    build_version(LatentStore(root), BuildOptions(
        model="digits-ivf", latents_file=source, sigma="1.0", space="raw", kind="ivf", nlist=16,
        sampler=f"torch-cpu:float32:{LATENT_DIM}", generator=DEMO_GENERATOR,
        policy=DEMO_POLICY, max_error=0.5, calibration_count=200, progress=False,
    ), calibrate_build, draw_mapped_queries)
    lists = LatentStore(root).load("digits-ivf").shards[0].lists
    assert lists is not None
    async with serve(Settings(store=root, reload_interval_s=60.0)) as client:  # type: ignore[operator]
        picked = await client.post("/select", json={
            "model": "digits-ivf", "count": 8, "keep": 3, "max_error": 0.0})
    assert picked.status_code == 200, picked.text
    results = picked.json()["results"]
    assert results and all("psi" in r["descriptors"] for r in results)
    draws = torch.stack([
        torch.randn(LATENT_DIM, generator=torch.Generator("cpu").manual_seed(r["seed"]))
        for r in results]).numpy()
    exact = log_density_reference(draws, lists.reconstruct(), 1.0)
    for result, want in zip(results, exact, strict=True):
        assert result["error_bound"] <= 1e-6
        assert abs(result["log_density"] - want) <= 1e-6


async def test_rows_the_bounds_cannot_prune_come_back_dense_and_tighter(
    ivf_store: Path, stored: np.ndarray, serve: object
) -> None:
    """3,000 latents in 32 lists: probing any list costs more than one GEMM over all of them,
    so the cost model answers every row by the dense pass (workers/certified.py), whose bound
    is its rounding alone: well inside the asked max_error, and still around the reference."""
    from latentsieve.workers.certified import DENSE_SHARE

    sent = queries(8, seed=5)
    want = log_density_reference(sent, stored, SIGMA)
    async with serve(Settings(store=ivf_store, reload_interval_s=60.0)) as client:  # type: ignore[operator]
        response = await client.post("/score", json={
            "model": MODEL, "latents": sent.tolist(), "max_error": 0.1})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200, response.text
    # The operator sees the decision: every row of this request went dense.
    dense = [line for line in metrics.splitlines() if line.startswith(
        f'latentsieve_certified_rows{{model="{MODEL}",path="dense"}}')]
    assert dense and float(dense[0].rsplit(" ", 1)[1]) >= len(sent), metrics[-2000:]
    got, bounds, _ = scores(response.json())
    assert np.all(bounds <= DENSE_SHARE * 0.1), bounds
    assert np.all(np.abs(got - want) <= bounds + 1e-9)
