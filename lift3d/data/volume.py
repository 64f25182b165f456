"""From a 3D image to the training grid and back: ``TrainingGrid``, ``VolumeMeta``.

``prepare_volume`` runs canonicalise -> slice axis first -> normalise -> resample, giving an
``(n, h, w)`` float32 array in [-1, 1]; ``restore_volume`` runs the exact inverse chain using the
``VolumeMeta`` recorded on the way in. The paper resizes every volume to one grid
(256 x 256 x 100 for SWI -> MRA, 256 x 256 x 35 for RIRE T1 -> T2; Make-A-Volume, Sec. 3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lift3d.data.errors import VolumeError
from lift3d.io.budget import check_count
from lift3d.data.intensity import IntensityScaling, check_percentiles
from lift3d.data.orientation import check_slice_axis, from_slices, orientation_codes, to_slice_order, to_slices
from lift3d.data.resample import check_in_plane_size, resize_volume


# Bytes per voxel a reader holds at its peak besides the stored values: the scaled values (float64
# at most, when the header has a slope) and the float32 copy that is kept.
READ_WORKING_BYTES = 8 + 4
# Float32 volumes on a training grid any user of it holds at once: a prepared source and target,
# and the resampling's output. Synthesis needs more, and checks for itself.
GRID_COPIES = 3


def check_voxel_memory(path: Path | str, shape: tuple[int, ...], dtype: str, itemsize: int) -> None:
    """Refuse, before anything is read, an image whose header's ``shape`` of ``dtype`` voxels would
    not fit the memory budget once read and converted to float32 (``lift3d.io.budget``)."""
    check_count(math.prod(int(s) for s in shape), int(itemsize) + READ_WORKING_BYTES,
                f"{path}: its header's {' x '.join(str(int(s)) for s in shape)} {dtype} voxels "
                "(as stored, then as float32)")


@dataclass(frozen=True)
class TrainingGrid:
    """The grid every volume is resampled to: ``num_slices`` slices of ``size`` (int or ``(h, w)``).

    ``multiple`` is what the in-plane size must divide by (autoencoder factor x U-Net
    downsampling); ``percentiles`` are the intensity clipping points mapped to -1 and +1.
    """

    size: int | tuple[int, int] = 256
    num_slices: int = 100
    slice_axis: str = "axial"
    multiple: int = 8
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", check_in_plane_size(self.size, self.multiple))
        n = self.num_slices
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"num_slices must be a positive integer, got {n!r}")
        check_slice_axis(self.slice_axis)
        object.__setattr__(self, "percentiles", check_percentiles(self.percentiles))
        n, h, w = self.shape
        check_count(n * h * w, 4, f"a training grid of {n} x {h} x {w} float32 voxels ({GRID_COPIES} volumes on it)",
                    copies=GRID_COPIES)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n, h, w)``."""
        return (int(self.num_slices), *self.size)  # type: ignore[return-value]


@dataclass
class VolumeMeta:
    """What ``lift3d.data.nifti.save_volume`` needs to put a volume back where it came from.

    :param path: the source file (None for generated data).
    :param affine: the original voxel -> world (RAS mm) affine, 4 x 4.
    :param shape: the original 3D shape, in the file's own axis order.
    :param orientation: the file's axis codes, e.g. ``('L', 'P', 'S')``; canonical is RAS.
    :param slice_axis: ``'axial'``, ``'coronal'`` or ``'sagittal'``.
    :param slice_shape: ``(n, h, w)`` after reorientation, before resampling.
    :param grid_shape: ``(n, h, w)`` of the training grid.
    :param intensity: the clipping and [-1, 1] map.
    :param header: the source's NIfTI header (None for generated data).
    """

    path: Path | None
    affine: np.ndarray
    shape: tuple[int, int, int]
    orientation: tuple[str, str, str]
    slice_axis: str
    slice_shape: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    intensity: IntensityScaling
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(slice, row, column)`` of the training grid in mm (for true figure aspect)."""
        voxel = to_slice_order(self.voxel_size, self.orientation, self.slice_axis)  # the file's voxel
        return tuple(float(v * s / g) for v, s, g in zip(voxel, self.slice_shape, self.grid_shape))  # type: ignore[return-value]


def prepare_volume(
    image: nib.Nifti1Image, grid: TrainingGrid, *, path: Path | str | None = None, order: int = 1, normalise: bool = True
) -> tuple[np.ndarray, VolumeMeta]:
    """A validated 3D image -> ``(n, h, w)`` float32 on ``grid`` (in [-1, 1] if ``normalise``), and its meta.

    ``order`` is the interpolation order (1 = linear; 0 = nearest, for label maps and masks).
    """
    slices = to_slices(image, grid.slice_axis)
    if normalise:
        intensity = IntensityScaling.fit(slices, grid.percentiles, source=path or "volume")
        slices = intensity.normalise(slices)
    else:
        intensity = IntensityScaling(-1.0, 1.0)
    out = resize_volume(slices, grid.shape, order=order)
    if normalise:
        np.clip(out, -1.0, 1.0, out=out)
    meta = VolumeMeta(
        path=Path(path) if path is not None else None,
        affine=np.array(image.affine, dtype=np.float64),
        shape=tuple(int(s) for s in image.shape[:3]),  # type: ignore[arg-type]
        orientation=orientation_codes(image.affine),
        slice_axis=grid.slice_axis,
        slice_shape=tuple(int(s) for s in slices.shape),  # type: ignore[arg-type]
        grid_shape=grid.shape,
        intensity=intensity,
        header=image.header.copy() if isinstance(image.header, nib.Nifti1Header) else None,
    )
    return out, meta


def restore_volume(volume: Any, meta: VolumeMeta) -> np.ndarray:
    """Undo ``prepare_volume``: ``(n, h, w)`` or ``(1, n, h, w)`` in [-1, 1] -> float32 in ``meta.shape``.

    Values are clipped to [-1, 1] first (what normalisation produced); the clipping done by the
    percentile normalisation itself cannot be undone.
    """
    array = volume.detach().cpu().float().numpy() if hasattr(volume, "detach") else np.asarray(volume, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.shape != tuple(meta.grid_shape):
        raise ValueError(
            f"volume has shape {tuple(array.shape)}; expected the training grid {tuple(meta.grid_shape)} "
            f"as (n, h, w) or (1, n, h, w)"
        )
    if not np.isfinite(array).all():
        raise VolumeError(f"volume to restore onto {meta.path or 'its source grid'} has NaN or inf values")
    array = np.clip(array, -1.0, 1.0)
    slices = resize_volume(array, meta.slice_shape, order=1)
    data = from_slices(meta.intensity.denormalise(slices), meta.orientation, meta.slice_axis)
    if data.shape != tuple(meta.shape):  # a meta whose fields disagree with each other
        raise ValueError(f"restored shape {data.shape} does not match the source shape {meta.shape}; the meta is inconsistent")
    return data


def std_scale(std: Any, meta: VolumeMeta) -> tuple[np.ndarray, VolumeMeta]:
    """A std map ``(n, h, w)`` on the [-1, 1] scale of a synthesis, and the meta that puts it back on the source's
    grid in the source's units: a standard deviation is a scale, not an intensity, so the intensity map's slope
    ``(high - low) / 2`` applies and its offset does not. Resampling back is linear, which keeps it non-negative.
    """
    half_range = (meta.intensity.high - meta.intensity.low) / 2.0
    # The inverse map is v -> (v + 1) * (high' - low') / 2 + low'; with low' = -2 half_range and high' =
    # 2 half_range that is v * 2 half_range, so std / 2 comes out as std * half_range. Halving keeps a
    # Bessel-corrected std (up to sqrt(2) for values in [-1, 1]) clear of the [-1, 1] clip of the inverse.
    scale_only = IntensityScaling(-2.0 * half_range, 2.0 * half_range, meta.intensity.percentiles)
    array = std.detach().cpu().float().numpy() if hasattr(std, "detach") else np.asarray(std, dtype=np.float32)
    return array / 2.0, dataclasses.replace(meta, intensity=scale_only)


def restore_std(std: Any, meta: VolumeMeta) -> np.ndarray:
    """A std map on the [-1, 1] scale of a synthesis -> float32 on the source's grid, in its units (:func:`std_scale`)."""
    return restore_volume(*std_scale(std, meta))
