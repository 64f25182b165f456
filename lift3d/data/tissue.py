"""Brain tissue classes (CSF, grey matter, white matter): their names, and probability maps made into labels.

A dataset with tissue gives ``extra["tissue"]``, ``(3, n, h, w)`` probabilities of ``TISSUES`` in that
order on the training grid; a label map is ``(n, h, w)`` int64 with 0 = background and ``i`` = ``TISSUES[i - 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

TISSUES: tuple[str, ...] = ("csf", "gm", "wm")


def with_background(probabilities: Tensor) -> Tensor:
    """``(K, ...)`` class probabilities -> ``(K + 1, ...)``, background first (``1 - sum``, clipped),
    normalised so every voxel sums to 1."""
    if probabilities.dim() < 2:
        raise ValueError(f"tissue probabilities must be (classes, ...), got shape {tuple(probabilities.shape)}")
    p = probabilities.float().clamp(0.0, 1.0)
    background = (1.0 - p.sum(0, keepdim=True)).clamp(0.0, 1.0)
    full = torch.cat([background, p])
    return full / full.sum(0, keepdim=True).clamp_min(1e-6)


def tissue_labels(probabilities: Tensor) -> Tensor:
    """``(K, n, h, w)`` probabilities -> ``(n, h, w)`` int64 labels: the most probable of background and the K
    classes (0 = background, ``i`` = class ``i - 1``)."""
    return with_background(probabilities).argmax(0)
