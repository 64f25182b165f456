"""The conditioning rule and the one U-Net call on a volume batch, for training and sampling alike.

With ``concat`` conditioning the U-Net sees the noisy target latent and, concatenated on channels,
the source latent of every slice it looks at (``2 source_context + 1`` of them, 2.5D); its output is
one latent. ``predict`` runs it on a ``(b, c, n, h, w)`` batch: a lifted U-Net learns which
slices form a volume, a 2D one denoises them one by one.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from lift3d.io.errors import Lift3dError
from lift3d.lifting.checkpoint import CheckpointError
from lift3d.lifting.inflate import is_lifted, volume_batch, volumetric_disabled

CONDITIONINGS = ("concat", "none")


def unet_channels(latent_channels: int, conditioning: str, source_context: int = 0) -> tuple[int, int]:
    """U-Net ``(in, out)`` channels: the noisy target latent, plus the source latent of every slice it sees."""
    if conditioning not in CONDITIONINGS:
        raise Lift3dError(f"unknown conditioning {conditioning!r}; valid: {', '.join(CONDITIONINGS)}")
    sources = 2 * source_context + 1
    latent = int(latent_channels)
    return (latent + sources * latent if conditioning == "concat" else latent), latent


def check_channels(unet: nn.Module, latent_channels: int, conditioning: str, where: object = "the model",
                   source_context: int = 0, autoencoder_name: str = "autoencoder") -> None:
    """Refuse a U-Net whose channels do not follow ``unet_channels``, saying what they should be."""
    need_in, need_out = unet_channels(latent_channels, conditioning, source_context)
    got_in, got_out = int(unet.config.in_channels), int(unet.config.out_channels)
    if (got_in, got_out) != (need_in, need_out):
        sources = 2 * source_context + 1
        how = (f"{need_out} noisy target + {sources} x {need_out} source" if conditioning == "concat"
               else "the noisy target")
        raise CheckpointError(f"{where}: the {autoencoder_name} has {need_out} latent channels, so the U-Net must take "
                          f"{need_in} input channels ({how}, conditioning {conditioning!r}) and give {need_out}; "
                          f"this U-Net takes {got_in} and gives {got_out}")


def predict(unet: nn.Module, sample: Tensor, condition: Tensor | None, timesteps: Tensor, *,
            slice_wise: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """The U-Net's output for a volume batch ``sample`` ``(b, c, n, h, w)``, ``condition`` concatenated on
    channels. ``timesteps`` is one per batch, per volume ``(b,)`` or per slice ``(b, n)``. ``slice_wise``
    runs a lifted U-Net as its 2D model. ``unet`` may be wrapped (DDP): its ``module`` is the model."""
    b, _, n = sample.shape[:3]
    x = sample if condition is None else torch.cat([sample, condition], dim=1)
    flat = rearrange(x, "b c n h w -> (b n) c h w")
    if dtype is not None:
        flat = flat.to(dtype)
    t = timesteps.reshape(-1).to(flat.device)
    if t.numel() == 1:
        t = t.expand(b * n)
    elif t.numel() == b and n > 1:
        t = t.repeat_interleave(n)
    inner = getattr(unet, "module", unet)
    context: Any = contextlib.nullcontext()
    if is_lifted(inner):
        context = volumetric_disabled(inner) if slice_wise else volume_batch(inner, n)
    with context:
        out = unet(flat, t)
    out = getattr(out, "sample", out)
    return rearrange(out, "(b n) c h w -> b c n h w", b=b)
