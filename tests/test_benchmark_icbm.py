"""benchmarks/icbm.py: the ICBM protocol through the fit recipe, its plan, and the whole benchmark at smoke scale.

The end-to-end test needs the ICBM 152 2009c files (``shared/data/icbm152-2009c`` next to the checkout, or
``LIFT3D_ICBM_DIR``) and is skipped without them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import benchmark_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "icbm.py"


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("icbm") as module:
        yield module


def test_the_protocol_plan_is_the_published_one(bench):
    plan = bench.protocol_plan("cpu", "flow", 0, True)
    assert (plan.size, plan.num_slices, plan.widths, plan.objective, plan.baseline) == (48, 24, [16, 32, 64], "flow",
                                                                                         True)
    assert (plan.stage1_steps, plan.stage1_batch, plan.stage2_steps, plan.stage2_val_every) == (2000, 16, 1200, 150)
    assert [v.overrides() for v in plan.stage2_variants] == [
        {"kind": "full"}, {"kind": "full", "learning_rate": 4e-3, "lr_scheduler": "cosine"}]
    assert plan.evaluation_budget == 8 and plan.distill == ["direct"] and plan.distill_student_steps == [1]
    assert (plan.distill_steps, plan.distill_lr) == (800, 5e-4)


def test_same_source_and_target_is_refused(bench, capsys):
    with pytest.raises(SystemExit) as excinfo:
        bench.parse_args(["--source", "T2", "--target", "T2"])
    assert excinfo.value.code == 2 and "both T2" in capsys.readouterr().err


def test_missing_data_is_one_clear_error(bench, tmp_path, capsys):
    code = bench.main(["--data", str(tmp_path / "nowhere"), "--scale", "smoke", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the whole protocol at the smoke scale: about 2 minutes
def test_smoke_run_end_to_end(bench, tmp_path):
    folder = Path(os.environ.get("LIFT3D_ICBM_DIR") or bench.DEFAULT_DATA)
    if not all((folder / name).is_file() for name in bench.TEMPLATE_FILES.values()):
        pytest.skip(f"the 1 mm ICBM files are not in {folder}; set LIFT3D_ICBM_DIR")
    out = tmp_path / "icbm"
    env = {**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1"}
    completed = subprocess.run([sys.executable, str(SCRIPT), "--scale", "smoke", "--data", str(folder), "--out",
                                str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    methods = report["methods"]
    assert {"slice-wise-fast", "lifted-fast", "lifted-k2", "3d-unet"} <= set(methods)
    few = [name for name in methods if name.endswith("pass")]
    assert len(few) == 1 and methods[few[0]]["unet_evaluations"] <= 2  # the distilled student
    tests = [f"test-{i:02d}" for i in range(6)]
    for name, entry in methods.items():
        assert [row["subject"] for row in entry["subjects"]] == tests, name
        row = entry["subjects"][0]
        assert all(math.isfinite(row[k]) for k in ("psnr", "ssim", "mae", "z_inconsistency", "dice_mean")), name
        assert "dice_mean" in entry["summary"] and "clean_target" in entry
    for name in ("lifted-fast", "3d-unet", few[0]):  # timed in the same run, one subject at a time
        assert methods[name]["seconds_per_volume"] > 0
    assert methods["lifted-k2"]["uncertainty"]["subjects"] == 6  # the std map against the error, K >= 2
    assert report["split"]["val"] == ["val-00", "val-01", "val-02"]
    assert {"choose_stage2", "choose_solver", "choose_student"} <= set(report["selection"])
    assert [row["evaluations"] for row in report["frontier"]] == [1, 2]
    paired = report["paired_differences"][f"{few[0]} vs 3d-unet"]
    assert paired["target"]["psnr"]["n"] == 6 and "clean_target" in paired
    assert set(report["goals"]["checks"]) >= {"PSNR >= 3d-unet", "tissue Dice >= 3d-unet", "seconds <= 2x 3d-unet"}
    assert (out / "report.html").is_file() and (out / "model" / "README.md").is_file()


def test_the_winner_joins_the_published_protocol_rows(bench, tmp_path, monkeypatch):
    """``--publish``: the 1- or 2-pass winner becomes a row of icbm_cpu.json, with its seconds timed beside the 3D
    U-Net of the same run and its paired differences against the published rows; an earlier winner's row goes."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    summary = {"psnr": {"mean": 24.0}}
    published = {"methods": {"lifted-k8": {"summary": summary}, "lifted-fast": {"summary": summary},
                             "3d-unet": {"summary": summary, "seconds_per_volume": 0.3},
                             "lifted-1pass": {"summary": summary}},
                 "paired_differences": {"lifted-1pass vs 3d-unet": {}, "lifted-fast vs 3d-unet": {"kept": True}}}
    (tmp_path / "icbm_cpu.json").write_text(json.dumps(published))
    row = {"solver": "flow-1, mean of 2 antithetic", "summary": summary, "seconds_per_volume": 0.45,
           "unet_evaluations": 2, "subjects": []}
    report = {"direction": "T1 -> T2", "scale": "cpu", "command": "python benchmarks/icbm.py --scale cpu --publish",
              "machine": {"cpu": "a CPU"}, "total_s": 120.0, "phases_s": {"stage1": 700.0},
              "selection": {"choose_student": {"chosen": {"family": "direct"}}},
              "methods": {"lifted-2pass": row, "3d-unet": {"solver": "one pass", "summary": summary,
                                                           "seconds_per_volume": 0.25},
                          "lifted-fast": {"solver": "flow-4, mean of 2", "summary": summary,
                                          "seconds_per_volume": 2.0}},
              "paired_differences": {"lifted-2pass vs 3d-unet": {"same run": True},
                                     "lifted-2pass vs published 3d-unet": {"published": True},
                                     "lifted-2pass vs published lifted-fast": {"published": True}}}
    path = bench.publish_winner(report, "lifted-2pass")
    data = json.loads(path.read_text())
    assert "lifted-1pass" not in data["methods"] and "lifted-1pass vs 3d-unet" not in data["paired_differences"]
    new = data["methods"]["lifted-2pass"]
    assert new["unet_evaluations"] == 2 and new["seconds_per_volume_timed"] == 0.45 and "direct" in new["label"]
    assert data["methods"]["3d-unet"]["seconds_per_volume_same_run_as_lifted_2pass"] == 0.25
    assert data["methods"]["3d-unet"]["seconds_per_volume"] == 0.3  # the published row's own time stays
    assert new["frontier_run"]["references_in_that_run"]["3d-unet"]["seconds_per_volume"] == 0.25
    assert new["frontier_run"]["paired_differences"] == {"lifted-2pass vs 3d-unet": {"same run": True}}
    assert new["frontier_run"]["report"] == "icbm_recipe_cpu.json" and new["frontier_run"]["run_s"] == 120.0
    assert data["paired_differences"]["lifted-2pass vs 3d-unet"] == {"published": True}
    assert data["paired_differences"]["lifted-fast vs 3d-unet"] == {"kept": True}
