"""Built-in kinds of volumetric layer, registered as any plugin's would be (``lift3d.layers.registry``).

``full`` is Make-A-Volume's layer (Zhu et al., MICCAI 2023, eqs. 5-7), a full-channel 1D conv along
the slices; ``depthwise`` the same with one group per channel; ``low-rank`` the conv inside a max(16, C/8)
bottleneck (:mod:`lift3d.layers.low_rank`); ``slice-attention`` attention over all slices
(:mod:`lift3d.layers.slice_attention`).
"""

from __future__ import annotations

from lift3d.layers.low_rank import LowRankVolumetricConv
from lift3d.plugins import hookimpl
from lift3d.layers.slice_attention import SliceAttention
from lift3d.layers.volumetric import VolumetricConv


def full(channels: int, *, kernel_size: int = 3, padding_mode: str = "zeros", groups: int | str = 1,
         device=None, dtype=None) -> VolumetricConv:
    """The paper's layer; ``groups`` an int dividing ``channels`` or ``"depthwise"`` (one per channel)."""
    if isinstance(groups, str) and groups != "depthwise":
        raise ValueError(f"Unknown groups={groups!r}; use an int or 'depthwise'")
    return VolumetricConv(channels, kernel_size, groups=channels if groups == "depthwise" else groups,
                          padding_mode=padding_mode, device=device, dtype=dtype)


def depthwise(channels: int, *, kernel_size: int = 3, padding_mode: str = "zeros", device=None,
              dtype=None) -> VolumetricConv:
    """One 1D conv per channel: C k weights instead of C^2 k."""
    return VolumetricConv(channels, kernel_size, groups=channels, padding_mode=padding_mode, device=device,
                          dtype=dtype)


@hookimpl
def lift3d_register_layer_kinds(registry):
    registry.add("full", full)
    registry.add("depthwise", depthwise)
    registry.add("low-rank", LowRankVolumetricConv)
    registry.add("slice-attention", SliceAttention)
