"""benchmarks/train_curves.py at tiny size: all four runs on the phantom, and the JSON and figure the Training page reads."""

from __future__ import annotations

import json

import pytest

from tests.conftest import benchmark_module

TINY = ["--datasets", "phantom", "--steps1", "4", "--steps2", "4", "--log-every", "2", "--size", "16", "--slices", "4",
        "--batch1", "8", "--threads", "1"]


def test_every_run_is_summed_up_with_its_t_grid_and_checks(tmp_path, one_thread):
    with benchmark_module("train_curves") as train_curves:
        assert train_curves.main([*TINY, "--lr2", "1e-3", "--tag", "tiny.1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "train_curves-tiny.1.json").read_text())
    assert (tmp_path / "train_curves-tiny.1.png").read_bytes().startswith(b"\x89PNG")
    assert report["command"] == "python benchmarks/train_curves.py " + " ".join([*TINY, "--lr2", "1e-3", "--tag", "tiny.1",
                                                                                 "--out", str(tmp_path)])
    assert {"cpu", "torch", "accelerate", "load_average_1_5_15_min"} <= set(report["machine"])
    runs = report["datasets"]["phantom"]["runs"]
    assert list(runs) == ["stage1", "stage2-volumetric", "stage2-all", "stage1-continued"]
    assert [(r["batch"], r["batch_unit"], r["steps"]) for r in runs.values()] == [
        (8, "slices", 4), (1, "volume", 4), (1, "volume", 4), (4, "slices", 4)]  # the control: a volume's slices
    assert runs["stage1"]["learning_rate"] == 1e-3 and runs["stage1"]["warmup_steps"] == 20  # the stage-1 example
    assert all(runs[r]["learning_rate"] == 1e-3 and runs[r]["warmup_steps"] == 0 for r in list(runs)[1:])  # --lr2
    lifted, flat = runs["stage2-all"]["parameters"], runs["stage1"]["parameters"]
    assert flat == runs["stage1-continued"]["parameters"] < lifted == runs["stage2-volumetric"]["parameters"]
    for summary in runs.values():
        assert [step for step, _ in summary["loss"]] == [2, 4] and [s for s, _ in summary["val_loss"]] == [0, 4]
        assert (summary["loss_first"], summary["val_loss_end"]) == (summary["loss"][0][1], summary["val_loss"][-1][1])
        assert summary["s_per_step_median"] > 0 and summary["cpu_s_per_step"] > 0
        grid = summary["t_grid"]
        assert grid["t"] == list(range(25, 1000, 50)) and len(grid["loss"]) == 20
        assert (grid["split"], grid["volumes"]) == ("test", 2)  # the phantom's held-out subjects
    # Every later run starts from stage 1's export: bit for bit the same fixed-volume loss at step 0.
    assert {r["val_loss_start"] for r in list(runs.values())[1:]} == {runs["stage1"]["val_loss_end"]}
    assert len(report["checks"]) == 5 and all(c["ok"] and c["dataset"] == "phantom" for c in report["checks"])


def test_missing_icbm_files_stop_it_before_training(tmp_path, capsys):
    with benchmark_module("train_curves") as train_curves, pytest.raises(SystemExit) as stop:
        train_curves.main(["--datasets", "icbm", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert stop.value.code == 2 and "1mm_T1.nii.gz: pass --data" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
