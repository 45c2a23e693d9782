"""Deterministic training of the bundled ``digits-ldm`` denoiser.

Usage::

    python -m latentsieve.workers.demo_models.train_digits_ldm [--steps N] [--out PATH]

Trains :class:`~latentsieve.workers.demo_models.digits_ldm.Denoiser` on the ``digits-vae``
encoder means of all 1797 ``load_digits`` images with the DDPM noise-prediction loss (Ho et
al., 2020, eq. 14):
``|| eps - eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t) ||^2`` with ``t`` uniform, Adam with a
cosine learning-rate decay. Seeds, one thread and deterministic algorithms make two runs write
byte-identical safetensors files.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentsieve.workers.demo_models.digits_ldm import (
    TRAIN_STEPS,
    WEIGHTS_PATH,
    Denoiser,
    alphas_cumprod,
)
from latentsieve.workers.demo_models.digits_vae import training_latents

SEED = 0
BATCH_SIZE = 256
LEARNING_RATE = 2e-3
DEFAULT_STEPS = 12_000


def denoising_loss(
    model: Denoiser, z: torch.Tensor, alpha_bar: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Mean squared noise-prediction error over a batch of clean latents ``z`` ``(n, 8)``."""
    t = torch.randint(0, TRAIN_STEPS, (z.shape[0],), generator=generator)
    eps = torch.randn(z.shape, generator=generator)
    a = alpha_bar[t].float()[:, None]
    noisy = a.sqrt() * z + (1.0 - a).sqrt() * eps
    return torch.mean((model(noisy, t) - eps) ** 2)


def train(steps: int = DEFAULT_STEPS, verbose: bool = False) -> dict[str, torch.Tensor]:
    """Train from seed 0 for ``steps`` minibatches; return a contiguous float32 state dict."""
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        generator = torch.Generator().manual_seed(SEED)
        data = torch.from_numpy(training_latents())
        alpha_bar = alphas_cumprod()
        model = Denoiser()
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            rows = torch.randint(0, data.shape[0], (BATCH_SIZE,), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss = denoising_loss(model, data[rows], alpha_bar, generator)
            loss.backward()
            optimizer.step()
            if verbose and (step + 1) % 2000 == 0:
                with torch.no_grad():
                    full = denoising_loss(model, data, alpha_bar, torch.Generator().manual_seed(1))
                print(f"step {step + 1:6d}  loss {full.item():.4f}")
        model.eval()
        return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    finally:
        torch.use_deterministic_algorithms(prev_deterministic)
        torch.set_num_threads(prev_threads)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: train, save safetensors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    state = train(steps=args.steps, verbose=True)
    save_file(state, str(args.out), metadata={"model": f"digits-ldm steps={args.steps}"})
    print(f"trained in {time.perf_counter() - start:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
