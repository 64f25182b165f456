"""What every conv along the slice axis shares: its argument check and one fast 1D conv over slices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

PADDING_MODES = ("zeros", "replicate")


def check_slice_conv(kernel_size: int, padding_mode: str) -> None:
    """The arguments every conv along the slices shares: an odd kernel, a known border rule."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"Unknown padding_mode {padding_mode!r}; available: {', '.join(PADDING_MODES)}")


def conv_along_slices(x: Tensor, weight: Tensor, n: int, *, bias: Tensor | None = None, groups: int = 1,
                      padding_mode: str = "zeros", residual: bool = False, skip_centre: bool = False,
                      tap_bias: Tensor | None = None, in_place: bool = False) -> Tensor:
    """A 1D conv along n of a ``(b n) c h w`` batch, ``weight`` shaped ``(c_out, c_in // groups, k)``.

    One GEMM computes every tap of every slice (a 1x1 conv with the taps stacked on the output
    channels); each tap is then added at its offset along n, without the two transposing copies of
    the einops sandwich. ``residual`` adds ``x`` (c_out == c_in) riding on the centre tap;
    ``skip_centre`` leaves the centre tap out; ``tap_bias`` ``(k, c_out)`` is added with its tap
    wherever that tap's neighbour exists (the fused layers of ``lift3d.lifting.fuse``). ``in_place`` with
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
