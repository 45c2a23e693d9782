"""Generator adapters: modules mapping a batch of index-space latents to a batch of outputs.

Each factory here is usable as a ``--generator`` import path (docs/contract.md §4), e.g.
``latentsieve.workers.generators:toy_cpwl_generator``. ``diffusers`` is an optional
dependency, imported only by the AutoencoderKL adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

TOY_SEED = 0
TOY_WIDTH = 32
TINY_VAE_SEED = 0


def toy_cpwl_generator() -> nn.Module:
    """The toy continuous piecewise-linear generator ``(n, 2) -> (n, 3)`` of Humayun et al. (2024):
    a ReLU MLP 2 -> 32 -> 32 -> 3, nn.Linear's uniform init drawn from a private generator seeded
    with 0 (the same weights in every process; the global RNG is untouched), in eval mode."""
    generator = torch.Generator().manual_seed(TOY_SEED)
    layers: list[nn.Module] = []
    widths = (2, TOY_WIDTH, TOY_WIDTH, 3)
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
            linear = nn.Linear(fan_in, fan_out)
        bound = 1.0 / fan_in**0.5  # nn.Linear's default uniform range, drawn from our generator
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        layers.append(linear)
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _import_autoencoder_kl() -> type[AutoencoderKL]:
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError(
            "the AutoencoderKL generator needs the optional dependency diffusers: "
            "pip install 'diffusers>=0.30'"
        ) from error
    return AutoencoderKL


def _classic_attention() -> Any:
    # bmm + softmax attention: unlike fused scaled_dot_product_attention it has forward-mode AD.
    from diffusers.models.attention_processor import AttnProcessor

    return AttnProcessor()


class AutoencoderKLDecoder(nn.Module):
    """A diffusers ``AutoencoderKL`` decoder: scaled latents ``(n, C, h, w)`` -> images
    ``(n, 3, 8h, 8w)`` (for the usual 3 down-samplings), in the VAE's output range ``[-1, 1]``.

    Latents are in the diffusion model's scaled space, so they are divided by the VAE's
    ``scaling_factor`` before ``decode``, exactly as diffusers pipelines do. Attention runs with
    diffusers' classic ``AttnProcessor`` so that forward-mode Jacobians work.
    """

    def __init__(self, vae: Any) -> None:  # a diffusers AutoencoderKL
        super().__init__()
        self.vae = vae
        self.vae.set_attn_processor(_classic_attention())
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        decoded: Any = self.vae.decode(latents / self.scaling_factor, return_dict=False)
        return torch.as_tensor(decoded[0])


def autoencoder_kl_decoder(path: str) -> nn.Module:
    """:class:`AutoencoderKLDecoder` of ``AutoencoderKL.from_pretrained(path)``, eval mode, CPU.

    ``path`` must be a LOCAL directory (``config.json`` + weights): ``local_files_only=True``, so
    nothing is fetched from the Hugging Face hub. For a CLI import path, wrap this in a
    zero-argument factory that names the directory.
    """
    autoencoder_kl = _import_autoencoder_kl()
    vae = autoencoder_kl.from_pretrained(path, local_files_only=True)
    return AutoencoderKLDecoder(vae).eval()


def sd_autoencoder_kl(
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
    layers_per_block: int = 2,
    norm_num_groups: int = 32,
    seed: int = TINY_VAE_SEED,
) -> nn.Module:
    """A randomly initialised (``torch.manual_seed(seed)``) AutoencoderKL decoder with the Stable
    Diffusion VAE layout by default (4 latent channels, 8x up-sampling, scaling 0.18215)."""
    autoencoder_kl = _import_autoencoder_kl()
    blocks = len(block_out_channels)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # diffusers draws initial weights from the global RNG
        vae = autoencoder_kl(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            latent_channels=4,
            norm_num_groups=norm_num_groups,
            scaling_factor=0.18215,
        )
    finally:
        torch.random.set_rng_state(state)
    return AutoencoderKLDecoder(vae).eval()


def tiny_autoencoder_kl() -> nn.Module:
    """A small random AutoencoderKL decoder (channels 8, 16, 16, 16; one layer per block; fixed
    seed) for tests: ``(n, 4, h, w) -> (n, 3, 8h, 8w)``, the SD layout at a fraction of the cost."""
    return sd_autoencoder_kl(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4
    )
