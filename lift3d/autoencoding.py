"""Encode and decode whole volume batches through an autoencoder's slice API.

Autoencoders (see :class:`lift3d.protocols.Autoencoder`) work on slices; the volume-wise model
(Make-A-Volume, sec. 2.3) sees ``(b, c, n, h, w)``. These two functions are the sandwich between.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from lift3d.protocols import Autoencoder


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
