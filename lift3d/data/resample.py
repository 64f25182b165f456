"""Resizing ``(n, h, w)`` volumes to and from the training grid, and the in-plane size check.

Voxel centres map onto voxel centres (``grid_mode=True``, like ``align_corners=False``), so
resizing to a grid and back again is consistent. Downsampling first smooths with a Gaussian of
sigma ``(factor - 1) / 2`` per axis (scikit-image's anti-aliasing rule) to avoid aliasing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_in_plane_size(size: int | tuple[int, int], multiple: int = 8) -> tuple[int, int]:
    """``size`` (int or ``(h, w)``) as ``(h, w)``; each must be a positive multiple of ``multiple``.

    ``multiple`` is what the autoencoder and U-Net need: the autoencoder's downsampling factor
    times ``2 ** (number of U-Net downsamplings)``.
    """
    if not _is_int(multiple) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if _is_int(size):
        size = (size, size)  # type: ignore[assignment]
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(s) for s in size)):
        raise ValueError(f"in-plane size must be an int or a pair (h, w) of ints, got {size!r}")
    for s in size:
        if s < 1 or s % multiple:
            lower = s // multiple * multiple
            nearest = f"{lower} or {lower + multiple}" if lower >= multiple else str(multiple)
            raise ValueError(
                f"in-plane size {s} is not a positive multiple of {multiple} (what the autoencoder and "
                f"U-Net need); nearest valid sizes: {nearest}"
            )
    return int(size[0]), int(size[1])


def resize_volume(volume: np.ndarray, shape: tuple[int, int, int], *, order: int = 1, antialias: bool = True) -> np.ndarray:
    """Resize a 3D array to ``shape`` by spline interpolation of ``order`` (0 = nearest, for masks)."""
    shape = tuple(int(s) for s in shape)
    if volume.shape == shape:
        return volume.astype(np.float32, copy=True)
    factors = [out / inp for out, inp in zip(shape, volume.shape)]
    data = volume.astype(np.float32, copy=False)
    if antialias and order > 0:
        sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors]
        if any(sigma):
            data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    out = ndimage.zoom(data, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != shape:  # zoom rounds its output shape; pin it if a float ratio fell short
        out = out[tuple(slice(0, s) for s in shape)]
        out = np.pad(out, [(0, s - o) for s, o in zip(shape, out.shape)], mode="edge")
    return out.astype(np.float32, copy=False)
