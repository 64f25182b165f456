"""The inference fast path: fold each volumetric layer's residual and centre tap into its host conv.

A volumetric layer after a host conv computes ``out_i = y_i + W_c y_i + sum_j W_j y_(i+j) + b`` with
``y = conv(x)``. The part that reads the slice itself is linear, ``A y_i + c`` with ``A = I + W_c``,
so it can live in the host: ``W' = A W_host``, ``b' = A b_host + c``. The host then returns
``y' = A y + c`` at the host's own cost, and the layer computes only the off-centre taps, from
``y = A^-1 (y' - c)`` folded into their weights. :func:`fuse` does this for every layer whose kind
supports it (``fuse_into``) and whose host is a plain ``nn.Conv2d``; the others run unchanged.

Exactness: the fused model equals the unfused one up to fp32 round-off (the folding runs in float64;
``tests/test_fuse.py`` checks ``rtol = atol = 1e-4`` on outputs of order 1 for trained-size weights).
A fused model is for inference only: it cannot be trained or saved (save before fusing). A plain 2D
batch and :func:`lift3d.volumetric_disabled` still give the 2D model's output, through ``A^-1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d._hooks import LAYER_NAME
from lift3d.volumetric import conv_along_slices

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
    """The off-centre taps of a folded :class:`~lift3d.volumetric.VolumetricConv`:
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


def fuse(model: nn.Module) -> nn.Module:
    """Fold every volumetric layer that can be folded into its host conv, in place; returns the
    model in eval mode with gradients off. Idempotent. The layers left as they were (a kind without
    ``fuse_into``, a host that is not a plain ``nn.Conv2d``, an ill-conditioned ``A``) are listed by
    :func:`fused_layers`."""
    from lift3d.inflate import _state

    state = _state(model)
    model.eval().requires_grad_(False)
    modules = dict(model.named_modules())
    for name in state.where:
        host = modules[name]
        layer = getattr(host, LAYER_NAME)
        if getattr(layer, "fused", False) or type(host) is not nn.Conv2d or not hasattr(layer, "fuse_into"):
            continue
        try:
            folded = layer.fuse_into(host)
        except FoldError:
            continue
        if folded is not layer:
            host.add_module(LAYER_NAME, folded)
    state.fused = True
    return model


def fused_layers(model: nn.Module) -> dict[str, bool]:
    """``{host name: whether its layer is folded}`` for every volumetric layer."""
    from lift3d.inflate import _state

    modules = dict(model.named_modules())
    return {name: bool(getattr(getattr(modules[name], LAYER_NAME), "fused", False)) for name in _state(model).where}
