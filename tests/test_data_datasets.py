"""Tests for the dataset plugins in plugins/datasets: paired-nifti, s2m, rire and phantom."""

from __future__ import annotations

import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lift3d.data.dataset import stack_items
from lift3d.data.errors import VolumeError
from lift3d.data.nifti import save_volume
from lift3d.plugins import PluginManager
from lift3d.plugins.protocols import PairedVolumeDataset, VolumePair
from lift3d_plugins.datasets import phantom as phantom_module
from lift3d_plugins.datasets import _files
from lift3d_plugins.datasets.phantom import TISSUES

TINY = {"size": 16, "num_slices": 8}


@pytest.fixture(scope="module")
def registry():
    return PluginManager(autoload=False).datasets


def head(shape=(20, 22, 12), seed=0, affine=None) -> nib.Nifti1Image:
    """A smooth random blob volume; different seeds give different subjects."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    centre = rng.uniform(-0.3, 0.3, 3)
    data = 1000 * np.exp(-np.sum((grid - centre) ** 2, -1) / 0.3) + rng.normal(0, 5, shape)
    return nib.Nifti1Image(data.astype(np.float32), np.diag([1.2, 1.0, 2.0, 1.0]) if affine is None else affine)


def contrast(image: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(2000 - np.asarray(image.dataobj), image.affine)


def folder_layout(root, subjects=("sub-01", "sub-02", "sub-03"), names=("T1", "T2")):
    for i, subject in enumerate(subjects):
        (root / subject).mkdir(parents=True)
        image = head(seed=i)
        nib.save(image, root / subject / f"{names[0]}.nii.gz")
        nib.save(contrast(image), root / subject / f"{names[1]}.nii.gz")
    return root


def s2m_layout(root, patients=3):
    """SWI on a fine grid, MRA on a coarse, flipped one over the same field of view."""
    for i in range(patients):
        folder = root / f"patient{i:03d}"
        folder.mkdir(parents=True)
        fine = np.diag([0.5, 0.5, 1.0, 1.0])
        swi = head((40, 40, 16), seed=i, affine=fine)
        nib.save(swi, folder / "SWI.nii.gz")
        coarse = np.diag([-1.0, 1.0, 2.0, 1.0])
        coarse[0, 3] = 19.5  # x runs from 19.5 down to 0, as the SWI's 0..19.5 mm
        mra = nib.Nifti1Image(np.asarray(swi.dataobj)[::-2, ::2, ::2].copy(), coarse)
        nib.save(mra, folder / "MRA.nii.gz")
    return root


def rire_layout(root, patients=("patient_001", "patient_002", "patient_003")):
    """NIfTI conversions in both accepted places."""
    for i, patient in enumerate(patients):
        (root / patient / "mr_T2").mkdir(parents=True)
        image = head(seed=i)
        nib.save(image, root / patient / "mr_T1.nii.gz")
        nib.save(contrast(image), root / patient / "mr_T2" / f"{patient}_mr_T2.nii.gz")
    return root


def build(registry, name, tmp_path, **options):
    layouts = {
        "paired-nifti": lambda: {"root": folder_layout(tmp_path / "pn"), "source": "T1", "target": "T2"},
        "s2m": lambda: {"root": s2m_layout(tmp_path / "s2m"), "test_size": 1},
        "rire": lambda: {"root": rire_layout(tmp_path / "rire"), "test_size": 1},
        "phantom": lambda: {"num_subjects": 3, "test_size": 1},
        "icbm152": lambda: {"num_train": 2, "num_test": 1, "voxel_mm": 8},
    }
    assert name in layouts, f"add a tiny layout for the new dataset plugin {name!r}"
    return registry.create(name, **{**layouts[name](), **TINY, **options})


# -- every registered dataset -------------------------------------------------------------------


def test_the_four_built_in_datasets_are_registered(registry):
    assert {"paired-nifti", "rire", "s2m", "phantom"} <= set(registry.names())


@pytest.mark.parametrize("name", PluginManager(autoload=False).datasets.names())
def test_every_dataset_yields_pairs_and_both_views(registry, name, tmp_path):
    dataset = build(registry, name, tmp_path, split="train")
    assert isinstance(dataset, PairedVolumeDataset)
    assert len(dataset) == 2
    pair = dataset[0]
    assert isinstance(pair, VolumePair) and pair.subject == dataset.subjects()[0]
    for volume in (pair.source, pair.target):
        assert volume.shape == (1, 8, 16, 16) and volume.dtype == torch.float32
        assert volume.min() >= -1 and volume.max() <= 1 and volume.std() > 0.05
    slices = dataset.slices()
    assert len(slices) == len(dataset) * 8
    assert torch.equal(slices[8 + 3]["source"], dataset[1].source[:, 3])
    windows = dataset.volumes(window=4, stride=2)
    assert len(windows) == len(dataset) * 3  # starts 0, 2, 4
    batch = next(iter(DataLoader(windows, batch_size=3, collate_fn=stack_items)))
    assert batch["source"].shape == (3, 1, 4, 16, 16) and batch["start"] == [0, 2, 4]
    assert torch.equal(batch["target"][1], dataset[0].target[:, 2:6])


@pytest.mark.parametrize("name", PluginManager(autoload=False).datasets.names())
def test_every_dataset_result_can_be_written_back(registry, name, tmp_path):
    pair = build(registry, name, tmp_path, split="test")[0]
    out = nib.load(save_volume(tmp_path / "out.nii.gz", pair.target, pair.meta))
    assert out.shape == pair.meta.shape
    np.testing.assert_allclose(out.affine, pair.meta.affine, atol=1e-5)


@pytest.mark.parametrize("name", ["paired-nifti", "s2m", "rire"])
def test_train_and_test_are_disjoint_and_cover_all(registry, name, tmp_path):
    train = build(registry, name, tmp_path, split="train").subjects()
    test = build(registry, name, tmp_path / "again", split="test").subjects()
    everything = build(registry, name, tmp_path / "all", split="all").subjects()
    assert not set(train) & set(test) and sorted(train + test) == everything


# -- paired-nifti -------------------------------------------------------------------------------


def test_paired_nifti_folder(registry, tmp_path):
    root = folder_layout(tmp_path)
    dataset = registry.create("paired-nifti", root=root, source="T1", target="T2.nii.gz", split="all", **TINY)
    assert dataset.subjects() == ["sub-01", "sub-02", "sub-03"]
    pair = dataset[2]
    assert pair.meta.path == root / "sub-03" / "T1.nii.gz"
    assert pair.extra["target_meta"].path == root / "sub-03" / "T2.nii.gz"
    # T2 here is an inverted T1: the normalised pair is anti-correlated.
    assert np.corrcoef(pair.source.ravel(), pair.target.ravel())[0, 1] < -0.95
    assert not torch.equal(dataset[0].source, dataset[1].source)


def test_paired_nifti_explicit_test_list_and_source_only(registry, tmp_path):
    root = folder_layout(tmp_path)
    test = registry.create("paired-nifti", root=root, source="T1", target=None, test=["sub-02"], split="test", **TINY)
    assert test.subjects() == ["sub-02"] and test[0].target is None
    train = registry.create("paired-nifti", root=root, source="T1", target="T2", test="sub-02", **TINY)
    assert train.subjects() == ["sub-01", "sub-03"]


def test_paired_nifti_csv_with_split_column(registry, tmp_path):
    folder_layout(tmp_path / "data")
    rows = ["subject,source,target,split"] + [
        f"{s},data/{s}/T1.nii.gz,data/{s}/T2.nii.gz,{sp}" for s, sp in (("a", "train"), ("b", "test"), ("c", "train"))
    ]
    for s, folder in zip("abc", ("sub-01", "sub-02", "sub-03")):
        rows = [r.replace(f"data/{s}/", f"data/{folder}/") if r.startswith(f"{s},") else r for r in rows]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    train = registry.create("paired-nifti", csv=tmp_path / "pairs.csv", **TINY)
    test = registry.create("paired-nifti", csv=tmp_path / "pairs.csv", split="test", **TINY)
    assert train.subjects() == ["a", "c"] and test.subjects() == ["b"]
    assert test[0].meta.path == tmp_path / "data" / "sub-02" / "T1.nii.gz"


def test_paired_nifti_csv_missing_column(registry, tmp_path):
    (tmp_path / "pairs.csv").write_text("subject,src,target\na,x.nii.gz,y.nii.gz\n")
    with pytest.raises(VolumeError, match=r"pairs\.csv: missing column\(s\) source; needs subject, source, target"):
        registry.create("paired-nifti", csv=tmp_path / "pairs.csv")


def test_empty_folder(registry, tmp_path):
    with pytest.raises(VolumeError, match=rf"{tmp_path}: no subjects found; expected .*<subject>/T1\.nii\.gz and T2\.nii\.gz"):
        registry.create("paired-nifti", root=tmp_path, source="T1", target="T2")


def test_missing_root(registry, tmp_path):
    with pytest.raises(VolumeError, match=r"nowhere: dataset folder not found"):
        registry.create("paired-nifti", root=tmp_path / "nowhere")


def test_subject_missing_a_modality(registry, tmp_path):
    root = folder_layout(tmp_path)
    (root / "sub-02" / "T2.nii.gz").unlink()
    with pytest.raises(VolumeError, match=r"1 subject\(s\) lack a file .*sub-02 lacks target T2\.nii\.gz \(has: T1\.nii\.gz\)"):
        registry.create("paired-nifti", root=root, source="T1", target="T2")


def test_loading_is_lazy(registry, tmp_path, monkeypatch):
    root = folder_layout(tmp_path)
    (root / "sub-01" / "T1.nii.gz").write_bytes(b"corrupt")
    calls = []
    real = _files.load_pair
    monkeypatch.setattr(_files, "load_pair", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    dataset = registry.create("paired-nifti", root=root, source="T1", target="T2", split="all", cache=True, **TINY)
    assert len(dataset) == 3 and len(dataset.slices()) == 24 and len(dataset.volumes()) == 3
    assert calls == []  # construction and the views read nothing
    dataset[1]
    dataset[1]
    assert calls == ["sub-02"]  # read on first use, then cached
    with pytest.raises(VolumeError, match=r"sub-01/T1\.nii\.gz: .*truncated or corrupt"):
        dataset[0]


def test_bad_grid_options_are_reported(registry, tmp_path):
    root = folder_layout(tmp_path)
    with pytest.raises(ValueError, match="in-plane size 20 is not a positive multiple of 8.*16 or 24"):
        registry.create("paired-nifti", root=root, source="T1", target="T2", size=20)
    with pytest.raises(ValueError, match="Unknown slice axis 'z'; valid: axial, coronal, sagittal"):
        registry.create("paired-nifti", root=root, source="T1", target="T2", slice_axis="z")


def test_unalignable_pair_is_one_clear_error(registry, tmp_path):
    root = folder_layout(tmp_path, subjects=("sub-01",))
    far = head(seed=0, affine=np.diag([1.2, 1.0, 2.0, 1.0]) + np.array([[0, 0, 0, 500.0], [0] * 4, [0] * 4, [0] * 4]))
    nib.save(far, root / "sub-01" / "T2.nii.gz")
    dataset = registry.create("paired-nifti", root=root, source="T1", target="T2", split="all", **TINY)
    with pytest.raises(VolumeError, match=r"sub-01/T2\.nii\.gz: cannot be aligned with .*sub-01/T1\.nii\.gz"):
        dataset[0]


# -- s2m ----------------------------------------------------------------------------------------


def test_s2m_aligns_mra_onto_the_swi_grid(registry, tmp_path):
    dataset = registry.create("s2m", root=s2m_layout(tmp_path), split="all", size=32, num_slices=8)
    pair = dataset[0]
    assert pair.source.shape == pair.target.shape == (1, 8, 32, 32)
    np.testing.assert_allclose(pair.extra["target_meta"].affine, pair.meta.affine)
    assert pair.meta.voxel_size == pytest.approx((0.5, 0.5, 1.0))
    # Same object on the same grid once aligned (the MRA is a flipped, coarser sampling of it).
    s, t = pair.source[0, 1:-1, 4:-4, 4:-4], pair.target[0, 1:-1, 4:-4, 4:-4]
    assert np.corrcoef(s.ravel(), t.ravel())[0, 1] > 0.98


def test_s2m_defaults_follow_the_paper(registry, tmp_path):
    with pytest.raises(ValueError, match="test_size=20 is more than the 3 subjects"):
        registry.create("s2m", root=s2m_layout(tmp_path))
    dataset = registry.create("s2m", root=tmp_path, test_size=1)
    assert dataset.grid.shape == (100, 256, 256)


# -- rire ---------------------------------------------------------------------------------------


def test_rire_reads_nifti_conversions(registry, tmp_path):
    root = rire_layout(tmp_path)
    dataset = registry.create("rire", root=root, split="all", **TINY)
    assert dataset.subjects() == ["patient_001", "patient_002", "patient_003"]
    assert dataset[0].meta.path == root / "patient_001" / "mr_T1.nii.gz"
    assert registry.create("rire", root=root, test_size=1).grid.shape == (35, 256, 256)  # the paper's grid


def test_rire_no_patients(registry, tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(VolumeError, match=r"no patient_\* folders; expected .*patient_001/mr_T1/patient_001_mr_T1\.mhd"):
        registry.create("rire", root=tmp_path)


def test_rire_metaimage_without_simpleitk(registry, tmp_path, monkeypatch):
    root = rire_layout(tmp_path)
    (root / "patient_001" / "mr_T1.nii.gz").unlink()
    (root / "patient_001" / "mr_T1").mkdir()
    (root / "patient_001" / "mr_T1" / "patient_001_mr_T1.mhd").write_text("ObjectType = Image\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(VolumeError, match=r"patient_001_mr_T1\.mhd: reading MetaImage files needs SimpleITK.*pip install lift3d\[rire\]"):
        registry.create("rire", root=root)


def test_rire_metaimage_matches_its_nifti_conversion(registry, tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (the `rire` extra) is not installed")
    root = rire_layout(tmp_path)
    nifti = nib.load(root / "patient_002" / "mr_T1.nii.gz")
    data = np.asarray(nifti.dataobj)
    # The same image as RIRE distributes it: ITK (z, y, x) order, LPS world, .mhd + .raw.
    itk = sitk.GetImageFromArray(np.ascontiguousarray(data[::-1, ::-1].transpose(2, 1, 0)))
    itk.SetSpacing((1.2, 1.0, 2.0))
    ras_corner = nifti.affine @ np.array([data.shape[0] - 1, data.shape[1] - 1, 0, 1.0])
    itk.SetOrigin((-ras_corner[0], -ras_corner[1], ras_corner[2]))
    (root / "patient_002" / "mr_T1.nii.gz").unlink()
    (root / "patient_002" / "mr_T1").mkdir()
    sitk.WriteImage(itk, str(root / "patient_002" / "mr_T1" / "patient_002_mr_T1.mhd"))
    assert (root / "patient_002" / "mr_T1" / "patient_002_mr_T1.raw").exists()
    dataset = registry.create("rire", root=root, split="all", **TINY)
    expected = registry.create("rire", root=rire_layout(tmp_path / "nifti"), split="all", **TINY)[1]
    got = dataset[1]
    assert got.meta.path.suffix == ".mhd" and got.meta.orientation == ("L", "P", "S")
    torch.testing.assert_close(got.source, expected.source, atol=1e-5, rtol=0)


# -- phantom ------------------------------------------------------------------------------------


def test_phantom_is_deterministic_by_seed(registry):
    a = registry.create("phantom", seed=3, **TINY)[1]
    b = registry.create("phantom", seed=3, **TINY)[1]
    c = registry.create("phantom", seed=4, **TINY)[1]
    assert torch.equal(a.source, b.source) and torch.equal(a.target, b.target)
    assert not torch.equal(a.source, c.source)
    assert not torch.equal(a.source, registry.create("phantom", seed=3, **TINY)[2].source)


def test_phantom_subject_does_not_depend_on_split_or_order(registry):
    everyone = registry.create("phantom", split="all", num_subjects=5, test_size=2, **TINY)
    test = registry.create("phantom", split="test", num_subjects=5, test_size=2, **TINY)
    assert test.subjects() == ["phantom-003", "phantom-004"]  # after the training subjects
    assert torch.equal(test[1].source, everyone[4].source)
    train = registry.create("phantom", split="train", num_subjects=5, test_size=2, **TINY)
    assert train.subjects() == ["phantom-000", "phantom-001", "phantom-002"]


def _tissue_means(volume: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {t: float(volume[0][labels == i].mean()) for i, t in enumerate(TISSUES) if (labels == i).any()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_contrasts(registry, seed):
    pair = registry.create("phantom", seed=seed, size=32, num_slices=16)[0]
    t1, t2 = _tissue_means(pair.source, pair.extra["labels"]), _tissue_means(pair.target, pair.extra["labels"])
    assert t1["white_matter"] > t1["grey_matter"] > t1["csf"]
    assert t2["csf"] > t2["grey_matter"] > t2["white_matter"]
    # Vessels: dark in the T1-like (SWI-like) source, bright in the T2-like (MRA-like) target.
    brain = (pair.extra["labels"] == TISSUES.index("grey_matter")) | (pair.extra["labels"] == TISSUES.index("white_matter"))
    assert t1["vessel"] < float(pair.source[0][brain].mean()) - 0.3
    assert t2["vessel"] > float(pair.target[0][brain].mean()) + 0.3


def test_phantom_vessels_run_obliquely_across_slices(registry):
    labels = registry.create("phantom", size=32, num_slices=16)[0].extra["labels"]
    vessel = (labels == TISSUES.index("vessel")).numpy()
    slices_with_vessels = np.flatnonzero(vessel.any(axis=(1, 2)))
    assert len(slices_with_vessels) >= 6
    centres = [np.argwhere(vessel[k]).mean(0) for k in slices_with_vessels]
    assert np.abs(np.diff(centres, axis=0)).max() > 0  # cross-sections move from slice to slice


def test_phantom_is_fast_and_lazy(registry, monkeypatch):
    dataset = registry.create("phantom", size=32, num_slices=16, cache=False)
    dataset[0]  # warm up
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    assert (time.perf_counter() - start) / len(dataset) < 0.05  # a few ms each on one core
    monkeypatch.setattr(phantom_module, "generate_phantom", lambda *a, **k: pytest.fail("generated eagerly"))
    registry.create("phantom", size=32, num_slices=16)


@pytest.mark.parametrize("slice_axis", ["sagittal", "coronal"])
def test_phantom_slice_axis(registry, slice_axis):
    pair = registry.create("phantom", slice_axis=slice_axis, size=32, num_slices=16)[0]
    assert pair.source.shape == (1, 16, 32, 32)
    assert pair.meta.slice_axis == slice_axis and sorted(pair.meta.shape) == [16, 32, 32]


def test_phantom_writes_a_1mm_nifti(registry, tmp_path):
    pair = registry.create("phantom", **TINY)[0]
    out = nib.load(save_volume(tmp_path / "p.nii.gz", pair.source, pair.meta))
    assert out.shape == (16, 16, 8) and nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(out.header.get_zooms(), (1.0, 1.0, 1.0))
    np.testing.assert_allclose(nib.affines.apply_affine(out.affine, (np.array(out.shape) - 1) / 2), 0.0)
    np.testing.assert_allclose(out.get_fdata().transpose(2, 1, 0), (pair.source[0].numpy() + 1) / 2, atol=1e-6)


def test_phantom_bad_options(registry):
    with pytest.raises(ValueError, match="generates its volumes and reads no files"):
        registry.create("phantom", root="data")
    with pytest.raises(ValueError, match="Unknown phantom target modality 'PD'; valid: T1, T2"):
        registry.create("phantom", target="PD")
    with pytest.raises(ValueError, match="phantom: the 'test' split is empty"):
        registry.create("phantom", split="test", test_size=0)
