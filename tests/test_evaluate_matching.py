"""``lift3d-evaluate --pred DIR`` pairs lift3d-synthesize's ``<name>_synth.nii.gz`` with their targets, masks
and std maps (issue 31, item 4): in a flat folder, in a paired-nifti layout, or as one file; what is not
matched is named in one line. Pairing is checked by scores: each prediction equals its own target (MAE 0),
so a prediction paired with another subject's target would score above 0."""

from __future__ import annotations

import csv
import re

import nibabel as nib
import numpy as np
import pytest
from test_cli_synthesize import model_folder, write_source  # noqa: F401 (model_folder: a fixture)

from lift3d.cli._common import OUTPUT_SUFFIX, STD_DIR, STD_SUFFIX
from lift3d.cli.evaluate import main as evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (10, 12, 8)
# sub-1 and sub-10 sort differently as "sub-1/T2.nii.gz" < "sub-10/T2.nii.gz" and "sub-10_synth" < "sub-1_synth":
# pairing by command-line order would swap them.
SUBJECTS = ("sub-1", "sub-10")


def volume(path, seed=0, value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).normal(100, 20, SHAPE) if value is None else np.full(SHAPE, value)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def scores(out):
    with open(out / "metrics.csv", newline="") as handle:
        return {row["subject"]: row for row in csv.DictReader(handle)}


def run(argv, capsys):
    code = evaluate([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def paired(tmp_path):
    """A paired-nifti folder (data/<subject>/T1, T2, brainmask) and the fit recipe's predictions of it
    (synth/<subject>_synth.nii.gz, its std map beside it)."""
    for seed, subject in enumerate(SUBJECTS):
        volume(tmp_path / "data" / subject / "T1.nii.gz", seed + 10)
        volume(tmp_path / "data" / subject / "T2.nii.gz", seed)
        volume(tmp_path / "data" / subject / "brainmask.nii.gz", value=1.0)
        volume(tmp_path / "synth" / f"{subject}{OUTPUT_SUFFIX}", seed)
        volume(tmp_path / "synth" / f"{subject}_synth_std.nii.gz", value=0.5)
    return tmp_path


@pytest.mark.parametrize("layout", ["glob", "pattern"])
def test_predictions_of_a_paired_nifti_folder_are_matched_by_subject(paired, capsys, layout):
    data = paired / "data"
    if layout == "glob":  # what the shell gives for data/*/T2.nii.gz
        target = [data / s / "T2.nii.gz" for s in SUBJECTS]
        mask = [data / s / "brainmask.nii.gz" for s in SUBJECTS]
    else:
        target, mask = [f"{data}/{{name}}/T2.nii.gz"], [f"{data}/{{name}}/brainmask.nii.gz"]
    code, out, err = run(["--pred", paired / "synth", "--target", *target, "--mask", *mask, "--out", paired / "o"],
                         capsys)
    assert code == 0, err
    rows = scores(paired / "o")
    assert set(rows) == {f"{s}_synth" for s in SUBJECTS}  # the std maps beside them are not predictions
    for subject in SUBJECTS:
        row = rows[f"{subject}_synth"]
        assert row["target"] == str(data / subject / "T2.nii.gz") and float(row["mae"]) == 0.0
        assert row["mask"] == str(data / subject / "brainmask.nii.gz")
    assert "2 std map(s) beside the predictions are not scored as predictions" in out


def test_a_paired_folder_given_as_a_directory_says_which_file_to_name(paired, capsys):
    code, _, err = run(["--pred", paired / "synth", "--target", paired / "data", "--out", paired / "o"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert (f"target directory {paired / 'data'} holds a folder sub-10/ for prediction sub-10{OUTPUT_SUFFIX} (files: "
            "T1.nii.gz, T2.nii.gz, brainmask.nii.gz); say which file is the target") in err
    assert f"--target '{paired / 'data'}/{{name}}/T1.nii.gz'" in err and not (paired / "o").exists()


def test_synthesize_then_evaluate_folder_to_folder_and_one_file(model_folder, tmp_path, capsys):  # noqa: F811
    """The README's chain: lift3d-synthesize --out synth, then lift3d-evaluate --pred synth with a folder of
    targets and of masks named like the sources, or with the one target file of the one prediction."""
    from lift3d.cli.synthesize import main as synthesize

    for folder in ("src", "targets", "masks"):
        (tmp_path / folder).mkdir()
    for seed, name in enumerate(("a", "b")):
        write_source(tmp_path / "src" / f"{name}.nii.gz", seed=seed)
        write_source(tmp_path / "targets" / f"{name}.nii.gz", seed=seed + 5)
        write_source(tmp_path / "masks" / f"{name}.nii.gz", seed=seed)
    code = synthesize(["--model", str(model_folder), "--source", str(tmp_path / "src"),
                       "--out", str(tmp_path / "synth"), "--steps", "2", "--samples", "2"])
    assert code == 0, capsys.readouterr().err
    code, _, err = run(["--pred", tmp_path / "synth", "--target", tmp_path / "targets", "--mask", tmp_path / "masks",
                        "--std", tmp_path / "synth" / STD_DIR, "--out", tmp_path / "scores"], capsys)
    assert code == 0, err
    rows = scores(tmp_path / "scores")
    assert [rows[f"{n}_synth"]["target"] for n in "ab"] == [str(tmp_path / "targets" / f"{n}.nii.gz") for n in "ab"]
    assert [rows[f"{n}_synth"]["std"] for n in "ab"] == [str(tmp_path / "synth" / STD_DIR / f"{n}{STD_SUFFIX}")
                                                         for n in "ab"]
    one = tmp_path / "one"
    assert synthesize(["--model", str(model_folder), "--source", str(tmp_path / "src" / "a.nii.gz"), "--out", str(one),
                       "--steps", "2"]) == 0
    code, _, err = run(["--pred", one, "--target", tmp_path / "targets" / "a.nii.gz", "--mask",
                        tmp_path / "masks" / "a.nii.gz", "--out", tmp_path / "one-scores"], capsys)
    assert code == 0, err
    assert scores(tmp_path / "one-scores")["a_synth"]["target"] == str(tmp_path / "targets" / "a.nii.gz")


def test_what_is_not_matched_is_named_in_one_line(paired, capsys):
    synth, data = paired / "synth", paired / "data"
    flat = paired / "flat"
    volume(flat / "sub-1.nii.gz")
    cases = [
        (["--target", flat], rf"target directory {re.escape(str(flat))} has no file for prediction "
                             r"sub-10_synth\.nii\.gz \(looked for sub-10_synth\.nii\.gz, sub-10\.nii\.gz, "
                             r"sub-10\.nii\)"),
        (["--target", data / "sub-1" / "T2.nii.gz", data / "sub-1" / "T1.nii.gz"],
         r"2 --target files match prediction sub-1_synth\.nii\.gz: .*T2\.nii\.gz, .*T1\.nii\.gz; give one per "
         r"prediction"),
        (["--target", data / "sub-1" / "T2.nii.gz", flat / "sub-1.nii.gz"],
         r"2 --target files match prediction sub-1_synth\.nii\.gz"),
        (["--target", *(data / s / "T2.nii.gz" for s in SUBJECTS), "--mask", data / "sub-1" / "brainmask.nii.gz",
          data / "sub-1" / "T1.nii.gz"], r"2 --mask files match prediction sub-1_synth\.nii\.gz"),
        (["--target", f"{data}/{{name}}/T3.nii.gz"],
         rf"target file not found: {re.escape(str(data))}/sub-10/T3\.nii\.gz"),
    ]
    for extra, message in cases:
        code, _, err = run(["--pred", synth, *extra, "--out", paired / "o"], capsys)
        assert code == 2 and err.count("\n") == 1 and re.search(message, err), (extra, err)
    only = paired / "only"
    volume(only / f"x{OUTPUT_SUFFIX}")
    volume(only / f"y{OUTPUT_SUFFIX}")
    code, _, err = run(["--pred", only, "--target", data / "sub-1" / "T2.nii.gz", "--out", paired / "o"], capsys)
    assert code == 2 and re.search(r"no --target file is named for 2 prediction\(s\): x_synth\.nii\.gz, "
                                   r"y_synth\.nii\.gz", err), err
    assert not (paired / "o").exists()
