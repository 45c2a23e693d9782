"""A real diffusers ``StableDiffusionPipeline`` (tiny, random weights, CPU) renders exactly the
seeds ``POST /select`` picked, from exactly the latents that were scored.

The index is built with the CLI from the tiny VAE's own encoder means of scikit-learn's digits
(times the VAE's scaling factor, chosen as Stable Diffusion's was: to give them unit variance),
with the sampler recipe ``torch-cpu:float32:4x8x8``. The test proves that

* the recipe is what diffusers draws: the first ``sample`` the UNet receives, whether the pipeline
  is given ``latents=`` (the kept seeds drawn with the recipe) or ``generator=`` (one CPU
  ``torch.Generator`` per kept seed, the usual way to render chosen seeds), is bit for bit the
  recipe's draws times ``scheduler.init_noise_sigma``;
* ``POST /score`` of those captured latents gives the log densities ``/select`` reported;
* ``/select`` keeps the best 4 of the 64 seeds that ``POST /score`` ranks, best first;
* the pipeline renders finite images of the expected shape from them.

Every model is built from a config (no downloads); a missing diffusers or transformers fails
the test rather than skipping it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from sklearn.datasets import load_digits
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentsieve.cli import main
from latentsieve.service.settings import Settings

pytestmark = pytest.mark.anyio

MODEL = "tiny-sd"
IMAGE_SIZE = 16  # two VAE blocks: one 2x down-sampling, so 16 x 16 images <-> 4 x 8 x 8 latents
LATENT_SHAPE = (4, 8, 8)
TRAINING_IMAGES = 200
SEEDS, KEEP = 64, 4
PROMPT = "a photo of the digit seven"


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 / CLIP byte-level BPE maps bytes to."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [byte for byte in range(256) if byte not in printable]
    return [chr(code) for code in printable] + [chr(256 + n) for n in range(len(extra))]


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges) from a vocab.json / merges.txt we write."""
    alphabet = byte_level_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # model_max_length: the pipeline pads prompts to it (the default is effectively infinite).
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def tiny_pipeline(folder: Path) -> StableDiffusionPipeline:
    """Stable Diffusion in miniature: every component from a config, weights seeded."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SHAPE[1],
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        clip_sample=False, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(folder),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor * LATENT_SHAPE[1] == IMAGE_SIZE
    return pipe


def digit_images(count: int) -> torch.Tensor:
    """``count`` scikit-learn digits as (count, 3, IMAGE_SIZE, IMAGE_SIZE) RGB in [-1, 1]."""
    pixels = torch.from_numpy(load_digits().images[:count]).float()  # (count, 8, 8) in [0, 16]
    grey = torch.nn.functional.interpolate(
        pixels[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    return (grey / 8.0 - 1.0).clamp(-1.0, 1.0).repeat(1, 3, 1, 1)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread: these models are tiny, and on a busy machine more threads wait on
    each other (a UNet call measured 1.7 s on 2 threads under load, 0.02 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def draw(seeds: list[int]) -> torch.Tensor:
    """The recipe ``torch-cpu:float32:4x8x8``: one CPU generator per seed."""
    return torch.stack([
        torch.randn(LATENT_SHAPE, generator=torch.Generator("cpu").manual_seed(seed),
                    dtype=torch.float32)
        for seed in seeds
    ])


@pytest.fixture
def pipe(tmp_path: Path) -> StableDiffusionPipeline:
    return tiny_pipeline(tmp_path / "tokenizer")


@pytest.fixture
def store(tmp_path: Path, pipe: StableDiffusionPipeline) -> Path:
    """A store whose ``tiny-sd`` index holds the VAE latents of 200 digits."""
    with one_thread(), torch.no_grad():
        means = pipe.vae.encode(digit_images(TRAINING_IMAGES)).latent_dist.mean
    # As Stable Diffusion chose 0.18215 for its VAE: the factor that gives the training latents
    # unit variance, the scale of the N(0, 1) starting noise. The pipeline decodes with it too.
    pipe.vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    latents = (means * pipe.vae.config.scaling_factor).numpy().astype(np.float32)
    assert latents.shape == (TRAINING_IMAGES, *LATENT_SHAPE)
    assert np.isfinite(latents).all()
    source = tmp_path / "training-latents.npy"
    np.save(source, latents)
    root = tmp_path / "store"
    shape = "x".join(map(str, LATENT_SHAPE))
    status = main([
        "index", "build", "--store", str(root), "--model", MODEL, "--latents", str(source),
        "--sampler", f"torch-cpu:float32:{shape}", "--calibration-count", "500", "--no-progress",
    ])
    assert status == 0
    return root


def render(
    pipe: StableDiffusionPipeline, **inputs: Any
) -> tuple[np.ndarray, torch.Tensor]:
    """Images (n, H, W, 3) and the ``sample`` the UNet received first, for ``inputs``."""
    seen: list[torch.Tensor] = []

    def capture(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if not seen:
            seen.append((kwargs["sample"] if "sample" in kwargs else args[0]).detach().clone())

    hook = pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with one_thread():
            images = pipe(
                prompt=PROMPT, num_images_per_prompt=KEEP, num_inference_steps=2,
                guidance_scale=1.0, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="np",
                **inputs,
            ).images
    finally:
        hook.remove()
    assert len(seen) == 1
    return np.asarray(images), seen[0]


async def test_pipeline_renders_the_selected_latents(
    pipe: StableDiffusionPipeline, store: Path, serve: Callable[..., Any]
) -> None:
    # No cache: every score below is computed afresh, so equal numbers are a real check.
    async with serve(Settings(store=store, reload_interval_s=60.0, cache_bytes=0)) as client:
        models = (await client.get("/models")).json()["models"]
        assert [(m["name"], m["latent_shape"], m["sampler"]) for m in models] == [
            (MODEL, list(LATENT_SHAPE), "torch-cpu:float32:4x8x8")
        ]

        selected = await client.post(
            "/select", json={"model": MODEL, "start": 0, "count": SEEDS, "keep": KEEP}
        )
        assert selected.status_code == 200, selected.text
        kept = [r["seed"] for r in selected.json()["results"]]
        kept_density = np.array([r["log_density"] for r in selected.json()["results"]])
        assert len(kept) == KEEP
        assert np.isfinite(kept_density).all()
        assert list(kept_density) == sorted(kept_density, reverse=True)

        # The kept seeds are the best KEEP of all SEEDS, best first (ties: lower seed first).
        everything = await client.post(
            "/score", json={"model": MODEL, "seeds": list(range(SEEDS))}
        )
        assert everything.status_code == 200, everything.text
        all_density = np.array([r["log_density"] for r in everything.json()["results"]])
        best = np.lexsort((np.arange(SEEDS), -all_density))[:KEEP]
        assert kept == best.tolist()
        np.testing.assert_allclose(kept_density, all_density[best], rtol=0, atol=1e-6)

        # Render the kept seeds: from the recipe's draws, and from per-seed CPU generators.
        drawn = draw(kept)
        images, used = render(pipe, latents=drawn)
        generated, used_by_generators = render(
            pipe, generator=[torch.Generator("cpu").manual_seed(seed) for seed in kept]
        )
        assert pipe.scheduler.init_noise_sigma == 1.0
        assert used.dtype == torch.float32 and used.shape == (KEEP, *LATENT_SHAPE)
        assert torch.equal(used, drawn * pipe.scheduler.init_noise_sigma)
        assert torch.equal(used_by_generators, used)
        np.testing.assert_array_equal(generated, images)

        # The latents the UNet started from score exactly as /select said.
        rescored = await client.post(
            "/score", json={"model": MODEL, "latents": used.numpy().tolist()}
        )
        assert rescored.status_code == 200, rescored.text
        results = rescored.json()["results"]
        assert not any(r["cached"] for r in results)
        np.testing.assert_allclose(
            [r["log_density"] for r in results], kept_density, rtol=0, atol=1e-6
        )

    assert images.shape == (KEEP, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert images.dtype == np.float32
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
