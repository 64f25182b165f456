"""Attention along the slice axis: a volumetric layer that sees every slice of the volume.

Per in-plane position, the n slices attend to each other (a temporal-attention layer as in video
diffusion models, here over slices):

    f' = f + out(attention(q(f), k(f), v(f)) along n)     rearrange('(b n) c h w -> (b h w) n c')

with a learnt bias per head and slice offset (clipped to ``max_distance``, so any n works), since
attention alone does not know which slices are neighbours. ``out`` starts at zero, so ``f' == f`` bit
for bit at initialisation. The projections work in ``inner_ratio * C`` channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lift3d.layers.low_rank import rank_for
from lift3d.layers.registry import LAYER_KINDS


@LAYER_KINDS.register("slice-attention")
class SliceAttention(nn.Module):
    """Residual multi-head attention over the slices of each volume, on a ``(b n) c h w`` batch."""

    def __init__(self, channels: int, kernel_size: int = 3, *, heads: int = 2, inner_ratio: float = 0.25,
                 max_distance: int = 8, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        # kernel_size and padding_mode belong to the conv kinds; attention has neither.
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive integer, got {heads!r}")
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 0:
            raise ValueError(f"max_distance must be an integer >= 0, got {max_distance!r}")
        inner = rank_for(channels, None, inner_ratio)
        inner = max(heads, inner - inner % heads)
        self.channels, self.inner, self.heads, self.max_distance = channels, inner, heads, max_distance
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(channels, **factory)
        self.qkv = nn.Linear(channels, 3 * inner, **factory)
        self.position_bias = nn.Parameter(torch.empty(2 * max_distance + 1, heads, **factory))
        self.out = nn.Linear(inner, channels, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The single place of the identity initialisation: the output projection at zero."""
        self.norm.reset_parameters()
        self.qkv.reset_parameters()
        nn.init.zeros_(self.position_bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def init_random_(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, std if std is not None else 1.0 / math.sqrt(max(p.shape[-1], 1)), generator=generator)

    def extra_repr(self) -> str:
        return f"{self.channels}, inner={self.inner}, heads={self.heads}, max_distance={self.max_distance}"

    def _bias(self, n: int) -> Tensor:
        offsets = torch.arange(n, device=self.position_bias.device)
        offsets = (offsets[None, :] - offsets[:, None]).clamp(-self.max_distance, self.max_distance)
        return rearrange(self.position_bias[offsets + self.max_distance], "i j h -> h i j")

    def forward(self, x: Tensor, num_slices: int) -> Tensor:
        """``x``: ``(b n) c h w`` with ``n = num_slices``. Returns the same shape."""
        if x.shape[0] % num_slices:
            raise ValueError(f"batch of {x.shape[0]} slices is not a whole number of volumes of {num_slices} slices")
        if x.shape[1] != self.channels:
            raise ValueError(f"SliceAttention expects {self.channels} channels, got {x.shape[1]} (input {tuple(x.shape)})")
        h, w = x.shape[-2:]
        f = rearrange(x, "(b n) c h w -> (b h w) n c", n=num_slices)
        q, k, v = rearrange(self.qkv(self.norm(f)), "s n (three heads d) -> three s heads n d", three=3, heads=self.heads)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(num_slices).to(q.dtype))
        delta = self.out(rearrange(attended, "s heads n d -> s n (heads d)"))
        return x + rearrange(delta, "(b h w) n c -> (b n) c h w", h=h, w=w)
