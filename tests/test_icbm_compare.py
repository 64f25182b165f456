"""benchmarks/icbm_compare.py: methods of two ICBM benchmark runs pair by test subject."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def compare():
    with benchmark_module("icbm_compare") as module:
        yield module


def report(path: Path, psnr: list[float], subjects=("test-00", "test-01", "test-02")) -> Path:
    rows = [{"subject": s, "psnr": p, "ssim": 0.9, "mae": 10.0, "z_inconsistency": 0.5} for s, p in zip(subjects, psnr)]
    summary = {m: {"mean": sum(r[m] for r in rows) / len(rows)} for m in ("psnr", "ssim", "z_inconsistency")}
    method = {"sampler": "DDIM-200", "seconds_per_volume": 1.0, "subjects": rows, "summary": summary,
              "clean_target": {"subjects": rows}, "model": "runs/x/stage2/model"}
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = {"lifted": method, "3d-unet": {**method, "sampler": "one pass", "model": "baseline"}}
    path.write_text(json.dumps({"methods": methods, "data": {"test_subjects": list(subjects)},
                                "settings": {"grid": "48 x 48 x 24", "unet": "u"},
                                "timing": {"stage1_s": 60.0, "stage2_s": 120.0, "baseline_s": 30.0}}))
    return path


def test_two_runs_pair_by_subject(compare, tmp_path, capsys):
    a = report(tmp_path / "a" / "results.json", [20.0, 21.0, 22.0])
    b = report(tmp_path / "b" / "results.json", [21.0, 21.5, 22.0])
    out = tmp_path / "cmp.json"
    assert compare.main(["--pair", f"{b}:lifted", f"{a}:lifted", "--pair", f"{b}:lifted", f"{a}:3d-unet",
                         "--out", str(out)]) == 0
    row, against_unet = json.loads(out.read_text())["comparisons"]
    assert row["target"]["psnr"]["per_subject"] == {"test-00": 1.0, "test-01": 0.5, "test-02": 0.0}
    assert row["sides"]["b:lifted"]["training_min"] == 3.0  # stages 1 and 2
    assert against_unet["sides"]["a:3d-unet"]["training_min"] == 0.5  # the 3D U-Net's own training
    assert "b:lifted - a:lifted" in capsys.readouterr().out


def test_other_subjects_or_methods_are_one_line(compare, tmp_path, capsys):
    a = report(tmp_path / "a" / "results.json", [20.0, 21.0, 22.0])
    b = report(tmp_path / "b" / "results.json", [20.0, 21.0, 22.0], subjects=("test-00", "test-01", "test-09"))
    assert compare.main(["--pair", f"{b}:lifted", f"{a}:lifted"]) == 2
    assert "different test subjects" in capsys.readouterr().err
    assert compare.main(["--pair", f"{a}:nope", f"{a}:lifted"]) == 2
    assert "valid: lifted" in capsys.readouterr().err
