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


def check_slice_conv(kernel_size: int, padding_mode: str) -> None:
    """The arguments every conv along the slices shares: an odd kernel, a known border rule."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"Unknown padding_mode {padding_mode!r}; available: {', '.join(PADDING_MODES)}")


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
        """Fold the residual and the centre tap into ``host`` for inference (:mod:`lift3d.fuse`)."""
        from lift3d.fuse import FusedSliceConv

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


def conv_along_slices(x: Tensor, weight: Tensor, n: int, *, bias: Tensor | None = None, groups: int = 1,
                      padding_mode: str = "zeros", residual: bool = False, skip_centre: bool = False,
                      tap_bias: Tensor | None = None, in_place: bool = False) -> Tensor:
    """A 1D conv along n of a ``(b n) c h w`` batch, ``weight`` shaped ``(c_out, c_in // groups, k)``.

    One GEMM computes every tap of every slice (a 1x1 conv with the taps stacked on the output
    channels); each tap is then added at its offset along n, without the two transposing copies of
    the einops sandwich. ``residual`` adds ``x`` (c_out == c_in) riding on the centre tap;
    ``skip_centre`` leaves the centre tap out; ``tap_bias`` ``(k, c_out)`` is added with its tap
    wherever that tap's neighbour exists (the fused layers of :mod:`lift3d.fuse`). ``in_place`` with
    ``residual`` and ``skip_centre`` adds the taps into ``x`` itself (inference, no autograd).
    """
    k = weight.shape[-1]
    pad = k // 2
    c_out = weight.shape[0]
    g = groups
    taps_used = [j for j in range(k) if not (skip_centre and j == pad)]
    if g == x.shape[1] and g == c_out:  # depthwise: a broadcast multiply is far cheaper than a grouped conv
        w = rearrange(weight[..., taps_used], "g c k -> g k c 1 1")
        taps = rearrange(x, "bn (g c) h w -> bn g 1 c h w", c=1) * w
    else:
        co = c_out // g
        w = weight[..., taps_used].reshape(g, co, -1, len(taps_used)).permute(0, 3, 1, 2)
        w = w.reshape(g * len(taps_used) * co, -1, 1, 1)
        taps = rearrange(F.conv2d(x, w, groups=g), "bn (g k c) h w -> bn g k c h w", g=g, k=len(taps_used))
    taps = rearrange(taps, "(b n) g k c h w -> b n g k c h w", n=n)
    if tap_bias is not None:
        taps = taps + rearrange(tap_bias[taps_used], "k (g c) -> g k c 1 1", g=g)
    if pad in taps_used:
        out = taps[:, :, :, taps_used.index(pad)]
        out = out + rearrange(x, "(b n) (g c) h w -> b n g c h w", n=n, g=g) if residual else out.clone()
    else:
        out = rearrange(x, "(b n) (g c) h w -> b n g c h w", n=n, g=g)
        if not (residual and in_place):
            out = out.clone() if residual else torch.zeros_like(out)
    for i, j in enumerate(taps_used):
        if j != pad:
            _add_shifted_(out, taps[:, :, :, i], j - pad, n, padding_mode)
    if bias is not None:
        out += rearrange(bias, "(g c) -> g c 1 1", g=g)
    return rearrange(out, "b n g c h w -> (b n) (g c) h w")


def _add_shifted_(out: Tensor, tap: Tensor, offset: int, n: int, padding_mode: str) -> None:
    """``out[:, i] += tap[:, i + offset]``, with the border rule where ``i + offset`` leaves ``[0, n)``."""
    m = max(n - abs(offset), 0)  # outputs whose neighbour exists
    if offset > 0:
        out[:, :m] += tap[:, offset:offset + m]
        if padding_mode == "replicate":
            out[:, m:] += tap[:, n - 1:n]
    else:
        out[:, n - m:] += tap[:, :m]
        if padding_mode == "replicate":
            out[:, :n - m] += tap[:, :1]
