"""The CSV files lift3d writes are safe to open in a spreadsheet, and a resumed run's log has no repeated row
(issue 33, items 7-8): a text cell that starts like a formula (``=``, ``+``, ``-``, ``@``, tab, CR) is
prefixed with a quote, while numbers, negative ones included, stay numbers."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np

from lift3d.cli.evaluate import main as evaluate
from lift3d.io.tables import FORMULA_STARTS, spreadsheet_safe
from lift3d.training.tracking import CSVTracker, drop_rows_after

HOSTILE = ["=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2", "@SUM(A1)", "\tcmd", "=cmd|' /C calc'!A0"]


def raw_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_the_rule_neutralises_text_only():
    for text in HOSTILE + ["\rx"]:
        assert spreadsheet_safe(text) == "'" + text
    for value in (-0.5, -3, 1e-9, None, "plain", "sub-01", "'already quoted", ""):
        assert spreadsheet_safe(value) == value
    assert set(FORMULA_STARTS) == {"=", "+", "-", "@", "\t", "\r"}


def test_subject_names_from_file_names_are_neutralised_in_metrics_csv(tmp_path, capsys):
    pred, target = tmp_path / "pred", tmp_path / "target"
    pred.mkdir(), target.mkdir()
    names = ["=HYPERLINK(1)", "+1+1", "-2", "@SUM(1)"]
    rng = np.random.default_rng(0)
    for name in names:
        data = rng.normal(100, 20, (8, 8, 7)).astype(np.float32)
        for folder, values in ((pred, data + 1), (target, data)):
            nib.save(nib.Nifti1Image(values, np.eye(4)), folder / f"{name}.nii.gz")
    out = tmp_path / "out"
    assert evaluate(["--pred", str(pred), "--target", str(target), "--out", str(out)]) == 0, capsys.readouterr().err
    header, *rows = raw_rows(out / "metrics.csv")
    assert sorted(row[0] for row in rows) == sorted("'" + name for name in names)
    for row in rows:
        cells = dict(zip(header, row))
        assert float(cells["mae"]) > 0 and float(cells["psnr"]) > 0  # numbers stay numbers
        assert cells["prediction"].startswith(str(pred))  # an absolute path is not a formula
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(f"{n}.png" for n in names)


def test_the_training_log_neutralises_text_and_keeps_negative_numbers(tmp_path):
    tracker = CSVTracker("logs", tmp_path)
    tracker.log({"loss": -0.5, "lr": np.float32(-1e-3), "note": HOSTILE[-1], "tag": "@x", "plain": "ok"}, step=1)
    tracker.log({"loss": -0.25, "label": "+1"}, step=2)  # a new column: the file is rewritten wider
    header, first, second = raw_rows(tracker.path)
    assert header == ["step", "loss", "lr", "note", "tag", "plain", "label"]
    assert first == ["1", "-0.5", "-0.001", "'" + HOSTILE[-1], "'@x", "ok", ""]
    assert second == ["2", "-0.25", "", "", "", "", "'+1"]


def test_a_row_logged_again_after_a_resume_past_export_is_not_repeated(tmp_path):
    """A run that exported at step 4 logged its final validation at step 4; resumed from checkpoint 4
    (past its export), it logs that validation again. The row is replaced, not repeated; rows of one
    run are never merged, and a resume from an earlier step still drops the later rows first."""
    first = CSVTracker("logs", tmp_path)
    first.log({"val_loss": 0.9}, step=0)
    first.log({"loss": 0.5, "lr": 1e-4}, step=4)
    first.log({"val_loss": 0.4}, step=4)  # the final validation
    path = first.path
    drop_rows_after(path, 4)  # what the loop does on resume from checkpoint-4
    resumed = CSVTracker("logs", tmp_path)
    resumed.log({"val_loss": 0.35}, step=4)  # exported again, from the EMA
    assert raw_rows(path) == [["step", "val_loss", "loss", "lr"], ["0", "0.9", "", ""], ["4", "", "0.5", "0.0001"],
                              ["4", "0.35", "", ""]]
    resumed.log({"val_loss": 0.3}, step=4)  # the same run twice at one step: both rows kept
    assert [row[:2] for row in raw_rows(path)[1:]] == [["0", "0.9"], ["4", ""], ["4", "0.35"], ["4", "0.3"]]
    drop_rows_after(path, 0)  # a resume from step 0 drops the later rows; they are logged once again
    again = CSVTracker("logs", tmp_path)
    again.log({"loss": 0.6, "lr": 1e-4}, step=4)
    assert raw_rows(path)[1:] == [["0", "0.9", "", ""], ["4", "", "0.6", "0.0001"]]
