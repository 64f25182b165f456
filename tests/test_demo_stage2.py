"""benchmarks/demo_stage2.py: the demo's stage-2 schedules, scored on the demo's validation subjects."""

from __future__ import annotations

import json

import pytest

import lift3d.recipes.demo
from lift3d.recipes.demo import SCALES, demo_config
from lift3d.training.loop import train
from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("demo_stage2") as module:
        yield module


@pytest.mark.parametrize("schedule, needle", [("2e-3", "is not LR:SCHEDULER"), ("fast:cosine", "is not LR:SCHEDULER"),
                                              ("2e-3:bogus", "choose one of")])
def test_bad_schedule_is_one_line_and_exit_2(bench, tmp_path, capsys, schedule, needle):
    assert bench.main(["--stage1", str(tmp_path), "--schedule", schedule, "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "r.json").exists()


def test_missing_stage1_is_refused(bench, tmp_path, capsys):
    assert bench.main(["--stage1", str(tmp_path / "nope")]) == 2
    assert "not a trained lift3d stage 1" in capsys.readouterr().err


def test_schedules_are_scored_and_the_best_chosen(bench, tmp_path, monkeypatch, capsys):
    quick = SCALES["icbm152"]["quick"]
    stage1 = train(demo_config(tmp_path / "demo", quick, "slices", 0))
    monkeypatch.setitem(lift3d.recipes.demo.SCALES["icbm152"], "default", quick)  # seconds, not the demo's 600 steps
    out = tmp_path / "report.json"
    assert bench.main(["--stage1", str(stage1), "--out", str(tmp_path / "s2"), "--schedule", "2e-3:constant",
                       "--schedule", "4e-3:cosine", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["learning_rate"], r["lr_scheduler"]) for r in report["runs"]] == [(2e-3, "constant"), (4e-3, "cosine")]
    for run in report["runs"]:
        steps = [row["step"] for row in run["validation_curve"]]
        assert steps == list(range(quick.stage2_steps + 1))  # step 0 (the stage-1 model) included
        assert run["best"]["val_psnr"] == max(row["val_psnr"] for row in run["validation_curve"])
        recorded = json.loads((tmp_path / "s2" / f"{run['lr_scheduler']}-{run['learning_rate']:g}" / "model"
                               / "lift3d_training.json").read_text())["config"]["optim"]
        assert (recorded["learning_rate"], recorded["lr_scheduler"]) == (run["learning_rate"], run["lr_scheduler"])
    best = max(report["runs"], key=lambda r: r["best"]["val_psnr"])
    assert report["chosen"] == {"learning_rate": best["learning_rate"], "lr_scheduler": best["lr_scheduler"]}
    assert "chosen: lr" in capsys.readouterr().out
