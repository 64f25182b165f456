"""The volumetric layer of Make-A-Volume (Zhu et al., MICCAI 2023, sec. 2.3, eqs. 5-7).

A 1D convolution along the slice axis, applied as a residual so it starts as the exact identity:

    f' = f + conv1d(rearrange(f, '(b n) c h w -> (b h w) c n'))   rearranged back to '(b n) c h w'

The conv's weight and bias start at zero, so ``f' == f`` bit for bit until training moves them. Registered
as two layer kinds: ``full`` (the paper's layer) and ``depthwise`` (one 1D conv per channel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lift3d.layers.functional import check_slice_conv, conv_along_slices
from lift3d.layers.registry import LAYER_KINDS


class VolumetricConv(nn.Module):
    """Residual 1D conv over slices, acting on a ``(b n) c h w`` batch of slices.

    The parameters have the shapes of ``nn.Conv1d(channels, channels, kernel_size, groups=groups)``
    (``weight``: ``(channels, channels // groups, kernel_size)``). Border slices see ``padding_mode``
    padding along n: ``zeros`` (missing neighbours contribute nothing) or ``replicate`` (the border
    slice stands in for its missing neighbour).

    The fast path computes the same thing as the einops sandwich without the two transposing
    copies: all taps come from one 1x1 conv on the slices, each shifted along n and summed.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        groups: int = 1,
        padding_mode: str = "zeros",
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_slice_conv(kernel_size, padding_mode)
        if groups < 1 or channels % groups:
            raise ValueError(f"groups must divide channels ({channels}), got {groups}")
        self.channels, self.kernel_size, self.groups, self.padding_mode = channels, kernel_size, groups, padding_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(channels, channels // groups, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The single place where the identity initialisation happens: a zero residual."""
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def init_random_(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Random weights (for tests and ablations), as ``nn.Conv1d`` would draw them."""
        std = std if std is not None else 1.0 / math.sqrt(self.weight[0].numel())
        with torch.no_grad():
            self.weight.normal_(0.0, std, generator=generator)
            if self.bias is not None:
                self.bias.normal_(0.0, std, generator=generator)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, bias={self.bias is not None}")

    def forward(self, x: Tensor, num_slices: int) -> Tensor:
        """``x``: ``(b n) c h w`` with ``n = num_slices``. Returns the same shape."""
        if x.shape[0] % num_slices:
            raise ValueError(f"batch of {x.shape[0]} slices is not a whole number of volumes of {num_slices} slices")
        if x.shape[1] != self.channels:
            raise ValueError(f"VolumetricConv expects {self.channels} channels, got {x.shape[1]} (input {tuple(x.shape)})")
        return self._residual_slice_conv(x, num_slices)

    def _residual_slice_conv(self, x: Tensor, n: int) -> Tensor:
        return conv_along_slices(x, self.weight, n, bias=self.bias, groups=self.groups,
                                 padding_mode=self.padding_mode, residual=True)

    def fuse_into(self, host: nn.Conv2d) -> nn.Module:
        """Fold the residual and the centre tap into ``host`` for inference (``lift3d.lifting.fuse``)."""
        from lift3d.layers.fused import FusedSliceConv

        return FusedSliceConv.fold(host, self._dense_taps(), self.bias, self.padding_mode,
                                   depthwise=self.groups == self.channels)

    def _dense_taps(self) -> Tensor:
        """The weight as ``(k, C, C)`` matrices (block-diagonal for groups > 1)."""
        g, c = self.groups, self.channels // self.groups
        blocks = self.weight.view(g, c, c, self.kernel_size).permute(3, 0, 1, 2)  # k g o i
        return torch.stack([torch.block_diag(*tap) for tap in blocks]) if g > 1 else blocks[:, 0]

    def forward_reference(self, x: Tensor, num_slices: int) -> Tensor:
        """The paper's eqs. 5-7 written literally (einops -> Conv1d -> einops), for checking."""
        b_n, c, h, w = x.shape
        f = rearrange(x, "(b n) c h w -> (b h w) c n", n=num_slices)
        pad = self.kernel_size // 2
        mode = "constant" if self.padding_mode == "zeros" else "replicate"
        f = F.conv1d(F.pad(f, (pad, pad), mode=mode), self.weight, self.bias, groups=self.groups)
        return x + rearrange(f, "(b h w) c n -> (b n) c h w", h=h, w=w)


@LAYER_KINDS.register("full")
def full(channels: int, *, kernel_size: int = 3, padding_mode: str = "zeros", groups: int | str = 1,
         device=None, dtype=None) -> VolumetricConv:
    """The paper's layer; ``groups`` an int dividing ``channels`` or ``"depthwise"`` (one per channel)."""
    if isinstance(groups, str) and groups != "depthwise":
        raise ValueError(f"Unknown groups={groups!r}; use an int or 'depthwise'")
    return VolumetricConv(channels, kernel_size, groups=channels if groups == "depthwise" else groups,
                          padding_mode=padding_mode, device=device, dtype=dtype)


@LAYER_KINDS.register("depthwise")
def depthwise(channels: int, *, kernel_size: int = 3, padding_mode: str = "zeros", device=None,
              dtype=None) -> VolumetricConv:
    """One 1D conv per channel: C k weights instead of C^2 k."""
    return VolumetricConv(channels, kernel_size, groups=channels, padding_mode=padding_mode, device=device,
                          dtype=dtype)
