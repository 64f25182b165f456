"""Tests for lift3d/data: reading and validating images, canonical slices, resampling,
intensity scaling, and save_volume putting a volume back on its source grid."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lift3d.data.errors import VolumeError
from lift3d.data.intensity import IntensityScaling
from lift3d.data.nifti import load_image, save_volume
from lift3d.data.orientation import SLICE_AXES, check_slice_axis, from_slices, to_slices
from lift3d.data.resample import check_in_plane_size, resize_volume
from lift3d.data.volume import TrainingGrid, VolumeMeta, prepare_volume, restore_volume

# A non-RAS (P, S, L), anisotropic (0.9 x 1.2 x 2.5 mm), translated voxel -> world map.
PSL_AFFINE = np.array([[0.0, 0.0, -2.5, 50.0], [-0.9, 0.0, 0.0, 30.0], [0.0, 1.2, 0.0, -20.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (20, 24, 12)


def world_coordinates(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return nib.affines.apply_affine(affine, ijk)


def ramp_image(shape=SHAPE, affine=PSL_AFFINE) -> nib.Nifti1Image:
    """Voxel value = 1 * R + 10 * A + 100 * S (world mm): reveals every axis and its direction."""
    xyz = world_coordinates(shape, affine)
    return nib.Nifti1Image((xyz @ np.array([1.0, 10.0, 100.0]) + 5000).astype(np.float32), affine)


def write(image: nib.Nifti1Image, path: Path) -> Path:
    nib.save(image, str(path))
    return path


# -- load_image: every bad input is one VolumeError naming the file --------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(VolumeError, match=r"nope\.nii\.gz: file not found"):
        load_image(path)


def test_truncated_gzip(tmp_path):
    path = write(ramp_image(), tmp_path / "full.nii.gz")
    data = path.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"cut\.nii\.gz: .*truncated or corrupt"):
        load_image(tmp_path / "cut.nii.gz")


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 3))
    with pytest.raises(VolumeError, match=r"junk\.nii\.gz: .*truncated or corrupt"):
        load_image(path)


def test_2d_image(tmp_path):
    path = write(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeError, match=r"flat\.nii\.gz: is a 2D image .*3D volume is expected"):
        load_image(path)


def test_single_slice_3d_image(tmp_path):
    path = write(nib.Nifti1Image(np.ones((8, 8, 1), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(VolumeError, match=r"slice\.nii\.gz: .*not a 2D slice"):
        load_image(path)


def test_4d_image(tmp_path):
    path = write(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), tmp_path / "bold.nii.gz")
    with pytest.raises(VolumeError, match=r"bold\.nii\.gz: is a 4D image with 3 volumes"):
        load_image(path)


def test_4d_with_trailing_singleton_is_squeezed(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    image = load_image(write(nib.Nifti1Image(data, PSL_AFFINE), tmp_path / "one.nii.gz"))
    assert image.shape == (4, 5, 6)
    np.testing.assert_array_equal(image.get_fdata(), data[..., 0])
    np.testing.assert_allclose(image.affine, PSL_AFFINE, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad):
    data = np.ones((6, 6, 6), np.float32)
    data[1, 2, 3] = bad
    path = write(nib.Nifti1Image(data, np.eye(4)), tmp_path / "holes.nii.gz")
    with pytest.raises(VolumeError, match=r"holes\.nii\.gz: has non-finite voxels"):
        load_image(path)


def test_unknown_suffix_lists_valid_ones(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"x")
    with pytest.raises(VolumeError, match=r"scan\.png: unknown image type; valid suffixes: \.nii\.gz, \.nii, \.mhd"):
        load_image(path)


def test_metaimage_without_simpleitk_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "SimpleITK", None)  # import now fails
    path = tmp_path / "patient_001_mr_T1.mhd"
    path.write_text("ObjectType = Image\n")
    with pytest.raises(VolumeError, match=r"patient_001_mr_T1\.mhd: .*SimpleITK.*pip install lift3d\[rire\]"):
        load_image(path)


# -- canonical orientation and slice axis ----------------------------------------------------------


@pytest.mark.parametrize("slice_axis", sorted(SLICE_AXES))
def test_slices_are_canonical_with_the_chosen_axis_first(slice_axis):
    image = ramp_image()
    slices = to_slices(image, slice_axis)
    weights = {0: 1.0, 1: 10.0, 2: 100.0}  # R, A, S
    ras_axes = SLICE_AXES[slice_axis]
    # Along each array axis the value grows by +weight * voxel size: RAS+ direction, right axis.
    spacing = {0: 2.5, 1: 0.9, 2: 1.2}  # mm along R (file axis 2), A (axis 0), S (axis 1)
    for axis, ras in enumerate(ras_axes):
        step = np.diff(slices, axis=axis)
        np.testing.assert_allclose(step, weights[ras] * spacing[ras], rtol=1e-4)
    counts = {0: 12, 1: 20, 2: 24}  # voxels along R, A, S
    assert slices.shape == tuple(counts[a] for a in ras_axes)
    np.testing.assert_array_equal(from_slices(slices, ("P", "S", "L"), slice_axis), image.get_fdata())


def test_axial_is_the_default_and_uses_the_last_ras_axis():
    assert to_slices(ramp_image()).shape[0] == 24  # S has 24 voxels
    assert SLICE_AXES["axial"][0] == 2


def test_unknown_slice_axis_lists_valid_ones():
    with pytest.raises(ValueError, match="Unknown slice axis 'transverse'; valid: axial, coronal, sagittal"):
        check_slice_axis("transverse")
    with pytest.raises(ValueError, match="valid: axial, coronal, sagittal"):
        TrainingGrid(size=16, num_slices=4, slice_axis="z")


# -- resampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 16, 16), (30, 40, 8), (24, 20, 12)])
def test_resize_gives_the_requested_shape(shape):
    volume = np.random.default_rng(0).random((24, 20, 12)).astype(np.float32)
    out = resize_volume(volume, shape)
    assert out.shape == shape and out.dtype == np.float32


def test_resize_keeps_a_linear_ramp_and_its_centre():
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 4, 4))
    up = resize_volume(ramp, (80, 4, 4))
    # Voxel centres map onto voxel centres: the mean is unchanged, interior slopes halve.
    assert up.mean() == pytest.approx(ramp.mean(), abs=1e-3)
    np.testing.assert_allclose(np.diff(up[2:-2, 0, 0]), 0.5, atol=1e-4)


def test_identity_resize_is_exact():
    volume = np.random.default_rng(1).random((5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(resize_volume(volume, (5, 6, 7)), volume)


def test_in_plane_size_must_divide_by_multiple_and_names_the_nearest():
    assert check_in_plane_size(256, 64) == (256, 256)
    assert check_in_plane_size((64, 32), 16) == (64, 32)
    with pytest.raises(ValueError, match=r"in-plane size 250 is not a positive multiple of 8.*nearest valid sizes: 248 or 256"):
        check_in_plane_size(250, 8)
    with pytest.raises(ValueError, match=r"size 5 .*nearest valid sizes: 8$"):
        check_in_plane_size((16, 5), 8)
    with pytest.raises(ValueError, match="int or a pair"):
        check_in_plane_size(12.5, 8)


def test_training_grid_validates_num_slices():
    with pytest.raises(ValueError, match="num_slices must be a positive integer, got 0"):
        TrainingGrid(size=16, num_slices=0)


# -- intensity --------------------------------------------------------------------------------------


def test_normalisation_maps_percentiles_to_unit_range_and_inverts():
    data = np.random.default_rng(2).normal(100, 20, (10, 10, 10)).astype(np.float32)
    scaling = IntensityScaling.fit(data, (1, 99))
    normal = scaling.normalise(data)
    assert normal.min() == -1.0 and normal.max() == 1.0
    inside = (data >= scaling.low) & (data <= scaling.high)
    np.testing.assert_allclose(scaling.denormalise(normal)[inside], data[inside], rtol=1e-5)
    assert np.all(scaling.denormalise(normal)[~inside] <= scaling.high + 1e-3)


def test_blank_volume_cannot_be_normalised():
    with pytest.raises(VolumeError, match="blank.nii.gz: .*constant"):
        IntensityScaling.fit(np.zeros((4, 4, 4)), source="blank.nii.gz")


def test_bad_percentiles():
    with pytest.raises(ValueError, match="0 <= low < high <= 100"):
        TrainingGrid(size=16, num_slices=4, percentiles=(99, 1))


# -- save_volume ------------------------------------------------------------------------------------


def test_save_volume_round_trip_on_a_non_ras_anisotropic_grid(tmp_path):
    source = write(ramp_image(), tmp_path / "psl.nii.gz")
    grid = TrainingGrid(size=(24, 16), num_slices=16, multiple=8, percentiles=(0, 100))
    array, meta = prepare_volume(load_image(source), grid, path=source)
    assert array.shape == (16, 24, 16) and meta.orientation == ("P", "S", "L")
    out = save_volume(tmp_path / "out" / "synth.nii.gz", torch.from_numpy(array[None]), meta)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["synth.nii.gz"]  # no temporary file left
    written = nib.load(out)
    assert written.shape == SHAPE
    np.testing.assert_allclose(written.affine, PSL_AFFINE, atol=1e-5)
    np.testing.assert_allclose(written.header.get_qform(), PSL_AFFINE, atol=1e-5)
    np.testing.assert_allclose(written.header.get_sform(), PSL_AFFINE, atol=1e-5)
    assert written.header.get_data_dtype() == np.float32
    assert b"lift3d" in written.header["descrip"].tobytes()
    original = ramp_image().get_fdata()
    # Linear interpolation of a ramp is exact away from the edges; edges are clamped.
    interior = (slice(2, -2), slice(2, -2), slice(1, -1))
    np.testing.assert_allclose(written.get_fdata()[interior], original[interior], rtol=2e-3)


def test_save_volume_is_exact_when_no_resampling_is_needed(tmp_path):
    image = ramp_image()
    n, h, w = to_slices(image).shape
    array, meta = prepare_volume(image, TrainingGrid(size=(h, w), num_slices=n, multiple=4, percentiles=(0, 100)))
    written = nib.load(save_volume(tmp_path / "same.nii", array, meta))
    np.testing.assert_allclose(written.get_fdata(), image.get_fdata(), rtol=1e-6)


def test_save_volume_writes_atomically(tmp_path, monkeypatch):
    array, meta = prepare_volume(ramp_image(), TrainingGrid(size=8, num_slices=4))

    def broken_save(image, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_volume(tmp_path / "result.nii.gz", array, meta)
    assert list(tmp_path.iterdir()) == []


def test_save_volume_rejects_wrong_shape_and_suffix(tmp_path):
    array, meta = prepare_volume(ramp_image(), TrainingGrid(size=8, num_slices=4))
    with pytest.raises(ValueError, match=r"shape \(4, 16, 8\); expected the training grid \(4, 8, 8\)"):
        save_volume(tmp_path / "a.nii.gz", np.zeros((4, 16, 8)), meta)
    with pytest.raises(ValueError, match=r"a\.png: output must be NIfTI; valid suffixes: \.nii\.gz, \.nii"):
        save_volume(tmp_path / "a.png", array, meta)
    assert not any(tmp_path.iterdir())


def test_restore_volume_accepts_channel_first_tensors():
    array, meta = prepare_volume(ramp_image(), TrainingGrid(size=8, num_slices=4))
    assert isinstance(meta, VolumeMeta)
    a = restore_volume(array, meta)
    b = restore_volume(torch.from_numpy(array)[None], meta)
    np.testing.assert_array_equal(a, b)
    assert a.shape == SHAPE


def test_grid_spacing_is_the_training_voxel_in_slice_row_column_order():
    """A 1 x 2 x 3 mm RAS image (x 20, y 10, z 6) sliced axially onto a 4-slice, 8 x 8 grid: slices are z
    (6 x 3 mm over 4 slices), rows y (10 x 2 mm over 8), columns x (20 x 1 mm over 8)."""
    image = nib.Nifti1Image(np.random.default_rng(0).random((20, 10, 6)).astype(np.float32), np.diag([1.0, 2.0, 3.0, 1.0]))
    _, meta = prepare_volume(image, TrainingGrid(size=8, num_slices=4, slice_axis="axial"))
    assert meta.grid_spacing == pytest.approx((4.5, 2.5, 2.5))
    _, coronal = prepare_volume(image, TrainingGrid(size=8, num_slices=5, slice_axis="coronal"))
    assert coronal.grid_spacing == pytest.approx((4.0, 18 / 8, 2.5))  # slices y, rows z, columns x
    # The same volume stored with its axes permuted (file axes S, R, A): the same grid spacing.
    permuted = nib.Nifti1Image(np.transpose(np.asarray(image.dataobj), (2, 0, 1)).copy(),
                               np.array([[0, 1.0, 0, 0], [0, 0, 2.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]]))
    _, meta_p = prepare_volume(permuted, TrainingGrid(size=8, num_slices=4, slice_axis="axial"))
    assert meta_p.orientation == ("S", "R", "A") and meta_p.grid_spacing == pytest.approx((4.5, 2.5, 2.5))
