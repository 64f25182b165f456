"""Where volumetric layers go: placement presets over a 2D network's module graph.

The default (``auto``) follows Make-A-Volume's lineage (pseudo-3D convs, as in Make-A-Video): one
layer after each spatial Conv2d inside a residual block; a network without residual blocks gets one
after every spatial Conv2d instead.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, Union

from torch import nn

RESIDUAL_BLOCK = re.compile(r"res(net)?[_]?(block|unit)|resnet|residual|bottleneck|basicblock|convnext", re.I)
"""Class names taken for residual blocks: diffusers ``ResnetBlock2D``, timm ``BasicBlock``,
``Bottleneck``, ``ConvNeXtBlock``, and user classes such as ``ResBlock``."""

Where = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


def _is_spatial_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1


def _residual_ancestor(name: str, blocks: dict[str, nn.Module]) -> str | None:
    """The nearest enclosing residual block of module ``name`` (the root never counts)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in blocks:
            return prefix
    return None


def _select_resnet(model: nn.Module) -> list[str]:
    blocks = {n: m for n, m in model.named_modules() if n and RESIDUAL_BLOCK.search(type(m).__name__)}
    return [n for n, m in model.named_modules() if _is_spatial_conv(m) and _residual_ancestor(n, blocks)]


def _select_spatial(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if _is_spatial_conv(m)]


def _select_block_output(model: nn.Module) -> list[str]:
    blocks = [n for n, m in model.named_modules() if n and RESIDUAL_BLOCK.search(type(m).__name__)]
    # Only outermost blocks: a block nested in another block would double up.
    return [n for n in blocks if not any(n.startswith(o + ".") for o in blocks)]


def _select_resnet_coarse(model: nn.Module) -> list[str]:
    hosts = _select_resnet(model)
    modules = dict(model.named_modules())
    widths = {name: out_channels(name, modules[name]) for name in hosts}
    finest = min(widths.values(), default=0)
    return [name for name in hosts if widths[name] > finest]


def _select_auto(model: nn.Module) -> list[str]:
    return _select_resnet(model) or _select_spatial(model)


PRESETS: dict[str, Callable[[nn.Module], list[str]]] = {
    "auto": _select_auto,
    "resnet": _select_resnet,
    "spatial": _select_spatial,
    "block-output": _select_block_output,
    "resnet-coarse": _select_resnet_coarse,
}
"""``auto`` (default): ``resnet`` where the model has residual blocks, else ``spatial``.
``resnet`` (the paper's lineage): after each spatial (kernel > 1) Conv2d inside a residual block,
making it a pseudo-3D conv. ``spatial``: after every spatial Conv2d. ``block-output``: one layer on
the output of each residual block. ``resnet-coarse``: ``resnet`` without the narrowest hosts (a
U-Net's finest level, where a layer costs the most activation memory)."""


def out_channels(name: str, module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    channels = getattr(module, "out_channels", None)
    if isinstance(channels, int):
        return channels
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"cannot tell the output channels of host {name!r} ({type(module).__name__}): "
                         "it has no Conv2d and no integer `out_channels`")
    return convs[-1].out_channels


def choose_hosts(model: nn.Module, where: Where) -> tuple[list[str], str]:
    """The host names for ``where`` and a phrase saying how they were chosen (for the report)."""
    hosts = select_hosts(model, where)
    if isinstance(where, str) and where == "auto":
        if _select_resnet(model):
            return hosts, "resnet (auto: the spatial convs of residual blocks)"
        return hosts, "spatial (auto: no residual blocks found, so every spatial conv)"
    return hosts, f"{where}" if isinstance(where, str) else ("a callable" if callable(where) else "listed modules")


def select_hosts(model: nn.Module, where: Where) -> list[str]:
    if isinstance(where, str):
        if where not in PRESETS:
            raise ValueError(f"Unknown placement where={where!r}; available: {', '.join(PRESETS)}, "
                             "a list of module names, or a callable (name, module) -> bool")
        return PRESETS[where](model)
    if callable(where):
        return [n for n, m in model.named_modules() if n and where(n, m)]
    names = list(where)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"where= names modules the model does not have: {unknown}")
    return names


