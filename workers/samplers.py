"""Seed -> latent draws that reproduce an upstream pipeline bit for bit (docs/contract.md §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latentsieve.index.manifest import SamplerRecipe

MAX_SEED = 2**64 - 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def draw_latents(recipe: SamplerRecipe, seeds: Sequence[int]) -> torch.Tensor:
    """One ``torch.Generator("cpu").manual_seed(seed)`` per seed: seeds (n,) -> (n, *shape).

    Each draw is ``torch.randn(shape, generator=g, dtype=dtype)``, what diffusers does for one
    image with a CPU generator; the result keeps the recipe's dtype (float16 draws in float16).
    """
    dtype = _DTYPES[recipe.dtype]
    out = torch.empty((len(seeds), *recipe.shape), dtype=dtype)
    for row, seed in enumerate(seeds):
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed {seed} is outside [0, 2^64)")
        generator = torch.Generator("cpu").manual_seed(int(seed))
        out[row] = torch.randn(recipe.shape, generator=generator, dtype=dtype)
    return out
