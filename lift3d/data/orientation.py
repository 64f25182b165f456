"""Canonical (RAS) orientation and the choice of slice axis: a 3D image <-> ``(n, h, w)`` slices.

Every image is first reoriented to the closest canonical orientation (RAS+, as
``nibabel.as_closest_canonical``: flips and axis swaps only, no interpolation), then its axes are
permuted so the slice axis comes first. The permutations keep the remaining axes in RAS order, so
``imshow(slice, origin="lower")`` shows every view upright.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

RAS = ("R", "A", "S")

# slice axis -> the RAS axes of (n, h, w)
SLICE_AXES: dict[str, tuple[int, int, int]] = {
    "sagittal": (0, 2, 1),  # n = R, h = S, w = A
    "coronal": (1, 2, 0),  # n = A, h = S, w = R
    "axial": (2, 1, 0),  # n = S, h = A, w = R (the last RAS axis; the default)
}


def check_slice_axis(slice_axis: str) -> str:
    if slice_axis not in SLICE_AXES:
        raise ValueError(f"Unknown slice axis {slice_axis!r}; valid: {', '.join(sorted(SLICE_AXES))}")
    return slice_axis


def orientation_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """The axis codes of an affine, e.g. ``('L', 'P', 'S')``."""
    return tuple(nib.aff2axcodes(affine))  # type: ignore[return-value]


def to_slices(image: nib.Nifti1Image, slice_axis: str = "axial") -> np.ndarray:
    """A validated 3D image -> float32 ``(n, h, w)`` in canonical orientation, slice axis first."""
    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    return np.ascontiguousarray(data.transpose(SLICE_AXES[check_slice_axis(slice_axis)]))


def to_slice_order(values, orientation: tuple[str, str, str], slice_axis: str) -> tuple:
    """Per-axis ``values`` of an image's array axes (its shape, its voxel size) in the ``(n, h, w)`` order
    of ``to_slices``, for an image of ``orientation``."""
    ras = [None, None, None]
    for axis, (ras_axis, _) in enumerate(axcodes2ornt(orientation)):
        ras[int(ras_axis)] = values[axis]
    return tuple(ras[a] for a in SLICE_AXES[check_slice_axis(slice_axis)])


def slice_shape(shape: tuple[int, ...], orientation: tuple[str, str, str], slice_axis: str) -> tuple[int, int, int]:
    """The ``(n, h, w)`` shape that ``to_slices`` gives for an image of ``shape`` and ``orientation``."""
    return to_slice_order(shape, orientation, slice_axis)  # type: ignore[return-value]


def from_slices(slices: np.ndarray, orientation: tuple[str, str, str], slice_axis: str) -> np.ndarray:
    """Undo ``to_slices``: ``(n, h, w)`` -> the array axes of an image with ``orientation``."""
    ras = slices.transpose(np.argsort(SLICE_AXES[check_slice_axis(slice_axis)]))
    back = ornt_transform(axcodes2ornt(RAS), axcodes2ornt(orientation))
    return np.ascontiguousarray(apply_orientation(ras, back))
