"""The volumetric layer of Make-A-Volume (Zhu et al., MICCAI 2023, sec. 2.3, eqs. 5-7).

A 1D convolution along the slice axis, applied as a residual so it starts as the exact identity:

    f' = f + conv1d(rearrange(f, '(b n) c h w -> (b h w) c n'))   rearranged back to '(b n) c h w'

The conv's weight and bias start at zero, so ``f' == f`` bit for bit until training moves them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

PADDING_MODES = ("zeros", "replicate")


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
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"Unknown padding_mode {padding_mode!r}; available: {', '.join(PADDING_MODES)}")
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

    def _stacked_weight(self) -> Tensor:
        """All taps as one grouped 1x1 conv; output channels ordered (group, tap, channel)."""
        g, k = self.groups, self.kernel_size
        w = self.weight.view(g, self.channels // g, self.channels // g, k).permute(0, 3, 1, 2)
        return w.reshape(g * k * (self.channels // g), self.channels // g, 1, 1)

    def _residual_slice_conv(self, x: Tensor, n: int) -> Tensor:
        # One GEMM computes every tap of every slice; each tap is then added at its offset along n.
        # The residual rides on the centre tap, so no extra full-size tensor is made.
        g, k, pad = self.groups, self.kernel_size, self.kernel_size // 2
        if g == self.channels:  # depthwise: a broadcast multiply is far cheaper than a grouped conv
            taps = rearrange(x, "bn (g c) h w -> bn g 1 c h w", c=1) * rearrange(self.weight, "g c k -> g k c 1 1")
        else:
            taps = rearrange(F.conv2d(x, self._stacked_weight(), groups=g), "bn (g k c) h w -> bn g k c h w", g=g, k=k)
        taps = rearrange(taps, "(b n) g k c h w -> b n g k c h w", n=n)
        out = taps[:, :, :, pad] + rearrange(x, "(b n) (g c) h w -> b n g c h w", n=n, g=g)
        for j in range(k):
            if j != pad:
                self._add_shifted_(out, taps[:, :, :, j], j - pad, n)
        if self.bias is not None:
            out += rearrange(self.bias, "(g c) -> g c 1 1", g=g)
        return rearrange(out, "b n g c h w -> (b n) (g c) h w")

    def _add_shifted_(self, out: Tensor, tap: Tensor, offset: int, n: int) -> None:
        """``out[:, i] += tap[:, i + offset]``, with the border rule where ``i + offset`` leaves ``[0, n)``."""
        m = max(n - abs(offset), 0)  # outputs whose neighbour exists
        if offset > 0:
            out[:, :m] += tap[:, offset:offset + m]
            if self.padding_mode == "replicate":
                out[:, m:] += tap[:, n - 1:n]
        else:
            out[:, n - m:] += tap[:, :m]
            if self.padding_mode == "replicate":
                out[:, :n - m] += tap[:, :1]

    def forward_reference(self, x: Tensor, num_slices: int) -> Tensor:
        """The paper's eqs. 5-7 written literally (einops -> Conv1d -> einops), for checking."""
        b_n, c, h, w = x.shape
        f = rearrange(x, "(b n) c h w -> (b h w) c n", n=num_slices)
        pad = self.kernel_size // 2
        mode = "constant" if self.padding_mode == "zeros" else "replicate"
        f = F.conv1d(F.pad(f, (pad, pad), mode=mode), self.weight, self.bias, groups=self.groups)
        return x + rearrange(f, "(b h w) c n -> (b n) c h w", h=h, w=w)
