"""A volumetric conv folded into its host conv for inference: what is left of it after the fold.

``lift3d.fuse`` (in ``lift3d.lifting.fuse``) calls each layer's ``fuse_into(host)``; the conv
kinds fold their residual and centre tap into the host with ``fold_into_host`` and keep only
their off-centre taps, as a ``FusedSliceConv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.layers.functional import conv_along_slices

CONDITION_LIMIT = 1e6
"""Refuse to fold a layer whose ``A = I + W_c`` is this ill-conditioned (its inverse would amplify
round-off); such a layer is left unfused."""


class FoldError(ValueError):
    """A layer cannot be folded into its host (``A`` is singular or ill-conditioned)."""


def fold_into_host(host: nn.Conv2d, matrix: Tensor, offset: Tensor) -> Tensor:
    """``host`` computes ``matrix @ host(x) + offset`` afterwards; returns ``matrix^-1`` (float64)."""
    matrix = matrix.double()
    condition = torch.linalg.cond(matrix).item()
    if not condition < CONDITION_LIMIT:
        raise FoldError(f"I + W_centre has condition number {condition:.3g} (limit {CONDITION_LIMIT:g})")
    inverse = torch.linalg.inv(matrix)
    with torch.no_grad():
        weight = torch.einsum("oc,cikl->oikl", matrix, host.weight.double())
        bias = offset.double() + (matrix @ host.bias.double() if host.bias is not None else 0)
        host.weight.copy_(weight)
        if host.bias is None:
            host.bias = nn.Parameter(torch.empty_like(host.weight[:, 0, 0, 0]), requires_grad=False)
        host.bias.copy_(bias)
    return inverse


class FusedSliceConv(nn.Module):
    """The off-centre taps of a folded ``VolumetricConv``:
    ``out_i = y'_i + sum_(j != centre) (W'_j y'_(i+j) + g_j)``, with ``W'_j = W_j A^-1`` and
    ``g_j = -W'_j c``, each tap added only where its neighbour exists (as the unfused layer's
    zero padding does) or from the border slice (replicate)."""

    fused = True

    def __init__(self, weight: Tensor, tap_bias: Tensor, inverse: Tensor, centre_bias: Tensor, padding_mode: str,
                 groups: int) -> None:
        super().__init__()
        self.padding_mode, self.groups, self.kernel_size = padding_mode, groups, weight.shape[-1]
        self.register_buffer("weight", weight)
        self.register_buffer("tap_bias", tap_bias)
        self.register_buffer("inverse", inverse, persistent=False)
        self.register_buffer("centre_bias", centre_bias, persistent=False)

    @classmethod
    def fold(cls, host: nn.Conv2d, taps: Tensor, bias: Tensor | None, padding_mode: str,
             depthwise: bool = False) -> "FusedSliceConv":
        """``taps``: the layer's weight as ``(k, C, C)`` matrices; ``bias``: its bias or None."""
        k, channels = taps.shape[0], taps.shape[1]
        pad = k // 2
        taps = taps.detach().double()
        offset = bias.detach().double() if bias is not None else taps.new_zeros(channels)
        matrix = torch.eye(channels, dtype=torch.float64, device=taps.device) + taps[pad]
        inverse = fold_into_host(host, matrix, offset)
        folded = taps @ inverse  # W_j A^-1, for every tap (the centre is never used)
        tap_bias = -(folded @ offset)  # (k, C)
        folded[pad] = 0
        dtype = host.weight.dtype
        if depthwise:
            weight = torch.diagonal(folded, dim1=1, dim2=2).T[:, None, :]  # (C, 1, k)
        else:
            weight = folded.permute(1, 2, 0)  # (C_out, C_in, k)
        return cls(weight.to(dtype).contiguous(), tap_bias.to(dtype), inverse.to(dtype), offset.to(dtype),
                   padding_mode, channels if depthwise else 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kernel_size={self.kernel_size}, groups={self.groups}, off-centre taps only"

    def forward(self, x: Tensor, num_slices: int) -> Tensor:
        if x.shape[0] % num_slices:
            raise ValueError(f"batch of {x.shape[0]} slices is not a whole number of volumes of {num_slices} slices")
        return conv_along_slices(x, self.weight, num_slices, groups=self.groups, padding_mode=self.padding_mode,
                                 residual=True, skip_centre=True, tap_bias=self.tap_bias,
                                 in_place=not (torch.is_grad_enabled() and x.requires_grad))

    def unfuse(self, y: Tensor) -> Tensor:
        """The 2D host's output from the fused host's: ``A^-1 (y' - c)``."""
        return F.conv2d(y - self.centre_bias[:, None, None], self.inverse[:, :, None, None])
