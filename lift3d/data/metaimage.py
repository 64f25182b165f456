"""Reading MetaImage (``.mhd`` + ``.raw``, ``.mha``) through SimpleITK, the optional extra ``rire``.

ITK's physical space is LPS; the image is returned as a NIfTI image with a RAS affine, so the rest
of lift3d never sees the difference. As for NIfTI, the header is checked (a scalar pixel type, a size
that fits the memory budget) before any voxel is read.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from lift3d.data.errors import VolumeError
from lift3d.data.volume import check_voxel_memory

METAIMAGE_SUFFIXES = (".mhd", ".mha")
INSTALL_HINT = "pip install lift3d[rire]"
# SimpleITK's scalar pixel types and their bytes; anything else (complex, vector, label) is refused.
_SCALAR_PIXELS = {"sitkUInt8": 1, "sitkInt8": 1, "sitkUInt16": 2, "sitkInt16": 2, "sitkUInt32": 4, "sitkInt32": 4,
                  "sitkUInt64": 8, "sitkInt64": 8, "sitkFloat32": 4, "sitkFloat64": 8}


def simpleitk_available() -> bool:
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


def require_simpleitk(path: Path | str):
    try:
        import SimpleITK
    except ImportError:
        raise VolumeError(
            f"{path}: reading MetaImage files needs SimpleITK, which is not installed; install it with "
            f"`{INSTALL_HINT}`, or convert the image to NIfTI (.nii.gz)"
        ) from None
    return SimpleITK


def read_metaimage(path: Path | str) -> nib.Nifti1Image:
    """A MetaImage file as a ``Nifti1Image`` (data ``(x, y, z, ...)``, RAS affine). Not validated."""
    sitk = require_simpleitk(path)
    try:
        check_metaimage_header(sitk, path)
        image = sitk.ReadImage(str(path))
        data = sitk.GetArrayFromImage(image)  # ITK order reversed: (z, y, x[, components])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise VolumeError(f"{path}: cannot read MetaImage ({first}); the header or its .raw file is missing, truncated or corrupt") from None
    dim = image.GetDimension()
    data = np.moveaxis(data, list(range(dim)), list(range(dim))[::-1])
    affine = np.eye(4)
    if dim == 3:
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        lps_to_ras = np.diag([-1.0, -1.0, 1.0])
        affine[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
        affine[:3, 3] = lps_to_ras @ np.asarray(image.GetOrigin(), dtype=float)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    return nib.Nifti1Image(data, affine, header)


def check_metaimage_header(sitk, path: Path | str) -> None:
    """Refuse a MetaImage whose header gives a non-scalar pixel type or more voxels than the memory
    budget allows, reading the header only. SimpleITK's read errors are left to the caller."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    pixel, components = reader.GetPixelID(), int(reader.GetNumberOfComponents())
    scalar = {getattr(sitk, name): nbytes for name, nbytes in _SCALAR_PIXELS.items() if hasattr(sitk, name)}
    if pixel not in scalar or components != 1:
        kind = str(sitk.GetPixelIDValueAsString(pixel))
        what = ("complex-valued voxels" if "complex" in kind.lower() else
                f"RGB/colour or vector voxels ({components} components)" if components != 1 or "vector" in kind.lower()
                else "voxels that are not scalar numbers")
        raise VolumeError(f"{path}: holds {what} (pixel type {kind!r}), not a scalar volume; lift3d needs one real "
                          "grey value per voxel")
    size = tuple(int(s) for s in reader.GetSize())
    if any(s < 1 for s in size):
        raise VolumeError(f"{path}: its header gives the size {size}; every dimension must be at least 1")
    check_voxel_memory(path, size, str(sitk.GetPixelIDValueAsString(pixel)), 2 * scalar[pixel])  # ITK's and numpy's
