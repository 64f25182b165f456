"""Reading validated 3D images (NIfTI, or MetaImage through SimpleITK) and writing results back.

:func:`load_image` turns every way an input can be bad into one :class:`VolumeError` naming the
file. :func:`save_volume` puts a synthesised volume back on its source's original grid and writes
it atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import os
import uuid
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from lift3d.data.errors import VolumeError
from lift3d.data.metaimage import METAIMAGE_SUFFIXES, read_metaimage
from lift3d.data.volume import VolumeMeta, restore_volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + METAIMAGE_SUFFIXES
DESCRIPTION = b"lift3d synthesis (Make-A-Volume)"

_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, zlib.error, ImageFileError, IndexError)


def image_suffix(path: Path | str) -> str | None:
    """The recognised suffix of ``path`` (``.nii.gz``, ``.nii``, ``.mhd``, ``.mha``), else None."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    if image_suffix(path) in METAIMAGE_SUFFIXES:
        image = read_metaimage(path)
    else:
        try:
            image = nib.load(str(path))
        except _READ_ERRORS as exc:
            raise VolumeError(f"{path}: not a readable NIfTI file ({exc}); it is truncated or corrupt") from None
    try:
        data = np.asanyarray(image.dataobj).astype(np.float32)
    except _READ_ERRORS as exc:
        raise VolumeError(f"{path}: cannot read the voxel data ({exc}); the file is truncated or corrupt") from None
    header = nib.Nifti1Header.from_header(image.header)
    return data, np.asarray(image.affine, dtype=np.float64), header


def load_image(path: Path | str) -> nib.Nifti1Image:
    """Read one 3D image as a float32 ``Nifti1Image``, or raise :class:`VolumeError` saying why not.

    Checks: the file exists; it reads in full (a truncated ``.nii.gz`` fails here, not later); it is
    3D (a 4D image whose trailing dimensions are all 1 is squeezed); it has at least 2 voxels
    along every axis; every voxel is finite; its affine is finite and invertible.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    if not path.is_file():
        raise VolumeError(f"{path}: is a folder, not an image file")
    if image_suffix(path) is None:
        raise VolumeError(f"{path}: unknown image type; valid suffixes: {', '.join(IMAGE_SUFFIXES)}")
    data, affine, header = _read(path)
    shape = data.shape
    if data.ndim > 3 and all(s == 1 for s in shape[3:]):
        data = data.reshape(shape[:3])
    if data.ndim != 3:
        extra = f" with {int(np.prod(shape[3:]))} volumes" if data.ndim > 3 else ""
        raise VolumeError(f"{path}: is a {data.ndim}D image{extra} (shape {shape}); a 3D volume is expected")
    if min(data.shape) < 2:
        raise VolumeError(f"{path}: has a single voxel along an axis (shape {shape}); a 3D volume is expected, not a 2D slice")
    finite = np.isfinite(data)
    if not finite.all():
        nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        raise VolumeError(f"{path}: has non-finite voxels ({nan} NaN, {inf} inf of {data.size}); fix or mask the image first")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: its affine (voxel -> world) is not finite and invertible:\n{affine}")
    return nib.Nifti1Image(data, affine, header)


def _output_header(meta: VolumeMeta) -> nib.Nifti1Header:
    header = meta.header.copy() if meta.header is not None else nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0
    header.set_intent("none")
    header["descrip"] = DESCRIPTION
    if meta.header is None:
        header.set_xyzt_units("mm")
    return header


def _codes(meta: VolumeMeta) -> tuple[int, int]:
    """The source's qform/sform codes, or 'scanner' (1) where the source had none."""
    if meta.header is None:
        return 1, 1
    qform = int(meta.header["qform_code"]) or 1
    sform = int(meta.header["sform_code"]) or 1
    return qform, sform


def save_volume(path: Path | str, volume, meta: VolumeMeta) -> Path:
    """Write ``volume`` (tensor or array in [-1, 1], ``(n, h, w)`` or ``(1, n, h, w)``) as NIfTI.

    The volume is put back on the source's original grid: the training-grid resampling, the
    slice-axis permutation, the canonical reorientation and the intensity scaling are all undone.
    The header is the source's, with qform and sform set to the source affine, float32 data and
    a ``descrip`` naming lift3d. ``path`` must end in ``.nii.gz`` or ``.nii``; the write is atomic.
    """
    path = Path(path)
    if image_suffix(path) not in NIFTI_SUFFIXES:
        raise ValueError(f"{path}: output must be NIfTI; valid suffixes: {', '.join(NIFTI_SUFFIXES)}")
    if not isinstance(meta, VolumeMeta):
        raise TypeError(f"save_volume needs the VolumeMeta of the source volume, got {type(meta).__name__}")
    data = restore_volume(volume, meta)
    image = nib.Nifti1Image(data, meta.affine, _output_header(meta))
    qform_code, sform_code = _codes(meta)
    image.set_qform(meta.affine, code=qform_code)
    image.set_sform(meta.affine, code=sform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden name in the same folder (so os.replace is atomic), created by nib.save itself
    # so it gets the usual permissions rather than mkstemp's 0600.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{image_suffix(path)}"
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
