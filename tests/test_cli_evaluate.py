"""Tests for lift3d/cli/evaluate.py (``lift3d-evaluate``) on tiny NIfTI files."""

from __future__ import annotations

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest

from lift3d.cli.evaluate import main
from lift3d.evaluation.metrics import INTENSITY_RULE, METRICS, evaluate_volumes

# Canonical RAS storage (x, y, z); with --slice-axis axial the volume becomes (z, y, x) = (8, 12, 10).
RAS_SHAPE = (10, 12, 8)
RAS_AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def phantom(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in RAS_SHAPE), indexing="ij")
    return (100 * np.exp(-(x**2 + y**2 + z**2)) + 40 * (x > 0.3) + rng.normal(0, 2, RAS_SHAPE)).astype(np.float32)


def save(path, data, affine=RAS_AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), path)
    return str(path)


def axial_view(ras: np.ndarray) -> np.ndarray:
    """(x, y, z) RAS -> (z, y, x): what the CLI evaluates for --slice-axis axial."""
    return np.transpose(ras, (2, 1, 0))


@pytest.fixture
def pair_files(tmp_path):
    """Two subjects: predictions with per-slice offsets, targets, one shared mask, sources."""
    rng = np.random.default_rng(0)
    files = {"pred": [], "target": [], "source": [], "arrays": []}
    for index, name in enumerate(("sub-01", "sub-02")):
        target = phantom(index)
        pred = target + rng.normal(0, 5, (1, 1, RAS_SHAPE[2])).astype(np.float32)
        files["pred"].append(save(tmp_path / f"{name}_pred.nii.gz", pred))
        files["target"].append(save(tmp_path / f"{name}_t2.nii.gz", target))
        files["source"].append(save(tmp_path / f"{name}_t1.nii.gz", 200 - target))
        files["arrays"].append((pred, target))
    mask = np.zeros(RAS_SHAPE, dtype=np.float32)
    mask[1:-1, 1:-1, 1:-1] = 1
    files["mask"] = save(tmp_path / "mask.nii.gz", mask)
    files["mask_array"] = mask > 0
    return files


def read_outputs(out):
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, json.loads((out / "summary.json").read_text())


def test_file_pairs_write_csv_json_and_figures(tmp_path, pair_files, capsys):
    out = tmp_path / "out"
    argv = ["--pred", *pair_files["pred"], "--target", *pair_files["target"], "--mask", pair_files["mask"],
            "--source", *pair_files["source"], "--out", str(out)]
    assert main(argv) == 0
    rows, summary = read_outputs(out)
    assert [row["subject"] for row in rows] == ["sub-01_pred", "sub-02_pred"]
    mask = axial_view(pair_files["mask_array"])
    for row, (pred, target) in zip(rows, pair_files["arrays"]):
        expected = evaluate_volumes(axial_view(pred), axial_view(target), mask)
        for name in METRICS:
            assert float(row[name]) == pytest.approx(expected[name], rel=1e-5)
        assert row["mask"] == pair_files["mask"]
    for name in METRICS:
        values = [float(row[name]) for row in rows]
        assert summary["metrics"][name]["mean"] == pytest.approx(np.mean(values))
        assert summary["metrics"][name]["std"] == pytest.approx(np.std(values))
        assert summary["metrics"][name]["n"] == 2
    assert summary["intensity_scale"] == INTENSITY_RULE and summary["data_range"] == 255
    assert summary["n_subjects"] == 2 and summary["slice_axis"] == "axial"
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["sub-01_pred.png", "sub-02_pred.png"]
    assert sorted(p.name for p in out.iterdir()) == ["figures", "metrics.csv", "summary.json"]  # no staging left
    assert "mae" in capsys.readouterr().out


def test_directories_are_matched_by_file_name_and_perfect_psnr_is_inf(tmp_path):
    pred_dir, target_dir, out = tmp_path / "pred", tmp_path / "target", tmp_path / "out"
    pred_dir.mkdir(), target_dir.mkdir()
    for index, name in enumerate(("b.nii.gz", "a.nii")):
        save(pred_dir / name, phantom(index))
        save(target_dir / name, phantom(index))
    save(target_dir / "unpredicted.nii.gz", phantom(5))  # targets without a prediction are ignored
    assert main(["--pred", str(pred_dir), "--target", str(target_dir), "--out", str(out)]) == 0
    rows, summary = read_outputs(out)
    assert [row["subject"] for row in rows] == ["a", "b"]
    assert all(float(row["mae"]) == 0.0 and row["psnr"] == "inf" for row in rows)
    assert summary["metrics"]["psnr"]["mean"] == "inf" and summary["metrics"]["psnr"]["std"] == "nan"
    assert summary["metrics"]["ssim"]["mean"] == pytest.approx(1.0)


def test_std_maps_from_synthesize_are_found_scored_and_drawn(tmp_path):
    """lift3d-synthesize --samples K writes <name>_synth.nii.gz and std/<name>_std.nii.gz; --std DIR finds them.
    A std map that grows with the error ranks it (Spearman 1); one that does not, does not."""
    from lift3d.cli._common import OUTPUT_SUFFIX, STD_DIR, STD_SUFFIX
    from lift3d.evaluation.metrics import uncertainty_scores

    synth, target_dir = tmp_path / "synth", tmp_path / "target"
    (synth / STD_DIR).mkdir(parents=True), target_dir.mkdir()
    target = phantom(0)
    error = np.abs(np.random.default_rng(1).normal(0, 5, RAS_SHAPE)).astype(np.float32)
    save(synth / f"good{OUTPUT_SUFFIX}", target + error)
    save(synth / f"flat{OUTPUT_SUFFIX}", target + error)
    save(target_dir / f"good{OUTPUT_SUFFIX}", target)
    save(target_dir / f"flat{OUTPUT_SUFFIX}", target)
    save(synth / STD_DIR / f"good{STD_SUFFIX}", 2 * error)
    save(synth / STD_DIR / f"flat{STD_SUFFIX}", np.ones(RAS_SHAPE))
    out = tmp_path / "out"
    assert main(["--pred", str(synth), "--target", str(target_dir), "--std", str(synth / STD_DIR), "--out", str(out)]) == 0
    rows, summary = read_outputs(out)
    by_name = {row["subject"]: row for row in rows}
    good, flat = by_name["good_synth"], by_name["flat_synth"]
    assert float(good["std_error_spearman"]) > 0.99 and float(flat["std_error_spearman"]) == 0.0
    scale = 255 / (target.max() - target.min())
    assert float(flat["std_mean"]) == pytest.approx(scale, rel=1e-5)  # std x 255 / the target's range
    expected = uncertainty_scores(axial_view(2 * error), axial_view(target + error), axial_view(target))
    assert float(good["std_mean"]) == pytest.approx(expected["std_mean"], rel=1e-5)
    assert good["std"].endswith(f"good{STD_SUFFIX}")
    assert summary["higher_is_better"]["std_error_spearman"] is True and summary["metrics"]["std_mean"]["n"] == 2
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["flat_synth.png", "good_synth.png"]
    # lift3d demo's naming: synthesis/<subject>_lifted.nii.gz, synthesis/std/<subject>_lifted_std.nii.gz
    from pathlib import Path

    from lift3d.cli._matching import std_candidates
    assert std_candidates(Path("test-00_lifted.nii.gz"))[-1] == "test-00_lifted_std.nii.gz"
    assert std_candidates(Path(f"a{OUTPUT_SUFFIX}"))[1] == f"a{STD_SUFFIX}"
    # without --std the columns are absent
    assert main(["--pred", str(synth), "--target", str(target_dir), "--out", str(tmp_path / "plain")]) == 0
    assert "std_mean" not in read_outputs(tmp_path / "plain")[0][0]


def test_orientation_is_canonicalised_before_comparing(tmp_path):
    target = phantom(0)
    # The same image stored L-P-S: data flipped in x and y, affine flipped to match.
    lps_affine = RAS_AFFINE.copy()
    lps_affine[:2, :2] *= -1
    lps_affine[:2, 3] = [RAS_SHAPE[0] - 1, RAS_SHAPE[1] - 1]
    target_lps = save(tmp_path / "t.nii.gz", target[::-1, ::-1, :], lps_affine)
    pred = save(tmp_path / "p.nii.gz", target)
    assert main(["--pred", pred, "--target", target_lps, "--out", str(tmp_path / "out")]) == 0
    rows, _ = read_outputs(tmp_path / "out")
    assert float(rows[0]["mae"]) == 0.0


def test_slice_axis_chooses_the_direction_of_z_inconsistency(tmp_path):
    target = phantom(0)
    rng = np.random.default_rng(1)
    # Offsets that change from one sagittal (x) slice to the next: striping seen along x only.
    pred = save(tmp_path / "p.nii.gz", target + rng.normal(0, 8, (RAS_SHAPE[0], 1, 1)))
    target_file = save(tmp_path / "t.nii.gz", target)
    scores = {}
    for axis in ("axial", "sagittal"):
        out = tmp_path / axis
        assert main(["--pred", pred, "--target", target_file, "--slice-axis", axis, "--out", str(out)]) == 0
        rows, summary = read_outputs(out)
        assert summary["slice_axis"] == axis
        scores[axis] = rows[0]
    assert float(scores["sagittal"]["z_inconsistency"]) > 2 * float(scores["axial"]["z_inconsistency"])
    assert float(scores["sagittal"]["mae"]) == pytest.approx(float(scores["axial"]["mae"]))


def test_a_trailing_singleton_axis_is_accepted(tmp_path):
    target = phantom(0)
    pred = save(tmp_path / "p.nii.gz", (target + 1)[..., None])
    assert main(["--pred", pred, "--target", save(tmp_path / "t.nii.gz", target), "--out", str(tmp_path / "o")]) == 0


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--pred", "--target", "--mask", "--source", "--std", "--slice-axis", "--report", "--out"):
        assert option in text
    for phrase in ("axial,coronal,sagittal", "[0, 255]", "metrics.csv", "summary.json", "z_inconsistency",
                   "through_plane_mae", "ms_ssim", "176 voxels", "report.html"):
        assert phrase in text


def bad_case(tmp_path, case):
    """Build the files for one bad-input case; return (argv without --out, expected message regex)."""
    good_t = save(tmp_path / "t.nii.gz", phantom(0))
    good_p = save(tmp_path / "p.nii.gz", phantom(1))
    if case == "missing prediction":
        return ["--pred", str(tmp_path / "nope.nii.gz"), "--target", good_t], r"prediction file not found: .*nope\.nii\.gz"
    if case == "missing target":
        return ["--pred", good_p, "--target", str(tmp_path / "gone.nii")], r"target file not found: .*gone\.nii"
    if case == "shape mismatch":
        other = save(tmp_path / "small.nii.gz", np.zeros((10, 12, 9)))
        return ["--pred", other, "--target", good_t], r"small\.nii\.gz has shape \(10, 12, 9\) but target .*t\.nii\.gz has shape \(10, 12, 8\)"
    if case == "shifted affine":
        far = np.diag([1.0, 1.0, 2.0, 1.0])
        far[:3, 3] = 1000.0
        moved = save(tmp_path / "moved.nii.gz", phantom(1), affine=far)
        return ["--pred", moved, "--target", good_t], (r"grid mismatch for subject 'moved': prediction .*moved\.nii\.gz "
                                                       r"lies elsewhere in space than target .* share 0%")
    if case == "2D image":
        flat = save(tmp_path / "flat.nii.gz", np.zeros((10, 12)))
        return ["--pred", flat, "--target", good_t], r"flat\.nii\.gz is not a 3D image: shape \(10, 12\)"
    if case == "4D image":
        series = save(tmp_path / "series.nii.gz", np.zeros((*RAS_SHAPE, 2)))
        return ["--pred", good_p, "--target", series], r"series\.nii\.gz is not a 3D image: shape \(10, 12, 8, 2\)"
    if case == "not nifti":
        junk = tmp_path / "junk.nii.gz"
        junk.write_bytes(b"not an image")
        return ["--pred", str(junk), "--target", good_t], r"cannot read prediction .*junk\.nii\.gz"
    if case == "count mismatch":
        return ["--pred", good_p, good_p, "--target", good_t], r"2 --pred files but 1 --target"
    if case == "mask count":
        argv = ["--pred", good_p, good_p, "--target", good_t, good_t, "--mask", good_t, good_t, good_t]
        return argv, r"3 --mask paths for 2 predictions; give 1 or 2, or a directory"
    if case == "negative std":
        std = save(tmp_path / "p_std.nii.gz", -np.ones(RAS_SHAPE))
        return ["--pred", good_p, "--target", good_t, "--std", std], r"subject 'p': std map .*p_std\.nii\.gz: std has \d+ negative"
    if case == "source directory lacks a file":
        (tmp_path / "pred").mkdir(), (tmp_path / "target").mkdir(), (tmp_path / "src").mkdir()
        save(tmp_path / "pred" / "s1.nii.gz", phantom(1))
        save(tmp_path / "target" / "s1.nii.gz", phantom(0))
        argv = ["--pred", str(tmp_path / "pred"), "--target", str(tmp_path / "target"), "--source", str(tmp_path / "src")]
        return argv, (r"source directory .*src has no file for prediction s1\.nii\.gz "
                      r"\(looked for s1\.nii\.gz, s1\.nii\)")
    raise AssertionError(case)


BAD_CASES = ["missing prediction", "missing target", "shape mismatch", "shifted affine", "2D image", "4D image", "not nifti",
             "count mismatch", "mask count", "negative std", "source directory lacks a file"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, case):
    argv, message = bad_case(tmp_path, case)
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "error:" in err
    assert re.search(message, err), err
    assert not out.exists()


def test_failure_on_a_later_subject_leaves_no_partial_output(tmp_path, capsys):
    good_t = save(tmp_path / "t.nii.gz", phantom(0))
    pred_a = save(tmp_path / "a.nii.gz", phantom(1))
    pred_b = save(tmp_path / "b.nii.gz", phantom(2))
    constant = save(tmp_path / "constant.nii.gz", np.ones(RAS_SHAPE))
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert main(["--pred", pred_a, pred_b, "--target", good_t, constant, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "subject 'b'" in err and "constant" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unwritable_output_path_is_reported(tmp_path, capsys):
    good_t = save(tmp_path / "t.nii.gz", phantom(0))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "out"):
        assert main(["--pred", good_t, "--target", good_t, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(blocker) in err and err.count("\n") == 1
    assert blocker.read_text() == ""


def test_plane_scores_are_columns_and_ms_ssim_of_a_small_volume_is_a_note(tmp_path, pair_files, capsys):
    """The per-plane, through-plane and MS-SSIM scores of lift3d.evaluation.planes, per subject, inside the mask;
    MS-SSIM of a 10 x 12 x 8 volume cannot be taken: an empty cell, null in the summary, one printed note."""
    from lift3d.evaluation.metrics import PLANE_METRICS
    from lift3d.evaluation.planes import evaluate_all

    out = tmp_path / "out"
    argv = ["--pred", *pair_files["pred"], "--target", *pair_files["target"], "--mask", pair_files["mask"], "--out", str(out)]
    assert main(argv) == 0
    rows, summary = read_outputs(out)
    mask = axial_view(pair_files["mask_array"])
    for row, (pred, target) in zip(rows, pair_files["arrays"]):
        expected = evaluate_all(axial_view(pred), axial_view(target), mask)
        for name in PLANE_METRICS:
            if name == "ms_ssim":
                assert row[name] == "" and expected[name] is None
            else:
                assert float(row[name]) == pytest.approx(expected[name], rel=1e-5)
    # an offset per axial slice: axial slices keep their structure, the through-plane views are striped
    assert all(float(r["ssim_axial"]) > float(r["ssim_coronal"]) for r in rows)
    assert summary["metrics"]["ms_ssim"] == {"mean": None, "std": None, "n": 0}
    assert summary["metrics"]["through_plane_correlation"]["n"] == 2
    assert summary["higher_is_better"]["through_plane_mae"] is False
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {summary['notes'][0]}"]
    assert re.fullmatch(r"note: ms_ssim not scored: volume \(8, 12, 10\) has an axis shorter than the 176 voxels .*; "
                        r"2 of 2 subjects", notes[0])
    assert re.search(r"ms_ssim +n/a", printed) and re.search(r"psnr_sagittal +\d+\.\d{4} \+/- ", printed)
    assert "report.html" not in printed and not (out / "report.html").exists()


def test_report_is_one_self_contained_page_with_every_subject(tmp_path, pair_files, capsys):
    out = tmp_path / "out"
    argv = ["--pred", *pair_files["pred"], "--target", *pair_files["target"], "--source", *pair_files["source"],
            "--report", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["figures", "metrics.csv", "report.html", "summary.json"]
    page = (out / "report.html").read_text()
    figures = re.findall(r'<figure id="views-([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in figures] == ["sub-01_pred", "sub-02_pred"]
    import base64
    for name, data in figures:  # the very PNGs of figures/
        assert base64.b64decode(data) == (out / "figures" / f"{name}.png").read_bytes()
    assert page.count("<li>ms_ssim") == 1 and "2 of 2 subjects" in page  # the CLI's note, not a second one
    assert 'id="table-planes"' in page and "http" not in page.replace("http-equiv", "")
    assert str(out / "report.html") in capsys.readouterr().out


def test_a_failing_subject_leaves_no_report(tmp_path, capsys):
    good_t = save(tmp_path / "t.nii.gz", phantom(0))
    constant = save(tmp_path / "constant.nii.gz", np.ones(RAS_SHAPE))
    out = tmp_path / "out"
    assert main(["--pred", save(tmp_path / "a.nii.gz", phantom(1)), good_t, "--target", good_t, constant,
                 "--report", "--out", str(out)]) == 2
    assert "constant" in capsys.readouterr().err and not out.exists()


# -- outputs appear whole or not at all (issue 33, item 8) ----------------------------------------------------


def test_outputs_of_an_earlier_run_do_not_stay_beside_new_results(tmp_path, pair_files):
    """The figures folder is replaced whole, and a report goes unless this run wrote one."""
    out = tmp_path / "out"
    assert main(["--pred", *pair_files["pred"], "--target", *pair_files["target"], "--report", "--out", str(out)]) == 0
    assert main(["--pred", pair_files["pred"][0], "--target", pair_files["target"][0], "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["figures", "metrics.csv", "summary.json"]
    assert [p.name for p in (out / "figures").iterdir()] == ["sub-01_pred.png"]
    assert [row["subject"] for row in read_outputs(out)[0]] == ["sub-01_pred"]


def test_a_failed_publication_keeps_every_earlier_result(tmp_path, pair_files, capsys, monkeypatch):
    import os

    out = tmp_path / "out"
    assert main(["--pred", *pair_files["pred"], "--target", *pair_files["target"], "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, failed = os.replace, []

    def full_disk(src, dst):  # the new summary cannot be put in place (once: putting the old one back works)
        if str(dst) == str(out / "summary.json") and not failed:
            failed.append(dst)
            raise OSError(28, "No space left on device", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    assert main(["--pred", pair_files["pred"][0], "--target", pair_files["target"][1], "--out", str(out)]) == 2
    monkeypatch.setattr(os, "replace", real)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lift3d-tmp" not in err and "earlier results" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # no new figure, no staging left


def test_labels_must_be_whole_numbers_in_the_segmenters_range(tmp_path, capsys):
    import torch

    from lift3d.evaluation.tissue_unet import TissueSegmenter

    torch.manual_seed(0)
    segmenter = TissueSegmenter.new(("csf", "gm", "wm"), context=1, block_out_channels=(8, 16)).save(tmp_path / "seg")
    target, pred = save(tmp_path / "t.nii.gz", phantom(0)), save(tmp_path / "p.nii.gz", phantom(1))
    labels = np.zeros(RAS_SHAPE, dtype=np.float32)
    labels[2:4] = 1
    for value, message in ((0.5, r"1 voxel\(s\) are not whole numbers \(e\.g\. 0\.5\)"),
                           (1.5, r"1 voxel\(s\) are not whole numbers \(e\.g\. 1\.5\)"),
                           (7.0, r"1 voxel\(s\) lie outside 0\.\.3 \(e\.g\. 7\)")):
        labels[5, 5, 5] = value
        path = save(tmp_path / "labels.nii.gz", labels)
        out = tmp_path / "out"
        assert main(["--pred", pred, "--target", target, "--segmenter", str(segmenter), "--labels", path,
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"labels {path}: " in err and re.search(message, err), err
        assert "valid: whole numbers 0 (background) to 3 (csf, gm, wm)" in err and not out.exists()
