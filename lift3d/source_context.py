"""2.5D source context: the U-Net sees the source's neighbouring slices as extra channels.

A slice-wise model conditioned on the source slice ``k`` alone cannot know how the anatomy
continues above and below it; with ``context = C`` it gets the source slices ``k - C .. k + C``
(the edge slice repeats beyond the volume), stacked offset-major on channels. This is the
2.5D input of the BraSyn and SynthRAD challenge entries. Stage 1 trains with it
(``model.source_context``), stage 2 and synthesis inherit it from the stage-1 model, and all
three build it from the same index rule, so slice ``k`` of a volume sees exactly what the
slice-wise training item ``k`` saw.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def context_indices(k: int | Tensor, num_slices: int, context: int) -> Tensor:
    """Slice indices ``k - context .. k + context``, clamped to ``[0, num_slices - 1]``."""
    offsets = torch.arange(-context, context + 1)
    k = torch.as_tensor(k)
    return (k.reshape(-1, 1) + offsets).clamp(0, num_slices - 1).reshape(*k.shape, 2 * context + 1)


def with_source_context(source: Tensor, context: int) -> Tensor:
    """``(b, c, n, h, w)`` -> ``(b, (2 context + 1) c, n, h, w)``: slice ``k`` carries slices ``k - context``
    to ``k + context`` on channels (offset-major), the edge slice repeated. ``context = 0``: unchanged."""
    if context == 0:
        return source
    n = source.shape[2]
    index = context_indices(torch.arange(n), n, context).to(source.device)  # (n, d)
    stacked = source[:, :, index]  # (b, c, n, d, h, w)
    return rearrange(stacked, "b c n d h w -> b (d c) n h w")


def flatten_window(window: Tensor) -> Tensor:
    """A stage-1 item's source window ``(b, c, 2 context + 1, h, w)`` -> ``(b, (d c), 1, h, w)``: the channels
    :func:`with_source_context` gives its centre slice."""
    return rearrange(window, "b c d h w -> b (d c) 1 h w")
