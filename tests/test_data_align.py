"""Tests for lift3d/data/align.py and pairs.py: pairs on different grids meet in world space."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from lift3d.data.align import align_to, field_of_view_overlap, same_grid
from lift3d.data.errors import VolumeError
from lift3d.data.pairs import load_pair
from lift3d.data.volume import TrainingGrid


def blob(xyz: np.ndarray) -> np.ndarray:
    """A smooth function of world position (mm), so any two grids sample the same object."""
    centre = np.array([2.0, -3.0, 1.0])
    return 100.0 * np.exp(-np.sum((xyz - centre) ** 2, axis=-1) / (2 * 6.0**2)) + 0.5 * xyz[..., 0] + 20.0


def sampled(shape, affine) -> nib.Nifti1Image:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return nib.Nifti1Image(blob(nib.affines.apply_affine(affine, ijk)).astype(np.float32), affine)


def grid_affine(spacing, shape, codes="RAS") -> np.ndarray:
    """An affine with ``spacing`` and orientation ``codes`` whose field of view is centred on 0."""
    flips = {"R": 1, "L": -1, "A": 1, "P": -1, "S": 1, "I": -1}
    affine = np.diag([*(flips[c] * s for c, s in zip(codes, spacing)), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


# Like S2M: a fine SWI-like source and a coarse, differently oriented MRA-like target.
SOURCE = sampled((48, 48, 24), grid_affine((0.5, 0.5, 1.0), (48, 48, 24)))
TARGET = sampled((18, 18, 8), grid_affine((1.4, 1.4, 3.0), (18, 18, 8), "LPS"))


def test_same_grid_within_tolerance():
    moved = nib.Nifti1Image(np.asarray(SOURCE.dataobj), SOURCE.affine + 0.001)
    assert same_grid(SOURCE, moved)
    assert not same_grid(SOURCE, TARGET)
    kept = align_to(SOURCE, moved)
    np.testing.assert_array_equal(np.asarray(kept.dataobj), np.asarray(SOURCE.dataobj))
    np.testing.assert_array_equal(kept.affine, SOURCE.affine)


def test_target_on_another_grid_is_resampled_onto_the_source_grid():
    aligned = align_to(SOURCE, TARGET)
    assert aligned.shape == SOURCE.shape
    np.testing.assert_array_equal(aligned.affine, SOURCE.affine)
    truth = np.asarray(SOURCE.dataobj)
    got = np.asarray(aligned.dataobj)
    interior = (slice(6, -6), slice(6, -6), slice(4, -4))  # inside the target's field of view
    # Linear interpolation of a 1.4 x 1.4 x 3 mm sampling of a 6 mm wide blob: a few % of its peak.
    assert np.abs(got[interior] - truth[interior]).max() < 0.08 * 100
    assert np.corrcoef(got[interior].ravel(), truth[interior].ravel())[0, 1] > 0.995


def test_fields_of_view_that_do_not_overlap_are_refused():
    far = TARGET.affine.copy()
    far[:3, 3] += [300.0, 0.0, 0.0]
    elsewhere = nib.Nifti1Image(np.asarray(TARGET.dataobj), far)
    assert field_of_view_overlap(SOURCE, elsewhere) == 0.0
    with pytest.raises(VolumeError, match=r"mra\.nii\.gz: cannot be aligned with swi\.nii\.gz: .* share 0% .*world mm"):
        align_to(SOURCE, elsewhere, names=("swi.nii.gz", "mra.nii.gz"))


def test_partial_overlap_threshold():
    shifted = TARGET.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 18.0]  # slide the target up by 3/4 of the source's 24 mm
    half = nib.Nifti1Image(np.asarray(TARGET.dataobj), shifted)
    overlap = field_of_view_overlap(SOURCE, half)
    assert 0.1 < overlap < 0.5
    align_to(SOURCE, half, min_overlap=0.1)
    with pytest.raises(VolumeError, match="at least 50% needed"):
        align_to(SOURCE, half)


def test_load_pair_aligns_and_normalises_both(tmp_path):
    nib.save(SOURCE, tmp_path / "swi.nii.gz")
    nib.save(TARGET, tmp_path / "mra.nii.gz")
    grid = TrainingGrid(size=32, num_slices=12, multiple=8, percentiles=(0, 100))
    pair = load_pair("p1", tmp_path / "swi.nii.gz", tmp_path / "mra.nii.gz", grid)
    assert pair.source.shape == pair.target.shape == (1, 12, 32, 32)
    assert pair.meta.path == tmp_path / "swi.nii.gz"
    assert pair.extra["target_meta"].path == tmp_path / "mra.nii.gz"
    np.testing.assert_allclose(pair.extra["target_meta"].affine, SOURCE.affine)
    # Same object, same grid: the normalised images agree where the target has data.
    s, t = pair.source[0, 3:-3, 8:-8, 8:-8].numpy(), pair.target[0, 3:-3, 8:-8, 8:-8].numpy()
    assert np.corrcoef(s.ravel(), t.ravel())[0, 1] > 0.99
    assert pair.source.min() >= -1 and pair.source.max() <= 1


def test_load_pair_with_mask(tmp_path):
    nib.save(SOURCE, tmp_path / "a.nii.gz")
    mask = (np.asarray(SOURCE.dataobj) > 60).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, SOURCE.affine), tmp_path / "mask.nii.gz")
    grid = TrainingGrid(size=16, num_slices=8, percentiles=(0, 100))
    pair = load_pair("p", tmp_path / "a.nii.gz", tmp_path / "a.nii.gz", grid, mask=tmp_path / "mask.nii.gz", apply_mask=True)
    inside = pair.extra["mask"]
    assert inside.dtype == torch.bool
    assert inside.shape == (1, 8, 16, 16) and 0 < inside.float().mean() < 0.5
    assert (pair.source[~inside] < -0.9).float().mean() > 0.9  # outside the mask is background
