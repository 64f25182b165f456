"""Hostile and broken image files: every one loads, or is refused with one Lift3dError naming the file,
before any voxel is read past the memory budget (issue 21: NIfTI headers, FIFOs, complex and RGB data)."""

from __future__ import annotations

import gzip
import os
import sys
import tempfile
import tracemalloc
import types
import uuid
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lift3d.data.errors import VolumeError
from lift3d.data.nifti import SCALAR_TYPES, list_image_files, load_image, open_nifti
from lift3d.data.volume import TrainingGrid
from lift3d.io.budget import ENV
from lift3d.io.errors import BudgetError, Lift3dError
from lift3d_plugins.datasets._files import check_root, subject_folders, visible_entries
from tests.conftest import fuzz_examples

HEADER = nib.nifti1.header_dtype  # NIfTI-1 field layout: name -> (dtype, byte offset)
BUDGET = 64 * 2**20


def small_image(dtype=np.int16, shape=(4, 5, 6), slope=None, image_class=nib.Nifti1Image) -> bytes:
    """A valid single-file NIfTI-1 (or -2) as bytes."""
    rng = np.random.default_rng(0)
    image = image_class(rng.integers(0, 100, shape).astype(dtype), np.diag([1.5, 1.0, 2.0, 1.0]))
    if slope is not None:
        image.header.set_slope_inter(slope, 3.0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.nii"
        nib.save(image, path)
        return path.read_bytes()


VALID = small_image()
VALID_SCALED = small_image(np.uint8, slope=0.5)
VALID_NIFTI2 = small_image(np.float32, image_class=nib.Nifti2Image)


def with_fields(data: bytes, **fields) -> bytes:
    """``data`` with NIfTI-1 header fields overwritten (little-endian, as nibabel writes here)."""
    block = np.frombuffer(bytearray(data[:348]), dtype=HEADER).copy()
    for name, value in fields.items():
        block[name] = value
    return block.tobytes() + data[348:]


def write(folder: Path, data: bytes, suffix: str = ".nii") -> Path:
    path = folder / f"case-{uuid.uuid4().hex[:8]}{suffix}"
    path.write_bytes(gzip.compress(data, compresslevel=1) if suffix == ".nii.gz" else data)
    return path


@contextmanager
def budget(text: str = "64MiB"):
    with mock.patch.dict(os.environ, {ENV: text}):
        yield


@contextmanager
def peak_allocation():
    """The largest amount traced at once (numpy reports its buffers to tracemalloc) inside the block."""
    peak = [0]
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def load_or_refuse(path: Path):
    """load_image(path): a usable volume, or a Lift3dError naming the file; anything else fails the test."""
    try:
        image = load_image(path)
    except Lift3dError as exc:
        assert path.name in str(exc), exc
        assert "\n" not in str(exc), exc
        event(f"refused: {type(exc).__name__}")
        return exc
    event("loaded")
    data = np.asanyarray(image.dataobj)
    assert data.ndim == 3 and data.dtype == np.float32 and np.isfinite(data).all()
    return image


# -- the header cases named in the issue --------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("fields, message", [
    ({"dim": [3, -4, 5, 6, 1, 1, 1, 1]}, r"dim\[1\] = -4 \(shape \(-4, 5, 6\)\); every dimension must be at least 1"),
    ({"dim": [3, 4, 0, 6, 1, 1, 1, 1]}, r"dim\[2\] = 0"),
    ({"dim": [9, 4, 5, 6, 1, 1, 1, 1]}, r"dim\[0\] \(the number of dimensions\) is 9; valid: 1 to 7"),
    ({"dim": [0, 4, 5, 6, 1, 1, 1, 1]}, r"dim\[0\] \(the number of dimensions\) is 0; valid: 1 to 7"),
    ({"datatype": 999}, r"datatype code 999 is not a scalar type lift3d reads; valid: 2 \(uint8\), 4 \(int16\)"),
    ({"datatype": 32, "bitpix": 64}, r"complex-valued voxels \(complex64, datatype 32\)"),
    ({"datatype": 1792, "bitpix": 128}, r"complex-valued voxels \(complex128"),
    ({"datatype": 128, "bitpix": 24}, r"is an RGB/colour image \(RGB24, datatype 128\), not a scalar volume"),
    ({"datatype": 2304, "bitpix": 32}, r"RGB/colour image \(RGBA32"),
    ({"vox_offset": -100.0}, r"vox_offset is -100; a single-file NIfTI's voxels start at byte 352 or later"),
    ({"vox_offset": np.nan}, r"vox_offset is nan"),
], ids=["negative-dim", "zero-dim", "dim0-9", "dim0-0", "datatype-999", "complex64", "complex128", "rgb", "rgba",
        "vox_offset-negative", "vox_offset-nan"])
def test_bad_headers_are_refused_in_one_line_naming_the_file_and_the_value(tmp_path, capfd, fields, message, suffix):
    path = write(tmp_path, with_fields(VALID, **fields), suffix)
    with pytest.raises(VolumeError, match=message) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ") and isinstance(info.value, Lift3dError)
    assert "truncated or corrupt" not in str(info.value) or "dim" in message
    assert capfd.readouterr().err == ""  # nibabel's own log lines are not printed besides lift3d's one


def test_a_truncated_uncompressed_file_is_refused_from_its_header_before_reading(tmp_path):
    path = write(tmp_path, VALID[:-7])
    message = r"\(4, 5, 6\) int16 voxels from byte 352, 592 bytes in all, but the file has 585; it is truncated"
    with pytest.raises(VolumeError, match=message):
        load_image(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dim, shown", [
    ([3, 32767, 32767, 32767, 1, 1, 1, 1], "32767 x 32767 x 32767 int16 voxels"),
    ([3, 2000, 2000, 1000, 1, 1, 1, 1], "2000 x 2000 x 1000 int16 voxels"),
], ids=["32767-cubed", "2000x2000x1000"])
def test_a_header_implying_more_than_the_budget_is_refused_before_allocation(tmp_path, suffix, dim, shown):
    path = write(tmp_path, with_fields(VALID, dim=dim), suffix)
    with budget("64MiB"), peak_allocation() as peak, pytest.raises(BudgetError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: its header's {shown}") and "more than the 64.0 MiB lift3d may use" in message
    assert peak[0] < 2**20  # nothing near the implied size was allocated


def test_without_a_set_budget_the_memory_available_is_the_limit(tmp_path):
    # 32767^3 int16 voxels need 448 TiB once read: more than any machine has
    path = write(tmp_path, with_fields(VALID, dim=[3, 32767, 32767, 32767, 1, 1, 1, 1]), ".nii.gz")
    with mock.patch.dict(os.environ, {ENV: ""}), pytest.raises(BudgetError, match="the memory available now"):
        load_image(path)


def test_open_nifti_checks_the_header_without_reading_voxels(tmp_path):
    image = open_nifti(write(tmp_path, VALID))
    assert image.shape == (4, 5, 6) and not image.in_memory
    with pytest.raises(VolumeError, match="datatype code 999"):
        open_nifti(write(tmp_path, with_fields(VALID, datatype=999)))


def test_a_fifo_is_called_a_fifo_not_a_folder_and_is_never_opened(tmp_path):
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(VolumeError, match=r"pipe\.nii\.gz: is a FIFO \(named pipe\), not an image file") as info:
        load_image(fifo)
    assert "folder" not in str(info.value)
    with pytest.raises(VolumeError, match=r"is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(VolumeError, match="is not a folder"):
        check_root(fifo, "paired-nifti")


def test_volume_error_is_a_lift3d_error():
    assert issubclass(VolumeError, Lift3dError) and issubclass(VolumeError, ValueError)


def test_a_training_grid_past_the_budget_is_refused():
    with budget("64MiB"), pytest.raises(BudgetError, match=r"a training grid of 100000000 x 16 x 16 float32 voxels"):
        TrainingGrid(size=16, num_slices=100_000_000)
    with budget("64MiB"):
        assert TrainingGrid(size=16, num_slices=8).shape == (8, 16, 16)


def test_folder_readers_skip_hidden_files_and_temporaries(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / ".a.nii.gz.lift3d-tmp-123-abcdef.nii.gz").write_bytes(b"")  # a writer's temporary
    (tmp_path / ".a_synth.nii.gz.4242.0123456789ab.nii.gz").write_bytes(b"")  # an older lift3d's temporary
    (tmp_path / ".sub-hidden").mkdir()
    (tmp_path / "sub-01").mkdir()
    assert [p.name for p in list_image_files(tmp_path)] == ["a.nii.gz"]
    assert [p.name for p in visible_entries(tmp_path)] == ["a.nii.gz", "sub-01"]
    assert [p.name for p in subject_folders(tmp_path)] == ["sub-01"]


# -- MetaImage: the same checks through SimpleITK's header reader ----------------------------------


def fake_simpleitk(pixel: str, size=(4, 5, 6), components=1):
    """Enough of SimpleITK to read a header; ReadImage must never be reached for a refused file."""
    codes = {"sitkInt16": 2, "sitkFloat32": 8, "sitkComplexFloat32": 12, "sitkVectorUInt8": 13}
    names = {2: "16-bit signed integer", 8: "32-bit float", 12: "complex of 32-bit float",
             13: "vector of 8-bit unsigned integer"}

    class Reader:
        def SetFileName(self, name):
            self.name = name

        def ReadImageInformation(self):
            pass

        def GetPixelID(self):
            return codes[pixel]

        def GetNumberOfComponents(self):
            return components

        def GetSize(self):
            return size

    def read_image(name):
        raise AssertionError("voxels read before the header was checked")

    return types.SimpleNamespace(ImageFileReader=Reader, ReadImage=read_image, GetPixelIDValueAsString=names.get,
                                 **codes)


@pytest.mark.parametrize("pixel, size, components, error, message", [
    ("sitkComplexFloat32", (4, 5, 6), 1, VolumeError, r"holds complex-valued voxels \(pixel type 'complex of 32-bit"),
    ("sitkVectorUInt8", (4, 5, 6), 3, VolumeError, r"RGB/colour or vector voxels \(3 components\)"),
    ("sitkInt16", (32767, 32767, 32767), 1, BudgetError, r"its header's 32767 x 32767 x 32767 16-bit signed integer"),
    ("sitkFloat32", (4, 0, 6), 1, VolumeError, r"its header gives the size \(4, 0, 6\)"),
], ids=["complex", "vector", "32767-cubed", "zero-size"])
def test_metaimage_headers_are_checked_before_reading(tmp_path, monkeypatch, pixel, size, components, error, message):
    monkeypatch.setitem(sys.modules, "SimpleITK", fake_simpleitk(pixel, size, components))
    path = tmp_path / "patient_001_mr_T1.mhd"
    path.write_text("ObjectType = Image\n")
    with budget("64MiB"), pytest.raises(error, match=message) as info:
        load_image(path)
    assert str(info.value).startswith(str(path))


# -- fuzz: mutated and random headers --------------------------------------------------------------

INT16 = st.one_of(st.integers(-3, 12), st.sampled_from([-32768, 32767, 1000, 2000]), st.integers(-32768, 32767))
FLOAT32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, 352.0, 1e30, -1e30]))
FIELD_VALUES = {
    "dim": st.one_of(st.lists(INT16, min_size=8, max_size=8),  # anything, or a plausible 3D shape of any size
                     st.tuples(st.integers(1, 32767), st.integers(1, 32767), st.integers(1, 32767)).map(
                         lambda shape: [3, *shape, 1, 1, 1, 1])),
    "datatype": st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 255, 256, 512, 768, 1024, 1280, 1536,
                                           1792, 2048, 2304, 999]), INT16),
    "bitpix": INT16,
    "pixdim": st.lists(FLOAT32, min_size=8, max_size=8),
    "vox_offset": FLOAT32,
    "scl_slope": FLOAT32,
    "scl_inter": FLOAT32,
    "qform_code": INT16,
    "sform_code": INT16,
    "quatern_b": FLOAT32,
    "quatern_c": FLOAT32,
    "quatern_d": FLOAT32,
    "qoffset_x": FLOAT32,
    "srow_x": st.lists(FLOAT32, min_size=4, max_size=4),
    "srow_z": st.lists(FLOAT32, min_size=4, max_size=4),
    "xyzt_units": st.integers(0, 255),
    "dim_info": st.integers(0, 255),
}
mutations = st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.just(None), min_size=1, max_size=4).flatmap(
    lambda chosen: st.fixed_dictionaries({name: FIELD_VALUES[name] for name in chosen}))
FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def implied_bytes(header_bytes: bytes) -> int | None:
    """What a well-formed header's voxels need once read (as stored + scaled + float32), else None."""
    block = np.frombuffer(header_bytes[:348], dtype=HEADER)[0]
    dim = [int(d) for d in block["dim"]]
    if not 1 <= dim[0] <= 7 or any(d < 1 for d in dim[1:dim[0] + 1]) or int(block["datatype"]) not in SCALAR_TYPES:
        return None
    itemsize = np.dtype(SCALAR_TYPES[int(block["datatype"])]).itemsize
    return int(np.prod(dim[1:dim[0] + 1], dtype=object)) * (itemsize + 12)


@settings(FUZZ, max_examples=fuzz_examples(800))
@given(fields=mutations, base=st.sampled_from([VALID, VALID_SCALED]), suffix=st.sampled_from([".nii", ".nii.gz"]))
def test_fuzz_mutated_header_fields_load_or_raise_a_lift3d_error_within_the_budget(tmp_path, fields, base, suffix):
    data = with_fields(base, **fields)
    path = write(tmp_path, data, suffix)
    with budget("64MiB"), peak_allocation() as peak:
        result = load_or_refuse(path)
    need = implied_bytes(data)
    if need is not None and need > BUDGET:
        assert isinstance(result, BudgetError), result  # refused for its size, before anything was read
    assert peak[0] < BUDGET, f"{peak[0]} bytes allocated for {fields}"
    path.unlink()


@settings(FUZZ, max_examples=fuzz_examples(600))
@given(base=st.sampled_from([VALID, VALID_SCALED, VALID_NIFTI2]), suffix=st.sampled_from([".nii", ".nii.gz"]),
       flips=st.lists(st.tuples(st.integers(0, 543), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_random_header_bytes_load_or_raise_a_lift3d_error(tmp_path, base, suffix, flips):
    data = bytearray(base)
    for at, value in flips:
        at %= 352 if base is not VALID_NIFTI2 else 544
        data[at] = value
    path = write(tmp_path, bytes(data), suffix)
    with budget("64MiB"), peak_allocation() as peak:
        load_or_refuse(path)
    assert peak[0] < BUDGET
    path.unlink()


@settings(FUZZ, max_examples=fuzz_examples(400))
@given(base=st.sampled_from([VALID, VALID_SCALED, VALID_NIFTI2]), compressed=st.booleans(), keep=st.floats(0.0, 1.0))
def test_fuzz_truncated_files_are_refused_as_truncated(tmp_path, base, compressed, keep):
    whole = gzip.compress(base) if compressed else base
    cut = whole[: int(len(whole) * keep)]
    path = tmp_path / f"cut-{uuid.uuid4().hex[:8]}{'.nii.gz' if compressed else '.nii'}"
    path.write_bytes(cut)
    result = load_or_refuse(path)
    if len(cut) < len(whole):
        assert isinstance(result, VolumeError), "a truncated file loaded"
    path.unlink()


@settings(FUZZ, max_examples=fuzz_examples(500))
@given(body=st.binary(min_size=0, max_size=700), magic=st.sampled_from([b"", b"n+1\0", b"n+2\0"]),
       suffix=st.sampled_from([".nii", ".nii.gz"]))
def test_fuzz_random_files_with_or_without_a_magic_raise_a_lift3d_error(tmp_path, body, magic, suffix):
    data = bytearray(body.ljust(560, b"\0"))
    if magic == b"n+1\0":
        data[0:4], data[344:348] = (348).to_bytes(4, "little"), magic
    elif magic == b"n+2\0":
        data[0:4], data[4:8] = (540).to_bytes(4, "little"), magic
    path = write(tmp_path, bytes(data[: max(len(body), 560 if magic else 0)]), suffix)
    with budget("64MiB"), peak_allocation() as peak:
        load_or_refuse(path)
    assert peak[0] < BUDGET
    path.unlink()


def test_a_bad_csv_of_pairs_is_one_volume_error_naming_it(tmp_path):
    from lift3d_plugins.datasets.paired_nifti import PairedNiftiDataset

    binary = tmp_path / "pairs.csv"
    binary.write_bytes(b"subject,source,target\n\xff\xfe\x00junk\n")
    with pytest.raises(VolumeError, match=r"pairs\.csv: not a readable CSV of pairs \('utf-8' codec"):
        PairedNiftiDataset(csv=binary)
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(VolumeError, match=r"fifo\.csv: is not a regular file"):
        PairedNiftiDataset(csv=fifo)
