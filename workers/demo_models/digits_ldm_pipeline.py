"""``digits-ldm`` as a diffusers ``DiffusionPipeline`` (the ``diffusers`` extra).

Stable Diffusion's components and loop over the miniature model of
:mod:`latentsieve.workers.demo_models.digits_ldm`: its MLP denoiser as ``unet``, diffusers' own
``DDIMScheduler`` configured to that schedule, the digits decoder as ``vae``, so that what runs
on Stable Diffusion (``latentsieve.integrations.diffusers``) runs on it unchanged.

The pipeline sees a latent as an 8-channel 1 x 1 "image" (n, 8, 1, 1), as Stable Diffusion sees
its 4 x 64 x 64 latents: the denoiser and decoder below only reshape to and from (n, 8). A
module of its own, so that the model module (a build's ``--mapping``, checksummed into every
digits-ldm index) does not change when the pipeline does.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from latentsieve.workers.demo_models.digits_ldm import (
    BETA_END,
    BETA_START,
    SAMPLING_STEPS,
    TRAIN_STEPS,
    Denoiser,
    load_denoiser,
)
from latentsieve.workers.demo_models.digits_vae import LATENT_DIM, load_vae

IMAGE_SIDE = 8  # a decoded digit is 8 x 8 pixels



@dataclass(frozen=True)
class DenoiserConfig:
    """The fields of a diffusers ``UNet2DConditionModel.config`` that pipelines read."""

    in_channels: int = LATENT_DIM
    out_channels: int = LATENT_DIM
    sample_size: int = 1  # latent side: a 1 x 1 latent decodes to IMAGE_SIDE x IMAGE_SIDE
    time_cond_proj_dim: int | None = None
    addition_embed_type: str | None = None


@dataclass(frozen=True)
class DecoderConfig:
    """The fields of a diffusers ``AutoencoderKL.config`` that pipelines read."""

    latent_channels: int = LATENT_DIM
    scaling_factor: float = 1.0  # the encoder means are the diffusion model's latents as they are


@dataclass(frozen=True)
class DenoiserOutput:
    """What a diffusers UNet returns: the predicted noise as ``sample``."""

    sample: torch.Tensor


@dataclass(frozen=True)
class DecoderOutput:
    """What ``AutoencoderKL.decode`` returns: the images as ``sample``."""

    sample: torch.Tensor


class _Placed(nn.Module):
    """``device`` and ``dtype`` as diffusers models expose them: those of the parameters."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class PipelineDenoiser(_Placed):
    """:class:`Denoiser` with a diffusers UNet's calling convention.

    ``(sample (n, 8, 1, 1), timestep, encoder_hidden_states=...) -> DenoiserOutput(sample=eps)``
    with ``eps`` shaped like ``sample``. The model is unconditional: ``encoder_hidden_states``
    (the prompt) and every other conditioning argument are accepted and ignored.
    """

    config = DenoiserConfig()

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        **conditioning: Any,
    ) -> DenoiserOutput | tuple[torch.Tensor]:
        n = sample.shape[0]
        # One timestep for the batch, as ddim_step passes it (time_features takes floats).
        times = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(n)
        eps = self.denoiser(sample.reshape(n, LATENT_DIM), times).reshape(sample.shape)
        return DenoiserOutput(eps) if return_dict else (eps,)


class PipelineDecoder(_Placed):
    """The digits decoder with ``AutoencoderKL.decode``'s convention: latents (n, 8, 1, 1) ->
    images (n, 1, 8, 8) in [-1, 1] (``2 * pixels - 1``; pipelines map them back to [0, 1])."""

    config = DecoderConfig()

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: Any = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        n = z.shape[0]
        pixels = cast(torch.Tensor, self.decoder(z.reshape(n, LATENT_DIM)))
        images = (2.0 * pixels - 1.0).reshape(n, 1, IMAGE_SIDE, IMAGE_SIDE)
        return DecoderOutput(images) if return_dict else (images,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return cast(DecoderOutput, self.decode(z)).sample


def ddim_scheduler() -> Any:
    """diffusers' ``DDIMScheduler`` set to this module's sampler: the linear schedule of
    ``alphas_cumprod`` over ``TRAIN_STEPS``, "leading" timesteps without offset (960, 920, ...,
    0 for 25 steps, as :func:`ddim_timesteps`), no clipping, and ``alpha_bar = 1`` after the last
    step (``ddim_step``'s ``t_next = -1``). With ``eta = 0`` its steps are :func:`ddim_step`'s,
    computed in float32 instead of float64."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=TRAIN_STEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


@functools.cache
def pipeline_class() -> type:
    """``DigitsLDMPipeline``, a diffusers ``DiffusionPipeline`` (needs the ``diffusers`` extra;
    defined on first use so that this module imports without it)."""
    from diffusers import DiffusionPipeline, ImagePipelineOutput
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    # Typed as Any: mypy reads diffusers' lazy top-level module as a stub without the methods
    # and the components that register_modules sets.
    base: Any = DiffusionPipeline

    class DigitsLDMPipeline(base):
        """digits-ldm with Stable Diffusion's components and denoising loop.

        Components as ``StableDiffusionPipeline`` names them: ``unet`` (:class:`PipelineDenoiser`),
        ``scheduler`` (:func:`ddim_scheduler`), ``vae`` (:class:`PipelineDecoder`), plus
        ``encode_prompt``, ``vae_scale_factor`` and ``image_processor``. ``__call__`` is
        ``StableDiffusionPipeline.__call__``'s loop without the options this model has no use
        for: starting noise from ``generator`` (or ``latents``) times the scheduler's
        ``init_noise_sigma``, ``scale_model_input``, the UNet on ``[uncond, cond]`` halves when
        ``guidance_scale > 1``, ``uncond + g * (cond - uncond)``, ``scheduler.step``, then the
        decoder and ``image_processor.postprocess`` (``output_type`` "pil", "np", "pt" or
        "latent"). Images are 8 x 8 with one channel.

        Prompts are accepted and ignored: the denoiser is unconditional, so every prompt (the
        empty one included) gives the same image for a seed and guidance leaves it unchanged.
        """

        model_cpu_offload_seq = "unet->vae"

        def __init__(self, unet: nn.Module, scheduler: Any, vae: nn.Module) -> None:
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
            self.vae_scale_factor = IMAGE_SIDE  # one latent "pixel" decodes to 8 x 8 pixels
            self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

        def encode_prompt(
            self,
            prompt: str | list[str] | None,
            device: torch.device,
            num_images_per_prompt: int,
            do_classifier_free_guidance: bool,
            negative_prompt: str | list[str] | None = None,
            prompt_embeds: torch.Tensor | None = None,
            negative_prompt_embeds: torch.Tensor | None = None,
            lora_scale: float | None = None,
            clip_skip: int | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            """``StableDiffusionPipeline.encode_prompt``'s signature; zero embeddings
            ``(batch * num_images_per_prompt, 1, 1)``, as the model reads no text."""
            if isinstance(prompt, str):
                batch = 1
            elif prompt is not None:
                batch = len(prompt)
            else:
                assert prompt_embeds is not None
                batch = prompt_embeds.shape[0]
            embeds = torch.zeros(
                (batch * num_images_per_prompt, 1, 1), device=device, dtype=self.unet.dtype
            )
            return embeds, (torch.zeros_like(embeds) if do_classifier_free_guidance else None)

        @torch.no_grad()
        def __call__(
            self,
            prompt: str | list[str] = "",
            num_inference_steps: int = SAMPLING_STEPS,
            guidance_scale: float = 1.0,
            negative_prompt: str | list[str] | None = None,
            num_images_per_prompt: int = 1,
            eta: float = 0.0,
            generator: torch.Generator | list[torch.Generator] | None = None,
            latents: torch.Tensor | None = None,
            output_type: str = "pil",
            return_dict: bool = True,
        ) -> Any:
            device = self.device
            guided = guidance_scale > 1.0
            embeds, negative = self.encode_prompt(
                prompt, device, num_images_per_prompt, guided, negative_prompt
            )
            if negative is not None:
                embeds = torch.cat([negative, embeds])
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            side = self.unet.config.sample_size
            shape = (embeds.shape[0] // (2 if guided else 1), self.unet.config.in_channels,
                     side, side)
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device,
                                       dtype=embeds.dtype)
            latents = latents.to(device) * self.scheduler.init_noise_sigma
            # As StableDiffusionPipeline.prepare_extra_step_kwargs: what this scheduler takes.
            accepted = inspect.signature(self.scheduler.step).parameters
            extra = {name: value for name, value in (("eta", eta), ("generator", generator))
                     if name in accepted}
            for t in self.progress_bar(self.scheduler.timesteps):
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise = self.unet(model_input, t, encoder_hidden_states=embeds).sample
                if guided:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, **extra).prev_sample
            if output_type == "latent":
                images = latents
            else:
                decoded = self.vae.decode(
                    latents / self.vae.config.scaling_factor, return_dict=False,
                    generator=generator,
                )[0]
                images = self.image_processor.postprocess(decoded, output_type=output_type)
            self.maybe_free_model_hooks()
            return ImagePipelineOutput(images=images) if return_dict else (images,)

    DigitsLDMPipeline.__module__ = __name__
    return DigitsLDMPipeline


def load_pipeline() -> Any:
    """digits-ldm as a diffusers pipeline (CPU, float32): ``pipe("", generator=..., output_type=
    "np")`` renders what :func:`ddim_sample` and the VAE decoder render for the same noise."""
    cls = pipeline_class()
    return cls(
        unet=PipelineDenoiser(load_denoiser()), scheduler=ddim_scheduler(),
        vae=PipelineDecoder(load_vae().decoder),
    )
