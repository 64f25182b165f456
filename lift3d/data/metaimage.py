"""Reading MetaImage (``.mhd`` + ``.raw``, ``.mha``) through SimpleITK, the optional extra ``rire``.

ITK's physical space is LPS; the image is returned as a NIfTI image with a RAS affine, so the rest
of lift3d never sees the difference.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from lift3d.data.errors import VolumeError

METAIMAGE_SUFFIXES = (".mhd", ".mha")
INSTALL_HINT = "pip install lift3d[rire]"


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
