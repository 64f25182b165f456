"""Reading validated 3D images (NIfTI, or MetaImage through SimpleITK) and writing results back.

``load_image`` turns every way an input can be bad into one ``VolumeError`` naming the
file. The header is checked before any voxel is read (``open_nifti``): its dimensions, its
data type (scalar only), where its voxels start, and the memory they need against the budget of
``lift3d.io.budget``, so a corrupt or hostile header is refused in one line, not by the kernel.
``save_volume`` puts a synthesised volume back on its source's original grid and writes it
atomically under a temporary name no reader picks up (``lift3d.io.writing``).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import stat
import struct
import zlib
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, HeaderTypeError

from lift3d.data.errors import VolumeError
from lift3d.data.metaimage import METAIMAGE_SUFFIXES, read_metaimage
from lift3d.data.volume import VolumeMeta, check_voxel_memory, restore_volume
from lift3d.io.writing import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + METAIMAGE_SUFFIXES
DESCRIPTION = b"lift3d synthesis (Make-A-Volume)"

_READ_ERRORS = (OSError, EOFError, ValueError, TypeError, zlib.error, ImageFileError, IndexError, HeaderDataError,
                HeaderTypeError, OverflowError, struct.error)

# NIfTI datatype codes (nifti1.h). Only scalar voxels make a volume lift3d can use.
SCALAR_TYPES = {2: "uint8", 4: "int16", 8: "int32", 16: "float32", 64: "float64", 256: "int8", 512: "uint16",
                768: "uint32", 1024: "int64", 1280: "uint64"}
COMPLEX_TYPES = {32: "complex64", 1792: "complex128", 2048: "complex256"}
COLOUR_TYPES = {128: "RGB24", 2304: "RGBA32"}
# Single-file NIfTI: (magic, where it lies, header size, the class that parses it)
_FORMATS = ((b"n+1\0", 344, 348, nib.Nifti1Header), (b"n+2\0", 4, 540, nib.Nifti2Header))
# Formats whose header names a second file (nibabel would open it beside the header): not read, so no
# side file can lead a read out of the folder. A pair converts to one .nii.gz in one nibabel call.
PAIR_SUFFIXES = (".hdr", ".img", ".hdr.gz", ".img.gz")
_PAIR_MAGIC = ((b"ni1\0", 344), (b"ni2\0", 4))
READABLE = "single-file NIfTI (.nii.gz, .nii) and MetaImage (.mhd + its data file, or .mha)"


def image_suffix(path: Path | str) -> str | None:
    """The recognised suffix of ``path`` (``.nii.gz``, ``.nii``, ``.mhd``, ``.mha``), else None."""
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def list_image_files(folder: Path | str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files in ``folder``, sorted: regular files ending in one of ``suffixes``. Hidden names
    (``.name``) are skipped: they are other programs' files or lift3d's own temporaries, half-written
    by a writer that may have been killed."""
    return sorted(p for p in Path(folder).iterdir()
                  if not p.name.startswith(".") and p.name.lower().endswith(suffixes) and p.is_file())


def check_image_file(path: Path | str) -> Path:
    """``path`` as a Path, if it is an existing regular file with an image suffix; else VolumeError."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise VolumeError(f"{path}: file not found") from None
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise VolumeError(f"{path}: is a folder, not an image file")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise VolumeError(f"{path}: is {kind}, not an image file; give a regular file")
    if image_suffix(path) is None:
        if path.name.lower().endswith(PAIR_SUFFIXES):
            raise VolumeError(pair_message(path))
        raise VolumeError(f"{path}: unknown image type; valid suffixes: {', '.join(IMAGE_SUFFIXES)} (lift3d reads "
                          f"{READABLE})")
    return path


def pair_message(path: Path) -> str:
    """One line refusing a NIfTI or Analyze pair (``.hdr`` + ``.img``): how to convert it, and what lift3d reads."""
    header = path.name[: -len(next(s for s in PAIR_SUFFIXES if path.name.lower().endswith(s)))] + ".hdr"
    return (f"{path}: is half of a NIfTI/Analyze pair (.hdr + .img), whose header sends the reader to a second file; "
            f"lift3d reads {READABLE}: convert the pair first, e.g. nib.save(nib.load('{header}'), "
            f"'{header[:-4]}.nii.gz')")


def _one_line(exc: BaseException) -> str:
    """A library's message on one line (nibabel's short-read message spans two)."""
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs the header problems it repairs to stderr; lift3d reports in one line of its own."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _header_block(path: Path) -> bytes:
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as handle:
            return handle.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise VolumeError(f"{path}: not a readable NIfTI file ({_one_line(exc)}); it is truncated or corrupt") from None


def _parse_header(path: Path, block: bytes) -> nib.Nifti1Header:
    """The header in ``block``, parsed as stored (nothing repaired), or VolumeError."""
    for magic, offset, size, header_class in _FORMATS:
        if block[offset:offset + 4] != magic:
            continue
        if len(block) < size:
            raise VolumeError(f"{path}: its NIfTI header is cut short ({len(block)} of {size} bytes); the file is "
                              "truncated or corrupt")
        endianness = None
        for order in "<>":  # sizeof_hdr says the byte order; failing that, dim[0] does (as nibabel guesses)
            if struct.unpack(order + "i", block[:4])[0] == size:
                endianness = order
                break
        if endianness is None:
            dim_format = "h" if size == 348 else "q"
            dim_at = 40 if size == 348 else 16
            endianness = next((order for order in "<>"
                               if 1 <= struct.unpack_from(order + dim_format, block, dim_at)[0] <= 7), "<")
        return header_class(binaryblock=block[:size], endianness=endianness, check=False)
    if any(block[offset:offset + 4] == magic for magic, offset in _PAIR_MAGIC):
        raise VolumeError(f"{path}: its header is a NIfTI pair's (magic 'ni1' or 'ni2': the voxels are in a separate "
                          f".img file), not a single-file NIfTI; lift3d reads {READABLE}: convert the pair first")
    if len(block) < 348:
        raise VolumeError(f"{path}: has {len(block)} bytes, fewer than a NIfTI header (348); it is truncated or "
                          "corrupt")
    raise VolumeError(f"{path}: not a NIfTI file (no 'n+1' or 'n+2' magic in its header); it is truncated or corrupt "
                      "(or another format)")


def check_nifti_header(path: Path, header: nib.Nifti1Header) -> tuple[tuple[int, ...], np.dtype]:
    """Refuse a header whose dimensions, data type, voxel offset or size cannot make a usable volume;
    return its shape and voxel dtype. Nothing is read or allocated past the header."""
    dim = [int(d) for d in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise VolumeError(f"{path}: its header's dim[0] (the number of dimensions) is {dim[0]}; valid: 1 to 7; "
                          "the file is corrupt")
    shape = tuple(dim[1:dim[0] + 1])
    bad = next((i for i, d in enumerate(shape, start=1) if d < 1), None)
    if bad is not None:
        raise VolumeError(f"{path}: its header gives dim[{bad}] = {shape[bad - 1]} (shape {shape}); every dimension "
                          "must be at least 1; the file is corrupt")
    code = int(header["datatype"])
    if code in COMPLEX_TYPES:
        raise VolumeError(f"{path}: holds complex-valued voxels ({COMPLEX_TYPES[code]}, datatype {code}); lift3d needs "
                          "a real scalar volume: save the magnitude (or the part you mean) as a real image")
    if code in COLOUR_TYPES:
        raise VolumeError(f"{path}: is an RGB/colour image ({COLOUR_TYPES[code]}, datatype {code}), not a scalar "
                          "volume; convert it to one grey-value channel first")
    if code not in SCALAR_TYPES:
        valid = ", ".join(f"{c} ({name})" for c, name in SCALAR_TYPES.items())
        raise VolumeError(f"{path}: its header's datatype code {code} is not a scalar type lift3d reads; "
                          f"valid: {valid}")
    dtype = np.dtype(SCALAR_TYPES[code])
    check_voxel_memory(path, shape, dtype.name, dtype.itemsize)
    offset, first = float(header["vox_offset"]), header.sizeof_hdr + 4
    if not np.isfinite(offset) or offset < first:
        raise VolumeError(f"{path}: its header's vox_offset is {offset:g}; a single-file NIfTI's voxels start at byte "
                          f"{first} or later; the file is corrupt")
    if not path.name.lower().endswith(".gz"):  # the size of a compressed stream is only known by reading it
        need, size = int(offset) + int(np.prod(shape, dtype=object)) * dtype.itemsize, path.stat().st_size
        if need > size:
            raise VolumeError(f"{path}: its header says {shape} {dtype.name} voxels from byte {int(offset)}, "
                              f"{need} bytes in all, but the file has {size}; it is truncated or corrupt")
    return shape, dtype


def open_nifti(path: Path | str) -> nib.Nifti1Image:
    """The NIfTI image at ``path`` with its header checked (``check_nifti_header``) and no voxel read yet."""
    path = check_image_file(path)
    if image_suffix(path) not in NIFTI_SUFFIXES:
        raise VolumeError(f"{path}: not a NIfTI file; valid suffixes: {', '.join(NIFTI_SUFFIXES)}")
    check_nifti_header(path, _parse_header(path, _header_block(path)))
    try:
        with _quiet_nibabel(), np.errstate(all="ignore"):
            image = nib.load(str(path))
            image.affine  # noqa: B018 (computed from the header's pixdim and quaternion: may fail here)
    except _READ_ERRORS as exc:
        raise VolumeError(f"{path}: not a readable NIfTI file ({_one_line(exc)}); it is truncated or corrupt") from None
    return image


def _check_gzip_end(path: Path) -> None:
    """Read a ``.gz`` to its end: its voxels may all be there while the stream's end (its CRC and
    length) is cut off or wrong, and only a full pass tells."""
    with gzip.open(path, "rb") as handle:
        while handle.read(1 << 22):
            pass


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    image = read_metaimage(path) if image_suffix(path) in METAIMAGE_SUFFIXES else open_nifti(path)
    try:
        with _quiet_nibabel(), np.errstate(all="ignore"):  # an overflowing slope gives inf, refused below
            data = np.asanyarray(image.dataobj).astype(np.float32)
            header = nib.Nifti1Header.from_header(image.header)  # a NIfTI-2 field past NIfTI-1's range wraps
        if path.name.lower().endswith(".gz"):
            _check_gzip_end(path)
    except MemoryError:
        raise VolumeError(f"{path}: ran out of memory reading its {image.shape} voxels") from None
    except _READ_ERRORS as exc:
        raise VolumeError(f"{path}: cannot read the voxel data ({_one_line(exc)}); the file is truncated or "
                          "corrupt") from None
    return data, np.asarray(image.affine, dtype=np.float64), header


def load_image(path: Path | str) -> nib.Nifti1Image:
    """Read one 3D image as a float32 ``Nifti1Image``, or raise ``VolumeError`` saying why not.

    Checks: the file exists and is a regular file; its header is sound and its voxels fit the memory
    budget (``open_nifti``, before any voxel is read); it reads in full (a truncated ``.nii.gz``
    fails here, not later); it is 3D (a 4D image whose trailing dimensions are all 1 is squeezed);
    it has at least 2 voxels along every axis; every voxel is finite; its affine is finite and
    invertible.
    """
    path = check_image_file(path)
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
    with np.errstate(all="ignore"):  # a NIfTI file stores it in float32, where it must be finite too
        usable = np.isfinite(affine.astype(np.float32)).all() and abs(np.linalg.det(affine[:3, :3])) >= 1e-12
    if not usable:
        raise VolumeError(f"{path}: its affine (voxel -> world) is not finite and invertible: "
                          f"{np.round(affine, 6).tolist()}")
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
    # A hidden temporary in the same folder, named so that clean_stale_temporaries knows it and no
    # folder reader picks it up; nib.save creates it, so it gets the usual permissions.
    with atomic_path(path, image_suffix(path) or "") as tmp:
        nib.save(image, str(tmp))
    return path
