"""The inference fast path: fold each volumetric layer's residual and centre tap into its host conv.

A volumetric layer after a host conv computes ``out_i = y_i + W_c y_i + sum_j W_j y_(i+j) + b`` with
``y = conv(x)``. The part that reads the slice itself is linear, ``A y_i + c`` with ``A = I + W_c``,
so it can live in the host: ``W' = A W_host``, ``b' = A b_host + c``. The host then returns
``y' = A y + c`` at the host's own cost, and the layer computes only the off-centre taps, from
``y = A^-1 (y' - c)`` folded into their weights. ``fuse`` does this for every layer whose kind
supports it (``fuse_into``) and whose host is a plain ``nn.Conv2d``; the others run unchanged.

Exactness: the fused model equals the unfused one up to fp32 round-off (the folding runs in float64;
``tests/test_fuse.py`` checks ``rtol = atol = 1e-4`` on outputs of order 1 for trained-size weights).
A fused model is for inference only: it cannot be trained or saved (save before fusing). A plain 2D
batch and ``lift3d.volumetric_disabled`` still give the 2D model's output, through ``A^-1``.
"""

from __future__ import annotations

from torch import nn

from lift3d.layers.fused import FoldError
from lift3d.lifting.hooks import LAYER_NAME, lift_state

def fuse(model: nn.Module) -> nn.Module:
    """Fold every volumetric layer that can be folded into its host conv, in place; returns the
    model in eval mode with gradients off. Idempotent. The layers left as they were (a kind without
    ``fuse_into``, a host that is not a plain ``nn.Conv2d``, an ill-conditioned ``A``) are listed by
    ``fused_layers``."""
    state = lift_state(model)
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
    modules = dict(model.named_modules())
    return {name: bool(getattr(getattr(modules[name], LAYER_NAME), "fused", False)) for name in lift_state(model).where}
