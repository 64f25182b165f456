"""Reading MetaImage (``.mhd`` + ``.raw``, ``.mha``) through SimpleITK, the optional extra ``rire``.

ITK's physical space is LPS; the image is returned as a NIfTI image with a RAS affine, so the rest
of lift3d never sees the difference. As for NIfTI, the header is checked (a scalar pixel type, a size
that fits the memory budget) before any voxel is read.

A MetaImage header names the file its voxels are in (``ElementDataFile``). That name is held to the
rule of lift3d's own JSON paths (``lift3d.io.paths.inside``): one file beside the header, never an
absolute path, ``..`` or a link out of the header's folder; lists and numbered file patterns are refused.
The file is then read by ITK's MetaImage reader only, whatever its content claims to be.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from lift3d.data.errors import VolumeError
from lift3d.data.volume import check_voxel_memory
from lift3d.io.errors import UnsafePathError
from lift3d.io.paths import inside

METAIMAGE_SUFFIXES = (".mhd", ".mha")
INSTALL_HINT = "pip install lift3d[rire]"
DATA_FILE_KEY = "ElementDataFile"
_HEADER_LIMIT = 1 << 20  # bytes of text before the voxels; a real MetaImage header is a few hundred
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


def _data_file(path: Path, value: str) -> Path | None:
    """The file one ``ElementDataFile`` value names (None for ``LOCAL``: the voxels follow the header)."""
    what = f"{path}: its {DATA_FILE_KEY}"
    if value == "LOCAL":  # as ITK spells it; "local" would be a file of that name
        return None
    if not value or value.split()[0].upper() == "LIST" or len(value.split()) > 1 or "%" in value:
        raise VolumeError(f"{what} is {value!r}; lift3d reads a MetaImage whose {DATA_FILE_KEY} is LOCAL or one file "
                          "name beside the header (not a list or a numbered pattern of files)")
    try:
        data = inside(path.parent, value, what)
    except UnsafePathError as exc:
        raise VolumeError(str(exc)) from None
    if data.exists() and not data.is_file():
        raise VolumeError(f"{what} is {value!r}, which is not a regular file; the voxels must be in a file beside "
                          "the header")
    return data


def check_data_files(path: Path | str) -> list[Path]:
    """The files a MetaImage header at ``path`` names for its voxels, each checked by ``_data_file``.

    Every line whose key is ``ElementDataFile`` in any case or spacing is checked, up to the one that
    ends the header for ITK (``ElementDataFile = LOCAL`` at the start of a line: binary voxels follow).
    A header with no such line is left to ITK, which reads no voxels from it."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            text = handle.read(_HEADER_LIMIT + 1)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    files, ended = [], False
    for line in text[:_HEADER_LIMIT].decode("latin-1").splitlines():
        key, equals, value = line.partition("=")
        if not equals or key.strip().lower() != DATA_FILE_KEY.lower():
            continue
        data = _data_file(path, value.strip())
        if data is not None:
            files.append(data)
        elif key.rstrip() == DATA_FILE_KEY:  # ITK's reader stops here: what follows is voxels
            ended = True
            break
    if len(text) > _HEADER_LIMIT and not ended:
        raise VolumeError(f"{path}: its MetaImage header runs past {_HEADER_LIMIT} bytes without "
                          f"'{DATA_FILE_KEY} = LOCAL'; a MetaImage header is a few lines of text")
    return files


def read_metaimage(path: Path | str) -> nib.Nifti1Image:
    """A MetaImage file as a ``Nifti1Image`` (data ``(x, y, z, ...)``, RAS affine). Not validated."""
    check_data_files(path)  # before any library opens a file the header names
    sitk = require_simpleitk(path)
    try:
        reader = check_metaimage_header(sitk, path)
        image = reader.Execute()
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


def check_metaimage_header(sitk, path: Path | str):
    """Refuse a MetaImage whose header gives a non-scalar pixel type or more voxels than the memory
    budget allows, reading the header only; return the reader, set to read the voxels with ITK's
    MetaImage reader only (not another one picked by the content). SimpleITK's read errors are left
    to the caller."""
    reader = sitk.ImageFileReader()
    if hasattr(reader, "SetImageIO"):  # SimpleITK >= 2.0 (a stand-in in tests may lack it)
        reader.SetImageIO("MetaImageIO")
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
    return reader
