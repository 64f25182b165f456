"""2.5D source context: the U-Net sees the source's neighbouring slices as extra channels.

A slice-wise model conditioned on the source slice ``k`` alone cannot know how the anatomy
continues above and below it; with ``context = C`` it gets the source slices ``k - C .. k + C``
(the edge slice repeats beyond the volume), stacked offset-major on channels. This is the
2.5D input of the BraSyn and SynthRAD challenge entries. Stage 1 trains with it
(``model.source_context``), stage 2 and synthesis inherit it from the stage-1 model, and all
three build it from the same index rule, so slice ``k`` of a volume sees exactly what the
slice-wise training item ``k`` saw.

Training items carry a *padded* source: the target's slices and ``context`` more on each side,
taken from the whole volume (``padded_indices``). A stage-1 item is the padded source of one
slice; a stage-2 window's edge slices see their real neighbours, not a repeated edge.
``centre_with_context`` turns a padded source into the U-Net's channels.
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


def padded_indices(start: int, length: int, num_slices: int, context: int) -> Tensor:
    """The slices ``start - context .. start + length + context - 1`` of a volume, clamped to it: the source
    a training item of ``length`` target slices from ``start`` needs for its 2.5D context."""
    return torch.arange(start - context, start + length + context).clamp(0, num_slices - 1)


def centre_with_context(padded: Tensor, context: int) -> Tensor:
    """A source padded by ``context`` slices on each side ``(b, c, n + 2 context, h, w)`` ->
    ``(b, (2 context + 1) c, n, h, w)``: its centre slices with their neighbours on channels,
    as ``with_source_context`` gives them in the whole volume."""
    if context == 0:
        return padded
    return with_source_context(padded, context)[:, :, context:-context]
