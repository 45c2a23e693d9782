"""``digits-ldm``: a latent diffusion model in miniature over the ``digits-vae`` latent space.

The analogue of a text-to-image pipeline, small enough to train on a CPU in a minute: a denoiser
``eps(x_t, t)`` (an MLP) learns the encoder means of the 1797 ``load_digits`` images in the
8-dim latent space of :mod:`latentsieve.workers.demo_models.digits_vae`; a deterministic DDIM
sampler (Song et al., 2021, eq. 12 with ``eta = 0``) maps seeded N(0, I) starting noise to a
latent, and the VAE decoder renders it. As with Stable Diffusion, what a seed fixes is the
starting noise, and that is what LatentSieve scores.

Weights are produced deterministically by ``python -m
latentsieve.workers.demo_models.train_digits_ldm`` and shipped as ``digits_ldm.safetensors``
next to this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from latentsieve.workers.demo_models.digits_vae import LATENT_DIM, load_vae, training_latents

WEIGHTS_PATH = Path(__file__).with_name("digits_ldm.safetensors")
TRAIN_STEPS = 1000  # T of the noise schedule
BETA_START, BETA_END = 1e-4, 0.02  # DDPM's linear schedule (Ho et al., 2020)
SAMPLING_STEPS = 25  # DDIM steps from x_T to x_0
PREVIEW_STEPS = 10  # DDIM steps of the cheaper preview mapping
HIDDEN = 256
TIME_FEATURES = 32


def alphas_cumprod() -> torch.Tensor:
    """``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` of the linear schedule, float64 ``(T,)``."""
    betas = torch.linspace(BETA_START, BETA_END, TRAIN_STEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(steps: int = SAMPLING_STEPS) -> list[int]:
    """Descending timesteps spaced ``T // steps`` apart, ending at 0 ("leading" spacing, as
    diffusers): 960, 920, ..., 0 for 25 steps."""
    stride = TRAIN_STEPS // steps
    return list(range(0, TRAIN_STEPS, stride))[::-1]


def time_features(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``(n,)`` -> ``(n, TIME_FEATURES)``."""
    half = TIME_FEATURES // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class Denoiser(nn.Module):
    """``eps_theta(x_t, t)``: MLP over ``[x_t, time features]`` -> predicted noise ``(n, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(LATENT_DIM + TIME_FEATURES, HIDDEN),
            nn.SiLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.SiLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.SiLU(),
            nn.Linear(HIDDEN, LATENT_DIM),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.net(torch.cat([x, time_features(t)], dim=1)))


def ddim_step(
    denoiser: Denoiser, x: torch.Tensor, t: int, t_next: int, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """One DDIM move (eta = 0) from timestep ``t`` to ``t_next`` (either direction):
    ``x' = sqrt(a') x0_hat + sqrt(1 - a') eps``, ``x0_hat = (x - sqrt(1 - a) eps) / sqrt(a)``."""
    a = float(alpha_bar[t]) if t >= 0 else 1.0
    a_next = float(alpha_bar[t_next]) if t_next >= 0 else 1.0
    eps = denoiser(x, torch.full((x.shape[0],), max(t, 0), dtype=torch.long))
    x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
    return math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps


def ddim_sample(
    denoiser: Denoiser, noise: torch.Tensor, steps: int = SAMPLING_STEPS
) -> torch.Tensor:
    """Deterministic DDIM sampling: starting noise ``(n, 8)`` -> latents ``(n, 8)``."""
    alpha_bar = alphas_cumprod()
    times = ddim_timesteps(steps)
    x = noise
    for t, t_next in zip(times, [*times[1:], -1], strict=True):
        x = ddim_step(denoiser, x, t, t_next, alpha_bar)
    return x


def ddim_invert(
    denoiser: Denoiser, latents: torch.Tensor, steps: int = SAMPLING_STEPS
) -> torch.Tensor:
    """DDIM inversion (the sampler run backwards): latents ``(n, 8)`` -> starting noise ``(n, 8)``.

    Each move uses the noise predicted at the current (less noisy) timestep, the usual
    approximation; sampling the inversion reconstructs the latent up to that error.
    """
    alpha_bar = alphas_cumprod()
    times = ddim_timesteps(steps)[::-1]
    x = latents
    for t_prev, t in zip([-1, *times[:-1]], times, strict=True):
        x = ddim_step(denoiser, x, t_prev, t, alpha_bar)
    return x


class NoiseToLatent(nn.Module):
    """The DDIM sampler as a module: starting noise ``(n, 8)`` -> denoised latent ``(n, 8)``.

    As ``--mapping`` it makes the index score where a seed's sample lands in the latent space,
    next to the training latents, instead of where its noise lies (see docs/evidence.md).
    """

    def __init__(self, denoiser: Denoiser, steps: int = SAMPLING_STEPS) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.steps = steps

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return ddim_sample(self.denoiser, noise, self.steps)


class NoiseToImage(nn.Module):
    """The whole pipeline as one generator ``G``: starting noise ``(n, 8)`` -> pixels ``(n, 64)``
    (DDIM sampling, then the VAE decoder); the generator whose descriptors a seed gets."""

    def __init__(self, denoiser: Denoiser, decoder: nn.Module, steps: int = SAMPLING_STEPS) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.decoder = decoder
        self.steps = steps

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.decoder(ddim_sample(self.denoiser, noise, self.steps)))


def load_denoiser(path: Path | str = WEIGHTS_PATH) -> Denoiser:
    """The shipped denoiser weights in a float32 eval-mode :class:`Denoiser`."""
    model = Denoiser()
    model.load_state_dict(load_file(str(path)))
    return model.float().eval()


def sampler() -> nn.Module:
    """Import-path factory (``latentsieve.workers.demo_models.digits_ldm:sampler``): noise ->
    latent, with the same DDIM steps as the renders."""
    return NoiseToLatent(load_denoiser()).eval()


def preview_sampler() -> nn.Module:
    """Import-path factory (``latentsieve.workers.demo_models.digits_ldm:preview_sampler``):
    noise -> latent in ``PREVIEW_STEPS`` DDIM steps, a cheaper look at where a seed lands."""
    return NoiseToLatent(load_denoiser(), PREVIEW_STEPS).eval()


def generator() -> nn.Module:
    """Import-path factory (``latentsieve.workers.demo_models.digits_ldm:generator``): noise ->
    pixels."""
    return NoiseToImage(load_denoiser(), load_vae().decoder).eval()


def inverted_training_latents(steps: int = SAMPLING_STEPS) -> np.ndarray:
    """DDIM inversions of the VAE encoder means: the training set in noise space, ``(1797, 8)``."""
    with torch.no_grad():
        noise = ddim_invert(load_denoiser(), torch.from_numpy(training_latents()), steps)
    return noise.numpy().astype(np.float32, copy=False)
