"""``digits-vae``: a small VAE over scikit-learn's bundled 8x8 ``load_digits`` images.

The model is a bundled demo for LatentSieve: its decoder maps 8-dim latents to 64 pixel
intensities in ``[0, 1]`` and its encoder means over the 1797 training digits serve as the
training-latent set. Weights are produced deterministically by
``python -m latentsieve.workers.demo_models.train_digits_vae`` and shipped as
``digits_vae.safetensors`` next to this module.

Activations are separate ``nn.Module`` instances (never functional calls) so that forward hooks
on activation modules can observe them.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

LATENT_DIM = 8
OUTPUT_DIM = 64
HIDDEN_DIMS = (128, 64)
WEIGHTS_PATH = Path(__file__).with_name("digits_vae.safetensors")


class DigitsVAE(nn.Module):
    """MLP VAE: encoder 64 -> 128 -> 64 -> (mu, logvar) in 8 dims; decoder 8 -> 64 -> 128 -> 64."""

    def __init__(self) -> None:
        super().__init__()
        h1, h2 = HIDDEN_DIMS
        self.encoder_body = nn.Sequential(
            nn.Linear(OUTPUT_DIM, h1),
            nn.ReLU(),
            nn.Linear(h1, h2),
            nn.ReLU(),
        )
        self.encoder_mu = nn.Linear(h2, LATENT_DIM)
        self.encoder_logvar = nn.Linear(h2, LATENT_DIM)
        self.decoder = nn.Sequential(
            nn.Linear(LATENT_DIM, h2),
            nn.ReLU(),
            nn.Linear(h2, h1),
            nn.ReLU(),
            nn.Linear(h1, OUTPUT_DIM),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode pixels ``(n, 64)`` in ``[0, 1]`` to ``(mu, logvar)``, each ``(n, 8)``."""
        h = self.encoder_body(x)
        return self.encoder_mu(h), self.encoder_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents ``(n, 8)`` to pixel intensities ``(n, 64)`` in ``[0, 1]``."""
        return cast(torch.Tensor, self.decoder(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction ``(n, 64) -> (n, 64)`` through the encoder mean."""
        mu, _ = self.encode(x)
        return self.decode(mu)


def digits_pixels() -> np.ndarray:
    """All ``load_digits`` images as float32 ``(1797, 64)`` scaled from ``0..16`` to ``[0, 1]``."""
    from sklearn.datasets import load_digits  # the demo extra: only building the demo needs it

    data = cast(np.ndarray, load_digits().data)
    return (data / 16.0).astype(np.float32)


def load_vae(path: Path | str = WEIGHTS_PATH) -> DigitsVAE:
    """Load the shipped weights into a float32 :class:`DigitsVAE` in eval mode."""
    model = DigitsVAE()
    model.load_state_dict(load_file(str(path)))
    return model.float().eval()


def decoder() -> nn.Module:
    """Decoder of the shipped VAE (eval mode): ``(n, 8) -> (n, 64)`` in ``[0, 1]``."""
    return load_vae().decoder


def training_latents() -> np.ndarray:
    """Encoder means of all ``load_digits`` images: float32 ``(1797, 8)``."""
    model = load_vae()
    x = torch.from_numpy(digits_pixels())
    with torch.no_grad():
        mu, _ = model.encode(x)
    return mu.numpy().astype(np.float32, copy=False)


def posterior_samples(per_image: int = 1, seed: int = 0) -> np.ndarray:
    """``per_image`` draws ``mu + sd * eps`` from each image's posterior q(z|x), seeded: float32
    ``(1797 * per_image, 8)`` (the index set of posterior samples, docs/evidence.md)."""
    model = load_vae()
    x = torch.from_numpy(digits_pixels())
    with torch.no_grad():
        mu, logvar = model.encode(x)
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((per_image, *mu.shape), generator=generator)
    draws = mu[None] + torch.exp(0.5 * logvar)[None] * eps
    return draws.reshape(-1, LATENT_DIM).numpy().astype(np.float32, copy=False)
