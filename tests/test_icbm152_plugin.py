"""plugins/datasets/icbm152.py: subjects made from the packaged ICBM 152 template, their seeds, splits and errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lift3d.cli.main import main as lift3d_main
from lift3d.data.errors import VolumeError
from lift3d.plugins import PluginError, PluginManager
from lift3d_plugins.datasets import icbm152

REPO = Path(__file__).resolve().parents[1]
SMALL = {"size": 16, "num_slices": 8, "voxel_mm": 8}  # seconds, not minutes


def create(**options):
    return PluginManager(autoload=False).datasets.create("icbm152", **options)


def test_listed_by_lift3d_plugins(capsys):
    assert lift3d_main(["plugins", "--kind", "datasets"]) == 0
    assert "icbm152  " in capsys.readouterr().out


def test_splits_have_the_documented_disjoint_seeds():
    counts = {"num_train": 4, "num_val": 2, "num_test": 3}
    seeds = {split: create(split=split, **counts, **SMALL).seeds() for split in ("train", "val", "test")}
    assert seeds == {"train": {f"train-0{i}": 1000 + i for i in range(4)}, "val": {"val-00": 1500, "val-01": 1501},
                     "test": {f"test-0{i}": 2000 + i for i in range(3)}}
    everything = create(split="all", **counts, **SMALL)
    assert everything.seeds() == seeds["train"] | seeds["val"] | seeds["test"]
    shifted = create(split="test", seed=1, **counts, **SMALL).seeds()
    assert shifted == {f"test-0{i}": 3500 + i for i in range(3)}
    # No seed is shared by two splits or two values of ``seed``, up to the per-split maximum.
    drawn = [icbm152.subject_seed(s, i, k) for s in icbm152.FIRST_SEED for i in (0, icbm152.MAX_PER_SPLIT - 1)
             for k in range(3)]
    ranges = sorted((icbm152.subject_seed(s, 0, k), icbm152.subject_seed(s, icbm152.MAX_PER_SPLIT - 1, k))
                    for s in icbm152.FIRST_SEED for k in range(3))
    assert len(set(drawn)) == len(drawn)
    assert all(hi < lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))


def test_pairs_on_the_grid_deterministic_by_seed():
    dataset = create(split="train", num_train=2, **SMALL)
    pair = dataset[0]
    assert pair.subject == "train-00" and pair.extra["seed"] == 1000
    for volume in (pair.source, pair.target, pair.extra["clean_target"]):
        assert volume.shape == (1, 8, 16, 16) and volume.dtype == torch.float32
        assert volume.min() >= -1 and volume.max() <= 1
    mask = pair.extra["mask"]
    assert mask.dtype == torch.bool and 0.2 < mask.float().mean() < 0.9
    # Skull-stripped: outside the brain both images sit at their minimum, inside they do not.
    for volume in (pair.source, pair.target):
        assert volume[~mask].mean() < volume[mask].mean() - 0.5
    again = create(split="train", num_train=2, **SMALL)[0]
    assert torch.equal(again.source, pair.source) and torch.equal(again.target, pair.target)
    other = dataset[1]
    assert not torch.equal(other.source, pair.source) and not torch.equal(other.extra["mask"], mask)
    swapped = create(split="train", num_train=2, source="T2", target="T1", **SMALL)[0]
    assert torch.equal(swapped.source, pair.target) and torch.equal(swapped.target, pair.source)
    np.testing.assert_allclose(np.linalg.norm(pair.meta.affine[:3, :3], axis=0), [8.0, 8.0, 8.0])


def fake_template(same_contrast: bool) -> icbm152.Template:
    """A 24^3 ellipsoid 'brain' with structure inside, on a 2 mm grid."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    mask = x**2 + y**2 / 0.8 + z**2 / 0.7 < 0.8
    t1 = ((1 + np.sin(6 * x) * np.cos(5 * y) + 0.3 * rng.random(x.shape)) * 100 * mask).astype(np.float32)
    t2 = t1.copy() if same_contrast else (300 - t1) * mask
    return icbm152.Template(t1, t2.astype(np.float32), mask, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_deformation_is_shared_by_both_modalities_and_bias_and_noise_are_not():
    template = fake_template(same_contrast=True)
    clean = icbm152.make_subject(template, 1000, icbm152.Corruption(bias_log_std=0.0, noise_fraction=0.0))
    # With T1 == T2 and neither bias nor noise, an identical deformation gives identical volumes.
    assert np.array_equal(clean["T1"], clean["T2"])
    changed = np.abs(clean["T1"] - template.t1 * clean["mask"]).mean() / template.t1[template.mask].mean()
    assert changed > 0.05, f"the deformation barely moved anything ({changed:.3f})"

    subject = icbm152.make_subject(template, 1000)
    assert np.array_equal(subject["mask"], clean["mask"])  # the deformation is drawn first, from the seed
    assert not np.allclose(subject["T1"], subject["T2"])  # bias field and noise are drawn per modality
    for name in ("T1", "T2"):
        assert (subject[name][~subject["mask"]] == 0).all() and (subject[name] >= 0).all()
        assert np.array_equal(subject[f"{name}_clean"], clean[name])  # clean = deformed, before bias and noise
    again = icbm152.make_subject(template, 1000)
    assert all(np.array_equal(again[k], subject[k]) for k in subject)
    assert not np.array_equal(icbm152.make_subject(template, 2000)["mask"], subject["mask"])


def test_clean_target_is_the_target_before_its_bias_and_noise():
    quiet = create(split="test", num_test=1, bias_log_std=0.0, noise_fraction=0.0, **SMALL)[0]
    assert torch.equal(quiet.extra["clean_target"], quiet.target)
    pair = create(split="test", num_test=1, **SMALL)[0]
    mask = pair.extra["mask"]
    assert not torch.equal(pair.extra["clean_target"], pair.target)
    # The same anatomy, on the target's intensity map: close inside the brain, not a different subject.
    difference = (pair.extra["clean_target"] - pair.target)[mask].abs().mean()
    other = create(split="test", num_test=2, **SMALL)[1].target
    assert difference < 0.5 * (other - pair.target)[mask].abs().mean()


def test_reads_no_file_outside_the_package(monkeypatch):
    opened = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: opened.append(Path(path)) or real_load(path, *a, **k))
    icbm152._load_template.cache_clear()
    dataset = create(split="train", num_train=1, **SMALL)
    dataset[0]
    assert sorted(p.name for p in opened) == sorted([*icbm152.FILES.values(), *icbm152.TISSUE_FILES.values()])
    assert all(p.resolve().parent == icbm152.PACKAGED for p in opened)


def test_an_external_template_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for key, name in icbm152.FILES.items():
        shutil.copyfile(icbm152.PACKAGED / name, folder / f"my_{key}.nii.gz")
    files = {key: f"my_{key}.nii.gz" for key in icbm152.FILES}
    external = create(root=folder, files=files, split="test", num_test=1, **SMALL)[0]
    packaged = create(split="test", num_test=1, **SMALL)[0]
    assert torch.equal(external.target, packaged.target)

    (folder / "my_T2.nii.gz").unlink()
    with pytest.raises(VolumeError) as info:
        create(root=folder, files=files, split="test", **SMALL)
    message = str(info.value)
    assert "lacks my_T2.nii.gz" in message and "my_T1.nii.gz" in message and "\n" not in message
    with pytest.raises(VolumeError, match="lacks T1w.nii.gz, T2w.nii.gz, brainmask.nii.gz"):
        create(root=folder, split="test", **SMALL)
    with pytest.raises(VolumeError, match="template folder not found; icbm152 needs a folder holding T1w.nii.gz"):
        create(root=tmp_path / "nowhere", split="test", **SMALL)
    with pytest.raises(ValueError, match="unknown key 'T3' in files; valid: T1, T2, mask"):
        create(root=folder, files={"T3": "x.nii.gz"}, **SMALL)


def test_missing_or_corrupt_packaged_file(tmp_path, monkeypatch):
    copy = tmp_path / "icbm152"
    shutil.copytree(icbm152.PACKAGED, copy)
    monkeypatch.setattr(icbm152, "PACKAGED", copy)
    data = (copy / "T2w.nii.gz").read_bytes()
    (copy / "T2w.nii.gz").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(VolumeError, match=r"T2w.nii.gz: .*truncated or corrupt.*reinstall lift3d"):
        create(split="test", **SMALL)
    (copy / "T2w.nii.gz").unlink()
    with pytest.raises(VolumeError, match="packaged ICBM 152 file.s. missing: T2w.nii.gz; reinstall lift3d"):
        create(split="test", **SMALL)


def test_bad_options_name_the_valid_ones():
    with pytest.raises(PluginError, match=r"no option 'sise'; valid: root, split, files, num_train, .*size"):
        create(sise=32)
    with pytest.raises(ValueError, match="Unknown icbm152 target modality 'PD'; valid: T1, T2"):
        create(target="PD")
    with pytest.raises(ValueError, match="Unknown split 'dev'; valid: train, val, test, all"):
        create(split="dev")
    with pytest.raises(ValueError, match="voxel_mm=3 is not a whole multiple of the template's 2 mm voxel"):
        create(voxel_mm=3)
    with pytest.raises(ValueError, match="the 'val' split is empty"):
        create(split="val", num_val=0)
    with pytest.raises(ValueError, match="noise_fraction must be a number >= 0"):
        create(noise_fraction=-1)


def test_a_bad_template_folder_is_one_line_from_the_cli(tmp_path, capsys):
    from lift3d.cli.finetune import main

    out = tmp_path / "run"
    code = main(["--data.dataset", "icbm152", "--data.options", f"{{root = '{tmp_path / 'nowhere'}'}}",
                 "--run.output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "nowhere: template folder not found" in err
    assert not out.exists()


def test_loads_train_and_test_subjects_from_another_working_directory(tmp_path):
    code = ("from lift3d.plugins import create\n"
            "for split in ('train', 'test'):\n"
            "    d = create('datasets', 'icbm152', split=split, num_train=2, num_test=1, size=16, num_slices=8,"
            " voxel_mm=8)\n"
            "    print(split, d.subjects(), tuple(d[0].target.shape))\n")
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "train ['train-00', 'train-01'] (1, 8, 16, 16)" in completed.stdout
    assert "test ['test-00'] (1, 8, 16, 16)" in completed.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # builds a wheel and installs it
def test_the_wheel_carries_the_data_and_the_plugin_runs_from_it(tmp_path):
    # Build from a copy of the sources, so the shared checkout gets no build/ folder.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    for name in ("lift3d", "plugins"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = wheels.glob("lift3d-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in [*icbm152.FILES.values(), "README.md"]:
        assert f"lift3d_plugins/datasets/data/icbm152/{name}" in names, names
    assert "lift3d/py.typed" in names  # PEP 561: type checkers read lift3d's annotations
    assert "lift3d/sampling/solvers/flow.py" in names and "lift3d/training/stages/volumes.py" in names

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    code = ("import lift3d_plugins.datasets.icbm152 as m\n"
            "from lift3d.plugins import create\n"
            "d = create('datasets', 'icbm152', split='test', num_test=1, size=16, num_slices=8, voxel_mm=8)\n"
            "print(m.PACKAGED, tuple(d[0].source.shape))\n")
    env = {**os.environ, "PYTHONPATH": str(site), "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1"}
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               timeout=300, env=env)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.startswith(str(site / "lift3d_plugins" / "datasets" / "data" / "icbm152"))
    assert "(1, 8, 16, 16)" in completed.stdout


# --------------------------------------------------------------------------------------------
# Tissue maps (extra["tissue"])


def test_tissue_maps_left_every_other_tensor_as_it_was():
    """Sums recorded with the plugin as it was before tissue maps: the same seeds give the same volumes."""
    before = {"train": (-975.4274467392825, -1057.3453840520815, -1045.6397597372998, 734),
              "test": (-1060.5278074194212, -1120.232747925911, -1119.1216449683998, 717)}
    for split, (source, target, clean, mask) in before.items():
        for tissue in (None, False):
            pair = create(split=split, num_train=2, num_test=1, tissue=tissue, **SMALL)[0]
            assert float(pair.source.double().sum()) == pytest.approx(source, rel=1e-9)
            assert float(pair.target.double().sum()) == pytest.approx(target, rel=1e-9)
            assert float(pair.extra["clean_target"].double().sum()) == pytest.approx(clean, rel=1e-9)
            assert int(pair.extra["mask"].sum()) == mask
            assert ("tissue" in pair.extra) == (tissue is None)


def test_tissue_maps_are_probabilities_deformed_with_the_subject():
    pairs = create(split="train", num_train=2, size=32, num_slices=16, voxel_mm=4)
    first, second = pairs[0], pairs[1]
    tissue, mask = first.extra["tissue"], first.extra["mask"][0]
    assert tissue.shape == (3, 16, 32, 32) and tissue.dtype == torch.float32
    assert tissue.min() >= 0 and tissue.sum(0).max() <= 1 + 1e-4
    # Zero outside the brain, up to the (linear) resampling of its edge, where the mask is nearest-neighbour.
    assert tissue[:, ~mask].sum() < 0.05 * tissue[:, mask].sum()
    brain = tissue.sum(0) > 0.5

    def dice(a, b):
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    assert dice(brain, mask) > 0.95
    assert dice(brain, second.extra["mask"][0]) < dice(brain, mask) - 0.02  # the other subject's brain fits worse
    t2 = first.target[0]
    means = [float(t2[(p > 0.7) & mask].mean()) for p in tissue]
    assert means[0] > means[1] > means[2], means  # T2: CSF > grey > white matter


def test_tissue_maps_from_the_template_folder_or_refused_in_one_line(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in [*icbm152.FILES.values(), *icbm152.TISSUE_FILES.values()]:
        shutil.copyfile(icbm152.PACKAGED / name, folder / f"my_{name}")
    files = {key: f"my_{name}" for key, name in {**icbm152.FILES, **icbm152.TISSUE_FILES}.items()}
    own = create(root=folder, files=files, split="test", num_test=1, **SMALL)[0]
    packaged = create(split="test", num_test=1, **SMALL)[0]
    assert torch.equal(own.extra["tissue"], packaged.extra["tissue"])
    with pytest.raises(ValueError, match="files names the tissue map.s. csf, gm but not wm; give all of csf, gm, wm"):
        create(root=folder, files={k: v for k, v in files.items() if k != "wm"}, **SMALL)
    with pytest.raises(VolumeError, match="tissue map.s. missing: nowhere.nii.gz"):
        create(root=folder, files={**files, "gm": "nowhere.nii.gz"}, **SMALL)
    with pytest.raises(ValueError, match="tissue must be true, false or None"):
        create(tissue="yes", **SMALL)


def test_packaged_tissue_maps_are_left_out_of_a_folder_in_another_space(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for name in icbm152.FILES.values():  # the same images, placed 120 mm to the right of the template
        image = nib.load(icbm152.PACKAGED / name)
        affine = image.affine.copy()
        affine[0, 3] += 120.0
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine, image.header), folder / name)
    assert "tissue" not in create(root=folder, split="test", num_test=1, **SMALL)[0].extra
    with pytest.raises(VolumeError) as info:
        create(root=folder, tissue=True, **SMALL)
    assert "do not lie on the template's brain" in str(info.value) and "\n" not in str(info.value)
