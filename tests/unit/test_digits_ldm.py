"""The bundled latent diffusion model in miniature: shipped weights, deterministic DDIM
sampling and inversion, deterministic training, and its demo index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentsieve.demo import LDM_MAPPING, LDM_MODEL, ensure_demo_index
from latentsieve.index.store import LatentStore
from latentsieve.workers.demo_models.digits_ldm import (
    WEIGHTS_PATH,
    alphas_cumprod,
    ddim_invert,
    ddim_sample,
    ddim_timesteps,
    generator,
    load_denoiser,
    sampler,
)
from latentsieve.workers.demo_models.digits_vae import training_latents
from latentsieve.workers.demo_models.train_digits_ldm import train


def noise(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 8, generator=torch.Generator().manual_seed(seed))


def test_schedule_and_timesteps() -> None:
    alpha_bar = alphas_cumprod()
    assert alpha_bar.shape == (1000,) and bool((alpha_bar[1:] < alpha_bar[:-1]).all())
    assert 0 < float(alpha_bar[-1]) < 1e-3  # x_T is almost pure noise
    steps = ddim_timesteps(25)
    assert len(steps) == 25 and steps[0] == 960 and steps[-1] == 0


def test_shipped_weights_sample_deterministically() -> None:
    assert WEIGHTS_PATH.is_file() and WEIGHTS_PATH.stat().st_size < 1_000_000
    denoiser = load_denoiser()
    with torch.no_grad():
        first = ddim_sample(denoiser, noise(2))
    # Pinned: a change of the shipped weights, the schedule or the sampler moves these.
    pinned = [
        [-0.2607, -1.0802, -0.0079, -0.9314, 0.5508, 0.0400, -0.1092, -1.8424],
        [0.0799, -1.4406, -0.0013, 0.6861, -0.3700, 0.0260, 0.0863, -0.2401],
    ]
    np.testing.assert_allclose(first.numpy(), pinned, atol=2e-4)
    # The samples land where the training latents are: their spread matches coordinate-wise.
    with torch.no_grad():
        many = ddim_sample(denoiser, noise(2000)).numpy()
    train_sd = training_latents().std(axis=0)
    active = train_sd > 0.5
    np.testing.assert_allclose(many.std(axis=0)[active], train_sd[active], rtol=0.25)


def test_inversion_round_trip() -> None:
    denoiser = load_denoiser()
    latents = torch.from_numpy(training_latents()[:200])
    with torch.no_grad():
        inverted = ddim_invert(denoiser, latents)
        back = ddim_sample(denoiser, inverted)
    # DDIM inversion is approximate (each step reuses the noise of the less noisy end).
    assert float((back - latents).abs().mean()) < 0.1
    assert float((inverted - latents).abs().mean()) > 0.2  # it did move to noise space


def test_factories_map_noise_to_latents_and_pixels() -> None:
    z = noise(5)
    with torch.no_grad():
        latents = sampler()(z)
        pixels = generator()(z)
    assert latents.shape == (5, 8) and pixels.shape == (5, 64)
    assert bool(((pixels >= 0) & (pixels <= 1)).all())


def test_training_is_deterministic() -> None:
    first = train(steps=30)
    second = train(steps=30)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.timeout(120)
def test_demo_index_scores_the_sampled_latent(tmp_path: Path) -> None:
    ensure_demo_index(tmp_path, LDM_MODEL)
    manifest = LatentStore(tmp_path).load(LDM_MODEL).manifest
    assert manifest.mapping is not None and manifest.mapping.spec == LDM_MAPPING
    assert manifest.latent_set == "encoder-means-half-a"  # half B trains the judges
    # Against the mapped draws every coordinate is active: the sampled latents spread like
    # the training latents, so the index keeps the latent space as it is.
    assert manifest.projection is None and manifest.exact is True
    assert manifest.bandwidth.rule == "knn_median" and manifest.bandwidth.k == 1


def test_a_changed_demo_module_rebuilds_and_a_stale_index_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from latentsieve.cli import main
    from latentsieve.index.manifest import IndexManifest

    first = ensure_demo_index(tmp_path, LDM_MODEL)
    path = tmp_path / LDM_MODEL / first / "manifest.json"
    manifest = IndexManifest.model_validate_json(path.read_text())
    assert manifest.mapping is not None
    # As if the version had been built by an older release of the demo module.
    stale = manifest.model_copy(
        update={"mapping": manifest.mapping.model_copy(update={"sha256": "0" * 64})}
    )
    path.write_text(stale.model_dump_json())
    capsys.readouterr()
    assert main(["score", "--store", str(tmp_path), "--model", LDM_MODEL, "--seeds", "0-3",
                 "--sigma", "0.3"]) == 2
    assert "source changed since the index was built" in capsys.readouterr().err
    second = ensure_demo_index(tmp_path, LDM_MODEL)
    assert second != first and LatentStore(tmp_path).newest(LDM_MODEL) == second
