"""Seed draws are pinned bit for bit (docs/contract.md §5) and equal the diffusers recipe."""

from __future__ import annotations

import hashlib

import pytest
import torch

from latentsieve.index.errors import StoreError
from latentsieve.index.manifest import SamplerRecipe
from latentsieve.workers.samplers import draw_latents

# sha256 of the raw bytes of the stacked draws, recorded with torch 2.13.0 on CPU.
PINNED = [
    ("torch-cpu:float32:8", [0, 1, 42],
     "6969d87729243cca9089f80f94bed8255838339929c6accdbc6a39a07bb4b3fe"),
    ("torch-cpu:float16:4x8x8", [0, 7],
     "0159a88ff8ed2b91bce86ea08d8716b87e53c8ae4289cafc02bcc7efe3def9a5"),
    ("torch-cpu:float32:4x64x64", [2**64 - 1, 123456789],
     "d6860bfc65c0665b225f420106cf0fa12f7021f5e8d16e70bdda55c8245d9f92"),
]


@pytest.mark.parametrize(("spec", "seeds", "digest"), PINNED)
def test_draws_match_stored_checksums(spec: str, seeds: list[int], digest: str) -> None:
    draws = draw_latents(SamplerRecipe.parse(spec, (8,)), seeds)
    assert hashlib.sha256(draws.numpy().tobytes()).hexdigest() == digest


def test_draw_is_the_diffusers_cpu_recipe() -> None:
    recipe = SamplerRecipe.parse("torch-cpu:float16:4x16x16", (1,))
    ours = draw_latents(recipe, [5, 6])
    for row, seed in enumerate([5, 6]):
        generator = torch.Generator("cpu").manual_seed(seed)
        theirs = torch.randn((4, 16, 16), generator=generator, dtype=torch.float16)
        assert torch.equal(ours[row], theirs)
    assert ours.dtype == torch.float16


def test_recipe_text_roundtrip_and_errors() -> None:
    assert str(SamplerRecipe.parse("torch-cpu", (3, 2))) == "torch-cpu:float32:3x2"
    assert SamplerRecipe.parse("torch-cpu:4x64x64", (1,)).shape == (4, 64, 64)
    for bad in ("cuda", "torch-cpu:bfloat16", "torch-cpu:0x3", "torch-cpu:4x"):
        with pytest.raises(StoreError):
            SamplerRecipe.parse(bad, (8,))


def test_seed_range_is_checked() -> None:
    recipe = SamplerRecipe.parse("torch-cpu", (2,))
    with pytest.raises(ValueError, match="2\\^64"):
        draw_latents(recipe, [2**64])
    with pytest.raises(ValueError, match="2\\^64"):
        draw_latents(recipe, [-1])
