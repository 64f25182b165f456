"""The dataset fingerprint: what it records, and the folders it refuses before any training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lift3d.data.errors import VolumeError
from lift3d.data.fingerprint import check_subject_count, fingerprint


@dataclass
class Pair:
    subject: str
    source: Path
    target: Path | None
    mask: Path | None = None


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def _pair(root: Path, name: str, *, shape=(6, 7, 5), spacing=(1.0, 1.2, 3.0), target_affine=None, target_shape=None,
          seed=0) -> Pair:
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    source = _write(root / name / "T1.nii.gz", rng.uniform(1, 100, shape), affine)
    target = _write(root / name / "PD.nii.gz", rng.uniform(1, 50, target_shape or shape),
                    affine if target_affine is None else target_affine)
    mask_data = np.zeros(shape)
    mask_data[1:-1, 1:-1, 1:-1] = 1
    mask = _write(root / name / "brainmask.nii.gz", mask_data, affine)
    return Pair(name, source, target, mask)


def test_records_grid_orientation_intensities_and_count(tmp_path):
    pairs = [_pair(tmp_path, f"s{i}", seed=i) for i in range(3)]
    print_ = fingerprint(pairs, source="T1", target="PD")
    assert print_.count == 3
    assert print_.median_shape == (6, 7, 5)
    assert print_.median_spacing == (1.0, 1.2, 3.0)
    assert print_.anisotropy == pytest.approx(3.0)
    assert print_.orientations == {"RAS": 3}
    low, mid, high = print_.subjects[0].source_percentiles
    assert 1 <= low < mid < high <= 100
    assert print_.subjects[0].target_percentiles[2] <= 50
    assert print_.subjects[0].mask_fraction == pytest.approx((4 * 5 * 3) / (6 * 7 * 5), abs=1e-4)
    json.dumps(print_.to_json())  # JSON-ready as written to fingerprint.json


@pytest.mark.parametrize("problem, expected", [
    ("shape", "voxels, its source"),
    ("orientation", "oriented"),
    ("shift", "mm from its source's grid"),
])
def test_a_pair_off_its_source_grid_is_refused_naming_the_subject(tmp_path, problem, expected):
    kwargs = {"shape": dict(target_shape=(6, 7, 6)),
              "orientation": dict(target_affine=np.diag([-1.0, 1.2, 3.0, 1.0])),
              "shift": dict(target_affine=np.array([[1, 0, 0, 0.5], [0, 1.2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1.0]]))}
    pairs = [_pair(tmp_path, "good"), _pair(tmp_path, "bad-one", **kwargs[problem])]
    with pytest.raises(VolumeError, match=rf"subject bad-one: its target PD.nii.gz .*{expected}"):
        fingerprint(pairs, source="T1", target="PD")


def test_duplicates_nan_and_4d_are_refused_before_training(tmp_path):
    good = _pair(tmp_path, "a")
    with pytest.raises(VolumeError, match="duplicate subject names: a;"):
        fingerprint([good, good], source="T1", target="PD")
    nan = np.ones((4, 4, 4))
    nan[0, 0, 0] = np.nan
    bad = Pair("b", _write(tmp_path / "b" / "T1.nii.gz", nan, np.eye(4)), None)
    with pytest.raises(VolumeError, match=r"T1.nii.gz: has non-finite voxels \(1 NaN"):
        fingerprint([bad], source="T1", target=None)
    four_d = Pair("c", _write(tmp_path / "c" / "T1.nii.gz", np.ones((4, 4, 4, 2)), np.eye(4)), None)
    with pytest.raises(VolumeError, match="is a 4D image with 2 volumes"):
        fingerprint([four_d], source="T1", target=None)


def test_too_few_subjects_for_the_split_names_the_need():
    with pytest.raises(VolumeError, match="2 subject\\(s\\) found, but the split train/val/test needs at least 3"):
        check_subject_count(2, 3, "train/val/test")
    check_subject_count(3, 3, "train/val/test")
