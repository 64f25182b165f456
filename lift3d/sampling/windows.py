"""Volumes longer than the model was fine-tuned on, denoised in overlapping windows.

At every step the U-Net runs on each window and the noise predictions are blended with weights that
ramp down towards inner window edges, then one solver step updates the whole volume. (Overwriting
the overlap instead, as the authors' code does, leaves seams where a window's border slices meet.)
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from lift3d.diffusion.conditioning import predict
from lift3d.sampling.model import SynthesisModel

logger = logging.getLogger("lift3d.sampling.windows")


def window_weights(num_slices: int, window: int, overlap: int) -> list[tuple[int, Tensor]]:
    """``(start, weights)`` for each window of ``window`` slices covering ``num_slices``.

    Windows start every ``window - overlap`` slices; the last one is aligned to the end of the
    volume. Weights are 1 inside a window and fall over the ``L`` slices it shares with a
    neighbour along a raised-cosine (Hann) ramp, ``sin^2(pi k / (2 (L + 1)))`` for k = 1..L, so
    two overlapping ramps sum to 1 and a window's border slices, which miss their neighbours,
    get the least weight. Volume ends are never ramped, and every weight is > 0, so normalising
    by the summed weights gives each slice a convex blend of the windows that contain it.
    """
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be from 0 to window - 1 = {window - 1} slices, got {overlap}")
    if window >= num_slices:
        return [(0, torch.ones(num_slices))]
    stride = window - overlap
    starts = list(range(0, num_slices - window + 1, stride))
    if starts[-1] != num_slices - window:
        starts.append(num_slices - window)
    out = []
    for i, start in enumerate(starts):
        w = torch.ones(window, dtype=torch.float64)
        if i > 0:
            shared = starts[i - 1] + window - start
            w[:shared] = torch.minimum(w[:shared], _rising(shared))
        if i < len(starts) - 1:
            shared = start + window - starts[i + 1]
            w[window - shared:] = torch.minimum(w[window - shared:], _rising(shared).flip(0))
        out.append((start, w.float()))
    return out


def _rising(length: int) -> Tensor:
    k = torch.arange(1, length + 1, dtype=torch.float64)
    return torch.sin(torch.pi * k / (2 * (length + 1))) ** 2


def resolve_window(model: SynthesisModel, num_slices: int, window: int | None = None, overlap: int | None = None,
                   slice_wise: bool = False) -> tuple[int, int] | None:
    """The ``(window, overlap)`` ``synthesize`` denoises ``num_slices`` slices with, or None for
    the whole volume at once (see its ``window`` and ``overlap``)."""
    n = num_slices
    for name, value in (("window", window), ("overlap", overlap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
    if window is None:
        # Slices of a 2D (or slice-wise) model never interact, so there is nothing to window.
        if slice_wise or not model.lifted or not model.max_slices or n <= model.max_slices:
            return None
        window = model.max_slices
        logger.info("volume of %d slices is longer than the %d the model was fine-tuned on: denoising in windows",
                    n, window)
    if window == 0 or window >= n:
        return None
    overlap = max(window // 4, 1) if overlap is None else overlap
    if overlap >= window:
        raise ValueError(f"overlap must be smaller than the window ({window} slices), got {overlap}")
    return window, overlap


def predict_noise(model: SynthesisModel, sample: Tensor, condition: Tensor | None, t: Tensor,
                  slice_wise: bool = False) -> Tensor:
    """One U-Net call on a volume batch ``(b, c, n, h, w)``, every slice at timestep ``t``."""
    return predict(model.unet, sample, condition, t, slice_wise=slice_wise, dtype=model.dtype).float()


def predict_noise_windowed(model: SynthesisModel, sample: Tensor, condition: Tensor | None, t: Tensor,
                           windows: list[tuple[int, Tensor]], slice_wise: bool = False) -> Tensor:
    """Blend the noise predictions of each window by its weights, normalised by their sum."""
    n = sample.shape[2]
    total = torch.zeros(n, device=sample.device)
    out = None
    for start, weights in windows:
        part = slice(start, start + len(weights))
        eps = predict_noise(model, sample[:, :, part], None if condition is None else condition[:, :, part], t,
                            slice_wise)
        weights = weights.to(sample.device)
        if out is None:
            out = torch.zeros(*eps.shape[:2], n, *eps.shape[3:], device=sample.device)
        out[:, :, part] += eps * weights[:, None, None]
        total[part] += weights
    return out / total[:, None, None]
