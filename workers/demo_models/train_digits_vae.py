"""Deterministic training of the bundled ``digits-vae`` demo model.

Usage::

    python -m latentsieve.workers.demo_models.train_digits_vae [--epochs N] [--out PATH]

Trains :class:`~latentsieve.workers.demo_models.digits_vae.DigitsVAE` on all 1797
``load_digits`` images with a Bernoulli (binary cross-entropy) reconstruction term plus the
Gaussian KL, Adam, and fixed-order minibatches. The KL weight is annealed linearly from ~0 to 1
over the first ``KL_WARMUP_EPOCHS`` epochs and is exactly 1 (the plain negative ELBO)
afterwards; the warm-up keeps more latent dimensions active (without it only ~4 of 8 escape
posterior collapse). Seeds, single-threaded execution and deterministic algorithms make two runs
produce byte-identical safetensors files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from latentsieve.workers.demo_models.digits_vae import WEIGHTS_PATH, DigitsVAE, digits_pixels

SEED = 0
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
DEFAULT_EPOCHS = 800
KL_WARMUP_EPOCHS = 300


def vae_loss(
    model: DigitsVAE, x: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image negative ELBO in nats for a batch ``x`` of shape ``(n, 64)``.

    Returns ``(loss, reconstruction, kl)``, each a scalar mean over the batch.
    """
    mu, logvar = model.encode(x)
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
    z = mu + torch.exp(0.5 * logvar) * eps
    recon = model.decode(z)
    rec = F.binary_cross_entropy(recon, x, reduction="sum") / x.shape[0]
    kl = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return rec + kl, rec, kl


def train(epochs: int = DEFAULT_EPOCHS, verbose: bool = False) -> dict[str, torch.Tensor]:
    """Train from seed 0 for ``epochs`` passes; return a contiguous float32 state dict.

    The loss printed when ``verbose`` is the full-data negative ELBO (beta = 1) in nats/image.
    """
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        return _train(epochs, verbose)
    finally:
        # Restore the process-wide settings so callers (e.g. a test session) are unaffected.
        torch.use_deterministic_algorithms(prev_deterministic)
        torch.set_num_threads(prev_threads)


def _train(epochs: int, verbose: bool) -> dict[str, torch.Tensor]:
    """Training loop proper; expects deterministic, single-threaded torch settings."""
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)

    x_all = torch.from_numpy(digits_pixels())
    n = x_all.shape[0]
    # One fixed shuffle, reused every epoch: fixed-order minibatches.
    order = torch.randperm(n, generator=generator)
    batches = [x_all[order[i : i + BATCH_SIZE]] for i in range(0, n, BATCH_SIZE)]

    model = DigitsVAE()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    for epoch in range(epochs):
        beta = min(1.0, (epoch + 1) / KL_WARMUP_EPOCHS)
        for xb in batches:
            optimizer.zero_grad(set_to_none=True)
            _, rec, kl = vae_loss(model, xb, generator)
            (rec + beta * kl).backward()
            optimizer.step()
        if verbose and (epoch + 1) % 100 == 0:
            with torch.no_grad():
                full, rec, kl = vae_loss(model, x_all, torch.Generator().manual_seed(SEED))
            print(
                f"epoch {epoch + 1:4d}  loss {full.item():.4f}  "
                f"(recon {rec.item():.4f}, kl {kl.item():.4f})"
            )
    model.eval()
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: train, save safetensors, print the final loss."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    state = train(epochs=args.epochs, verbose=True)
    elapsed = time.perf_counter() - start

    model = DigitsVAE()
    model.load_state_dict(state)
    model.eval()
    x_all = torch.from_numpy(digits_pixels())
    with torch.no_grad():
        loss, rec, kl = vae_loss(model, x_all, torch.Generator().manual_seed(SEED))
    # A single metadata key: safetensors writes multi-key metadata in hash order, which would
    # make the file bytes differ between runs.
    save_file(state, str(args.out), metadata={"model": f"digits-vae epochs={args.epochs}"})
    print(
        f"final loss {loss.item():.4f} nats/image (recon {rec.item():.4f}, kl {kl.item():.4f}); "
        f"trained in {elapsed:.1f} s; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
