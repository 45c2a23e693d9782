"""Tests for the bundled ``digits-vae`` demo model and its deterministic training script."""

from __future__ import annotations

import numpy as np
import torch

from latentsieve.workers.demo_models.digits_vae import (
    LATENT_DIM,
    OUTPUT_DIM,
    WEIGHTS_PATH,
    DigitsVAE,
    decoder,
    digits_pixels,
    load_vae,
    training_latents,
)
from latentsieve.workers.demo_models.train_digits_vae import train


def test_shipped_weights_load_and_decoder_shapes() -> None:
    assert WEIGHTS_PATH.is_file()
    assert WEIGHTS_PATH.stat().st_size < 1_000_000
    model = load_vae()
    assert isinstance(model, DigitsVAE)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())

    dec = decoder()
    assert isinstance(dec, torch.nn.Module)
    z = torch.randn(5, LATENT_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = dec(z)
    assert out.shape == (5, OUTPUT_DIM)
    assert out.dtype == torch.float32
    assert bool(((out >= 0) & (out <= 1)).all())


def test_decoder_has_activation_modules() -> None:
    # Hook-based features need activation layers as modules, not functional calls.
    kinds = [type(m) for m in decoder().modules()]
    assert torch.nn.ReLU in kinds
    assert torch.nn.Sigmoid in kinds


def test_training_latents_shape_and_spread() -> None:
    latents = training_latents()
    assert latents.shape == (1797, LATENT_DIM)
    assert latents.dtype == np.float32
    assert np.isfinite(latents).all()
    assert int((latents.std(axis=0) > 0.05).sum()) >= 4
    np.testing.assert_array_equal(latents, training_latents())


def test_reconstruction_beats_mean_image() -> None:
    x = torch.from_numpy(digits_pixels())
    model = load_vae()
    with torch.no_grad():
        mu, _ = model.encode(x)
        recon = model.decode(mu)
    recon_mse = float(((recon - x) ** 2).mean())
    mean_mse = float(((x.mean(dim=0, keepdim=True) - x) ** 2).mean())
    assert recon_mse * 2.0 <= mean_mse, (recon_mse, mean_mse)


def test_short_training_is_deterministic() -> None:
    first = train(epochs=3)
    second = train(epochs=3)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, second[name]), name
