"""Seeds -> index-space latents: the model's sampler followed by its mapping (identity default)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from latentsieve.index.manifest import SamplerRecipe
from latentsieve.workers.samplers import draw_latents


class SeedLatents:
    """Draw with the recorded recipe, then map into the index space and flatten."""

    def __init__(self, recipe: SamplerRecipe, mapping: nn.Module | None) -> None:
        self.recipe = recipe
        self.mapping = mapping

    def draw(self, seeds: Sequence[int]) -> np.ndarray:
        """seeds (n,) -> (n, d) float32 index-space latents."""
        return self.map(draw_latents(self.recipe, seeds))

    def map(self, draws: torch.Tensor) -> np.ndarray:
        """Sampler draws (n, *shape) -> (n, d) float32 through the mapping, flattened."""
        if self.mapping is None:
            mapped = draws.float()
        else:
            with torch.no_grad():
                mapped = self.mapping(draws.float())
        return np.ascontiguousarray(mapped.reshape(draws.shape[0], -1).numpy(), dtype=np.float32)
