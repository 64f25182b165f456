"""Real-data integration tests: the ICBM 152 2009c template through paired-nifti and back, and the icbm152 plugin's data.

The data live next to the checkout (``shared/data/icbm152-2009c``, see its README.md) or where
``LIFT3D_ICBM_DIR`` points; without them the test is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lift3d.data.nifti import save_volume
from lift3d.plugins import PluginManager

FILES = ("2mm_T1.nii.gz", "2mm_T2.nii.gz", "2mm_brainmask.nii.gz")


def icbm_dir() -> Path:
    folder = Path(os.environ.get("LIFT3D_ICBM_DIR") or Path(__file__).parents[2] / "shared/data/icbm152-2009c")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"ICBM 152 2009c data not found ({', '.join(missing)} missing in {folder}); set LIFT3D_ICBM_DIR")
    return folder


@pytest.fixture(scope="module")
def icbm() -> Path:
    return icbm_dir()


def reoriented(image: nib.Nifti1Image, orientation: str) -> nib.Nifti1Image:
    """The same image stored with axis codes ``orientation`` (flips and swaps, no interpolation)."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(orientation))
    return image.as_reoriented(ornt)


def lay_out(icbm: Path, root: Path, orientation: str) -> Path:
    """``root/icbm/T1.nii.gz`` and ``T2.nii.gz``: symlinks to the RAS files, or rewrites in another orientation."""
    (root / "icbm").mkdir(parents=True)
    for name, file in (("T1", FILES[0]), ("T2", FILES[1])):
        if orientation == "RAS":
            (root / "icbm" / f"{name}.nii.gz").symlink_to(icbm / file)
        else:
            nib.save(reoriented(nib.load(icbm / file), orientation), root / "icbm" / f"{name}.nii.gz")
    return root


@pytest.mark.parametrize("orientation", ["RAS", "LPI"])
def test_icbm_round_trip_through_paired_nifti(icbm, tmp_path, orientation):
    root = lay_out(icbm, tmp_path, orientation)
    dataset = PluginManager(autoload=False).datasets.create(
        "paired-nifti", root=root, source="T1", target="T2", split="all", size=64, num_slices=64,
    )
    assert dataset.subjects() == ["icbm"]
    pair = dataset[0]
    assert pair.source.shape == pair.target.shape == (1, 64, 64, 64)
    assert pair.meta.orientation == tuple(orientation)

    brain = reoriented(nib.load(icbm / FILES[2]), orientation).get_fdata() > 0.5
    for volume, meta, name in ((pair.source, pair.meta, "T1"), (pair.target, pair.extra["target_meta"], "T2")):
        original = nib.load(root / "icbm" / f"{name}.nii.gz")
        written = nib.load(save_volume(tmp_path / "out" / f"{name}.nii.gz", volume, meta))
        assert written.shape == original.shape
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
        assert nib.aff2axcodes(written.affine) == tuple(orientation)

        data = original.get_fdata()
        value_range = np.subtract(*np.percentile(data, (99.5, 0.5)))
        error = np.abs(written.get_fdata() - data)[brain].mean() / value_range
        one_voxel_off = min(np.abs(np.roll(data, 1, axis) - data)[brain].mean() for axis in range(3)) / value_range
        # Tolerance: the 2 mm template goes to a 64^3 grid (1.5-1.8x coarser) and back through two
        # linear interpolations, which blur its sharp tissue edges by about as much as a half-voxel
        # shift (~3% of the intensity range in the brain); percentile clipping adds ~0.1%. A 5% mean
        # error, and clearly less than misplacing the volume by a single voxel, rules out any flip,
        # axis swap or off-by-one in the geometry, while allowing the resolution loss.
        assert error < 0.05, f"{name}: mean abs error {error:.3f} of the intensity range in the brain"
        assert error < 0.75 * one_voxel_off, f"{name}: {error:.3f} vs one voxel off {one_voxel_off:.3f}"


def test_packaged_template_is_the_2mm_template_cropped(icbm):
    """The icbm152 plugin's data (see its README): the 2 mm files, voxel for voxel, in a box."""
    from lift3d_plugins.datasets.icbm152 import FILES as PACKAGED_FILES
    from lift3d_plugins.datasets.icbm152 import PACKAGED

    box = (slice(4, 93), slice(4, 111), slice(0, 89))
    for key, source in zip(("T1", "T2", "mask"), FILES):
        original, packaged = nib.load(icbm / source), nib.load(PACKAGED / PACKAGED_FILES[key])
        assert packaged.get_data_dtype() == original.get_data_dtype()
        np.testing.assert_array_equal(np.asarray(packaged.dataobj), np.asarray(original.dataobj)[box])
        np.testing.assert_allclose(packaged.affine, original.slicer[box].affine)


ONE_MM = {"T1": "1mm_T1.nii.gz", "T2": "1mm_T2_brain.nii.gz", "mask": "1mm_brainmask.nii.gz"}


def test_icbm152_from_the_1mm_folder_gives_the_published_benchmark_subjects(icbm):
    """The ICBM benchmark's subjects (smoke grid): the intensity maps its first runs got from
    subjects written as NIfTI and read back by paired-nifti (recorded at commit 1f9f303)."""
    if not all((icbm / name).is_file() for name in ONE_MM.values()):
        pytest.skip(f"1 mm ICBM files not found in {icbm}")
    published = {"train-00": 9130.711484375, "val-00": 10443.422578125, "test-00": 9778.632866210939}
    manager = PluginManager(autoload=False)
    for subject, high in published.items():
        split = subject.split("-")[0]
        dataset = manager.datasets.create("icbm152", root=icbm, files=ONE_MM, split=split, voxel_mm=4,
                                          num_train=13, num_val=1, num_test=3, size=32, num_slices=16)
        pair = dataset[0]
        assert pair.subject == subject
        assert pair.meta.intensity.low == 0.0 and pair.meta.intensity.high == pytest.approx(high, rel=1e-12)
        assert pair.source.shape == pair.target.shape == (1, 16, 32, 32)


def test_packaged_tissue_maps_are_the_2mm_maps_cropped(icbm):
    """The icbm152 plugin's tissue maps (see its README): the 2 mm probability maps, voxel for voxel, in the same box."""
    from lift3d_plugins.datasets.icbm152 import PACKAGED, TISSUE_FILES

    box = (slice(4, 93), slice(4, 111), slice(0, 89))
    for key, name in TISSUE_FILES.items():
        source = icbm / f"2mm_tpm_{key}.nii.gz"
        if not source.is_file():
            pytest.skip(f"{source.name} not found in {icbm}")
        original, packaged = nib.load(source), nib.load(PACKAGED / name)
        assert packaged.get_data_dtype() == original.get_data_dtype()
        np.testing.assert_array_equal(np.asarray(packaged.dataobj), np.asarray(original.dataobj)[box])
        np.testing.assert_allclose(packaged.affine, original.slicer[box].affine)


def test_the_benchmark_options_get_tissue_maps_and_keep_their_subjects(icbm):
    """The ICBM benchmark's options (1 mm files, 2 mm voxels, cpu grid) unchanged: the packaged 2 mm tissue maps
    are resampled onto the 1 mm template's grid, and every other tensor is what it was before they were added."""
    if not all((icbm / name).is_file() for name in ONE_MM.values()):
        pytest.skip(f"1 mm ICBM files not found in {icbm}")
    manager = PluginManager(autoload=False)
    dataset = manager.datasets.create("icbm152", root=icbm, files=ONE_MM, voxel_mm=2, split="train", num_train=2,
                                      size=48, num_slices=24)
    pair = dataset[0]
    # Sums recorded with the plugin as it was before tissue maps (float64 sums of the float32 tensors).
    assert float(pair.source.double().sum()) == pytest.approx(-27972.071736336322, rel=1e-9)
    assert float(pair.target.double().sum()) == pytest.approx(-33891.28431282527, rel=1e-9)
    assert float(pair.extra["clean_target"].double().sum()) == pytest.approx(-33821.2878497453, rel=1e-9)
    assert int(pair.extra["mask"].sum()) == 17860
    tissue, mask = pair.extra["tissue"], pair.extra["mask"][0]
    assert tissue.shape == (3, 24, 48, 48)
    brain = tissue.sum(0) > 0.5
    assert 2 * (brain & mask).sum() / (brain.sum() + mask.sum()) > 0.95  # on the subject's brain, not the template's
    # T2 contrast, which the maps must line up with: CSF brighter than grey matter, grey than white.
    t2 = pair.target[0]
    means = [float(t2[(p > 0.8) & mask].mean()) for p in tissue]
    assert means[0] > means[1] > means[2], means
