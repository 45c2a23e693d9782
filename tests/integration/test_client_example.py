"""The typed clients and the diffusers example against a real ``latentsieve serve`` process."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import latentsieve_command, running_server

from latentsieve.service.client import (
    AsyncLatentSieveClient,
    LatentSieveClient,
    LatentSieveError,
    ScoreResponse,
    encode_latents,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "diffusers_seed_filter.py"
MODEL = "digits-vae"
SEEDS = [0, 1, 2, 3, 41]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``latentsieve serve`` on the demo store, on a free loopback port, until ready."""
    store = tmp_path_factory.mktemp("store")
    subprocess.run([*latentsieve_command(), "demo", "--store", str(store)], check=True,
                   capture_output=True, timeout=240)
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with running_server(store, 2.0, log) as server:
        yield server.url


def demo_latents(seeds: list[int]) -> np.ndarray:
    """The demo sampler recipe torch-cpu:float32:8, drawn here on the client side."""
    return np.stack([
        torch.randn((8,), generator=torch.Generator("cpu").manual_seed(seed),
                    dtype=torch.float32).numpy()
        for seed in seeds
    ])


def test_encode_latents_is_little_endian_float32() -> None:
    latents = np.arange(12, dtype=np.float64).reshape(2, 3, 2) / 3
    encoded = encode_latents(latents)
    assert encoded["dtype"] == "float32" and encoded["shape"] == [2, 3, 2]
    decoded = np.frombuffer(base64.b64decode(encoded["data"]), dtype="<f4").reshape(2, 3, 2)
    np.testing.assert_array_equal(decoded, latents.astype(np.float32))
    with pytest.raises(ValueError, match="batch axis"):
        encode_latents(np.zeros(8, np.float32))


def assert_seed_and_latent_scores_agree(by_seed: ScoreResponse, by_latent: ScoreResponse) -> None:
    assert [result.seed for result in by_seed.results] == SEEDS
    assert all(result.seed is None for result in by_latent.results)
    np.testing.assert_allclose(
        [result.log_density for result in by_latent.results],
        [result.log_density for result in by_seed.results],
        rtol=0, atol=1e-6,
    )
    for result in by_seed.results:
        assert 0.0 <= result.percentile <= 1.0
        assert result.accept == (not result.reasons)
    assert by_seed.accepted == [r.seed for r in by_seed.results if r.accept]
    assert by_latent.accepted == [i for i, r in enumerate(by_latent.results) if r.accept]


def test_sync_client(server_url: str) -> None:
    with LatentSieveClient(server_url) as client:
        assert client.ready()
        models = {info.name: info for info in client.models()}
        info = models[MODEL]
        assert info.d == 8 and info.n > 0 and info.sigma > 0
        assert info.sampler == "torch-cpu:float32:8"

        by_seed = client.score(MODEL, seeds=SEEDS)
        by_latent = client.score(MODEL, latents=demo_latents(SEEDS))
        assert by_seed.model == MODEL and by_seed.sigma == info.sigma
        assert_seed_and_latent_scores_agree(by_seed, by_latent)

        again = client.score(MODEL, latents=demo_latents(SEEDS))
        assert [r.log_density for r in again.results] == [r.log_density for r in by_latent.results]
        assert all(result.cached for result in again.results)

        strict = {"min_percentile": 1.0}
        wide = client.score(MODEL, seeds=SEEDS, sigma=2 * info.sigma, policy=strict)
        assert wide.sigma == 2 * info.sigma
        rejected = [result for result in wide.results if not result.accept]
        assert rejected and all("percentile_below_min" in r.reasons for r in rejected)

        best = client.select(MODEL, start=100, count=300, keep=6)
        seeds = [result.seed for result in best.results]
        assert len(set(seeds)) == 6
        assert all(seed is not None and 100 <= seed < 400 for seed in seeds)
        densities = [result.log_density for result in best.results]
        assert densities == sorted(densities, reverse=True)

        spread = client.select(MODEL, start=100, count=300, keep=4, min_distance=2.0)
        kept = demo_latents([int(r.seed or 0) for r in spread.results])
        gaps = np.linalg.norm(kept[:, None] - kept[None], axis=-1)[np.triu_indices(len(kept), 1)]
        assert np.all(gaps >= 2.0)

        with pytest.raises(LatentSieveError) as unknown:
            client.score("no-such-model", seeds=[1])
        assert unknown.value.status == 404 and "no-such-model" in str(unknown.value.detail)
        with pytest.raises(LatentSieveError) as bad_sigma:
            client.score(MODEL, seeds=[1], sigma=-1.0)
        assert bad_sigma.value.status == 422
        with pytest.raises(LatentSieveError) as wrong_dim:
            client.score(MODEL, latents=np.zeros((2, 7), np.float32))
        assert wrong_dim.value.status == 422


@pytest.mark.anyio
async def test_async_client(server_url: str) -> None:
    async with AsyncLatentSieveClient(server_url, timeout=10) as client:
        assert await client.ready()
        assert MODEL in {info.name for info in await client.models()}
        by_seed = await client.score(MODEL, seeds=SEEDS)
        by_latent = await client.score(MODEL, latents=demo_latents(SEEDS))
        assert_seed_and_latent_scores_agree(by_seed, by_latent)
        best = await client.select(MODEL, start=0, count=200, keep=3)
        assert len(best.results) == 3
        with pytest.raises(LatentSieveError) as unknown:
            await client.select("no-such-model", start=0, count=10, keep=1)
        assert unknown.value.status == 404


def test_example_dry_run_prints_the_selected_seeds(server_url: str) -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--dry-run", "--url", server_url,
         "--start", "500", "--count", "200", "--keep", "4"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr + completed.stdout
    kept_lines = [line for line in completed.stdout.splitlines()
                  if line.startswith("kept seeds:")]
    assert len(kept_lines) == 1
    printed = [int(seed) for seed in kept_lines[0].removeprefix("kept seeds:").split()]
    with LatentSieveClient(server_url) as client:
        expected = client.select(MODEL, start=500, count=200, keep=4)
    assert printed == [result.seed for result in expected.results]
    assert "hand-off check" in completed.stdout
