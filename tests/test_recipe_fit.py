"""lift3d fit and lift3d predict end to end on a tiny folder of NIfTI pairs lift3d has never seen."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lift3d.cli.main import main
from lift3d.recipes.plan import Plan, StageTwoVariant, save_plan

SHAPE = (14, 12, 6)  # anisotropic voxels, an oblique-free LPS orientation: another grid than lift3d's own data
AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, -1.5, 0, 30.0], [0, 0, 4.0, -10.0], [0, 0, 0, 1]])


def _folder(root: Path, subjects: int = 7) -> Path:
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in SHAPE), indexing="ij")
    for i in range(subjects):
        blob = np.exp(-((z - 0.1 * i / subjects) ** 2 + y ** 2 + x ** 2) * 2)
        folder = root / f"sub-{i:02d}"
        folder.mkdir(parents=True)
        for name, data in (("T1", 100 * blob), ("FLAIR", 80 * (1 - blob) + 5 * rng.standard_normal(SHAPE)),
                           ("brainmask", (blob > 0.2).astype(float))):
            nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), str(folder / f"{name}.nii.gz"))
    return root


TINY = Plan(size=16, num_slices=8, widths=[16, 32], stage1_steps=2, stage1_batch=4, stage2_steps=2,
            stage2_val_every=1, stage2_variants=[StageTwoVariant(), StageTwoVariant(learning_rate=1e-3)],
            evaluation_budget=2, solver_steps=[1, 2], solver_samples=[1, 2], val_size=2, test_size=2,
            distill=["direct", "reflow"], distill_student_steps=[1, 2], distill_steps=2, distill_val_every=1)


@pytest.mark.slow
def test_fit_then_predict_on_an_unseen_folder(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    save_plan(TINY, run)  # the user's edited plan: tiny, so the test runs in seconds
    assert main(["fit", "--data", str(data), "--source", "T1", "--target", "FLAIR", "--out", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert set(results["methods"]) == {"lifted", "slice-wise", "lifted-student"}
    assert {"lifted vs slice-wise", "lifted-student vs lifted"} <= set(results["paired_differences"])
    student = json.loads((run / "choose_student.json").read_text())  # 1- and 2-step students of both families,
    assert {(r["family"], r["evaluations"]) for r in student["candidates"]} == {  # tried at 1 and 2 passes
        (f, n) for f in ("direct", "direct-2step", "reflow", "reflow-2step") for n in (1, 2)}
    assert {r["antithetic"] for r in student["candidates"] if r["samples"] == 2} == {False, True}  # pairs tried too
    assert results["methods"]["lifted-student"]["unet_evaluations"] <= 2
    assert results["methods"]["lifted"]["unet_evaluations"] <= 2
    lifted = results["methods"]["lifted"]
    if lifted["samples"] > 1:  # a std map is scored against the error, per voxel and across subjects
        assert lifted["uncertainty"]["subjects"] == 2 and "std_error_spearman" in lifted["subjects"][0]
    assert (run / "report.html").stat().st_size > 1000
    card = (run / "model" / "README.md").read_text()
    assert "lift3d predict --model" in card and "T1 -> FLAIR" in card
    stage2_card = (run / "stage2-0" / "model" / "README.md").read_text()  # every export says what it is
    assert "not** a plain diffusers model" in stage2_card and "lift3d.load_lifted" in stage2_card
    assert "2D diffusion U-Net trained slice by slice" in (run / "stage1" / "model" / "README.md").read_text()
    for subject in results["split"]["test"]:
        written = nib.load(str(run / "test" / "lifted" / f"{subject}_synth.nii.gz"))
        assert written.shape == SHAPE and np.allclose(written.affine, AFFINE)  # the subject's own grid

    capsys.readouterr()
    assert main(["fit", "--data", str(data), "--source", "T1", "--target", "FLAIR", "--out", str(run)]) == 0
    assert "[stage1] done earlier" in capsys.readouterr().out  # a re-run keeps what is done

    out = tmp_path / "pred"
    sources = [str(data / s / "T1.nii.gz") for s in results["split"]["test"]]  # a paired-nifti layout
    assert main(["predict", "--model", str(run), "--source", *sources, "--out", str(out)]) == 0
    for subject in results["split"]["test"]:  # named by subject folder, sampled as the fit chose
        predicted = nib.load(str(out / f"{subject}_synth.nii.gz"))
        assert predicted.shape == SHAPE and np.allclose(predicted.affine, AFFINE)
        assert (out / "std" / f"{subject}_std.nii.gz").is_file() == (results["methods"]["lifted"]["samples"] > 1)

    from lift3d.recipes.predict import predict_volume

    result = predict_volume(run, nib.load(sources[0]), warn=None)  # the Python call: an image in, an image out
    assert result.image.shape == SHAPE and np.allclose(result.image.affine, AFFINE)
    assert (result.std is not None) == (results["methods"]["lifted"]["samples"] > 1)


def test_a_bad_folder_is_refused_before_any_training(tmp_path, capsys):
    data = _folder(tmp_path / "data", subjects=3)
    (data / "sub-01" / "FLAIR.nii.gz").unlink()
    run = tmp_path / "run"
    assert main(["fit", "--data", str(data), "--source", "T1", "--target", "FLAIR", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "sub-01 lacks target FLAIR.nii.gz" in err
    assert not (run / "stage1").exists()


def test_too_few_subjects_for_the_planned_split(tmp_path, capsys):
    data = _folder(tmp_path / "data", subjects=3)
    run = tmp_path / "run"
    assert main(["fit", "--data", str(data), "--source", "T1", "--target", "FLAIR", "--out", str(run)]) == 2
    assert "3 subject(s) found, but the split" in capsys.readouterr().err
    assert not (run / "stage1").exists()


def test_the_recipe_runs_on_a_dataset_plugin_with_its_own_splits(tmp_path):
    """The built-in icbm152 (generated subjects, no files to fingerprint) with an explicit plan, as a benchmark
    calls the recipe: its own train/val/test subjects, scored against the target and the clean target."""
    from lift3d.recipes.fit import FitRequest, fit

    plan = TINY.model_copy(update={"stage2_variants": [StageTwoVariant()], "solver_samples": [1]})
    results = fit(FitRequest(out=tmp_path / "run", source="T1", target="T2", dataset="icbm152", plan=plan,
                             options={"num_train": 2, "num_val": 1, "num_test": 2, "voxel_mm": 8}, log=lambda _: None))
    assert results["split"] == {"train": ["train-00", "train-01"], "val": ["val-00"], "test": ["test-00", "test-01"]}
    assert "clean_target" in results["methods"]["lifted"]
    assert (tmp_path / "run" / "model" / "lift3d_fit.json").is_file()


@pytest.mark.parametrize("problem", ["missing folder", "corrupt file"])
def test_a_refused_fit_leaves_no_run_folder(tmp_path, capsys, problem):
    data = tmp_path / "data"
    if problem == "corrupt file":
        _folder(data, subjects=3)
        (data / "sub-01" / "T1.nii.gz").write_bytes(b"not a nifti")
    run = tmp_path / "run"
    assert main(["fit", "--data", str(data), "--source", "T1", "--target", "FLAIR", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("dataset folder not found" in err) if problem == "missing folder" else ("sub-01/T1.nii.gz" in err)
    assert not run.exists()
