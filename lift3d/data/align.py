"""World-space alignment of a pair: resample the target onto the source's voxel grid.

Images on the same grid (shape equal, affines equal within ``tolerance`` mm) are left as they
are. Otherwise the target is resampled through the two affines (``nibabel.processing.
resample_from_to``), as for S2M where SWI (0.34 x 0.34 x 0.8 mm) and MRA (0.9 x 0.9 x 2 mm) have
different grids. Pairs whose fields of view barely overlap are refused.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from lift3d.data.errors import VolumeError


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, tolerance: float = 0.01) -> bool:
    """Same 3D shape, and affines equal within ``tolerance`` (mm, entry by entry)."""
    return a.shape[:3] == b.shape[:3] and bool(np.allclose(a.affine, b.affine, rtol=0.0, atol=tolerance))


def _fraction_inside(a: nib.Nifti1Image, b: nib.Nifti1Image, samples: int = 16) -> float:
    """The fraction of ``a``'s field of view that lies inside ``b``'s (sampled on a regular grid)."""
    axes = [(np.arange(samples) + 0.5) / samples * s - 0.5 for s in a.shape[:3]]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    world = nib.affines.apply_affine(a.affine, grid)
    in_b = nib.affines.apply_affine(np.linalg.inv(b.affine), world)
    inside = np.all((in_b >= -0.5) & (in_b <= np.asarray(b.shape[:3]) - 0.5), axis=1)
    return float(inside.mean())


def field_of_view_overlap(a: nib.Nifti1Image, b: nib.Nifti1Image) -> float:
    """Shared volume of the two fields of view over the smaller one, in [0, 1]."""
    return max(_fraction_inside(a, b), _fraction_inside(b, a))


def world_bounds(image: nib.Nifti1Image) -> str:
    corners = np.array([[i, j, k] for i in (-0.5, image.shape[0] - 0.5) for j in (-0.5, image.shape[1] - 0.5) for k in (-0.5, image.shape[2] - 0.5)])
    world = nib.affines.apply_affine(image.affine, corners)
    return " ".join(f"{ax} [{lo:.1f}, {hi:.1f}]" for ax, lo, hi in zip("xyz", world.min(0), world.max(0)))


def align_to(
    source: nib.Nifti1Image,
    target: nib.Nifti1Image,
    *,
    order: int = 1,
    min_overlap: float = 0.5,
    tolerance: float = 0.01,
    names: tuple[object, object] = ("source", "target"),
) -> nib.Nifti1Image:
    """``target`` on ``source``'s grid. Voxels outside the target's field of view get its minimum.

    :param order: interpolation order (1 = linear; 0 = nearest, for masks).
    :param min_overlap: the least shared fraction of the smaller field of view accepted.
    :param names: how the two images are named in errors (their paths, usually).
    """
    if same_grid(source, target, tolerance):
        return nib.Nifti1Image(np.asarray(target.dataobj, dtype=np.float32), source.affine, target.header)
    overlap = field_of_view_overlap(source, target)
    if overlap < min_overlap:
        raise VolumeError(
            f"{names[1]}: cannot be aligned with {names[0]}: their fields of view share {overlap:.0%} of the "
            f"smaller one (at least {min_overlap:.0%} needed). In world mm, source: {world_bounds(source)}; "
            f"target: {world_bounds(target)}. Check that both headers (qform/sform) place them in the same space."
        )
    data = np.asarray(target.dataobj, dtype=np.float32)
    moved = resample_from_to(target, (source.shape[:3], source.affine), order=order, mode="constant", cval=float(data.min()))
    return nib.Nifti1Image(np.asarray(moved.dataobj, dtype=np.float32), source.affine, target.header)
