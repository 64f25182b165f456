"""Encode and decode whole volume batches through an autoencoder's slice API.

Autoencoders (see ``lift3d.plugins.protocols.Autoencoder``) work on slices; the volume-wise model
(Make-A-Volume, sec. 2.3) sees ``(b, c, n, h, w)``. These two functions are the sandwich between.
"""

from __future__ import annotations

from typing import Any, Sequence

from einops import rearrange
from torch import Tensor

from lift3d.plugins.protocols import Autoencoder


def _check_volume(x: Tensor, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"{what} expects a volume batch (b, {channels}, n, h, w), got {tuple(x.shape)}")


def encode_volume(autoencoder: Autoencoder, x: Tensor) -> Tensor:
    """``(b, image_channels, n, h, w)`` -> scaled latents ``(b, latent_channels, n, h/f, w/f)``."""
    _check_volume(x, autoencoder.image_channels, "encode_volume")
    n = x.shape[2]
    z = autoencoder.encode(rearrange(x, "b c n h w -> (b n) c h w"))
    return rearrange(z, "(b n) c h w -> b c n h w", n=n)


def decode_volume(autoencoder: Autoencoder, z: Tensor) -> Tensor:
    """Scaled latents ``(b, latent_channels, n, h, w)`` -> volumes ``(b, image_channels, n, h*f, w*f)``."""
    _check_volume(z, autoencoder.latent_channels, "decode_volume")
    n = z.shape[2]
    x = autoencoder.decode(rearrange(z, "b c n h w -> (b n) c h w"))
    return rearrange(x, "(b n) c h w -> b c n h w", n=n)


def tiny_kl_config(
    image_channels: int = 1,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (16, 32, 32),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    scaling_factor: float = 1.0,
) -> dict[str, Any]:
    """A small ``AutoencoderKL`` config for tests and demos: f = 2 ** (len(block_out_channels) - 1).

    The default three blocks give the paper's f = 4. ``scaling_factor`` 1.0 because an untrained
    autoencoder has no measured latent scale; set it to ``1 / latents.std()`` after training.
    """
    blocks = len(block_out_channels)
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if blocks < 1 or bad:
        raise ValueError(
            f"block_out_channels must be a non-empty sequence of multiples of norm_num_groups="
            f"{norm_num_groups}, got {tuple(block_out_channels)}"
        )
    return {
        "in_channels": image_channels,
        "out_channels": image_channels,
        "latent_channels": latent_channels,
        "block_out_channels": list(block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "layers_per_block": layers_per_block,
        "norm_num_groups": norm_num_groups,
        "scaling_factor": scaling_factor,
    }
