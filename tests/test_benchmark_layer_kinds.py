"""benchmarks/layer_kinds.py at tiny size: a sweep of two kinds from one phantom stage 1, then --choose on two sweeps."""

from __future__ import annotations

import json

import pytest

from tests.conftest import benchmark_module

SUBJECTS = {"val": ["phantom-002"], "test": ["phantom-003", "phantom-004"]}


@pytest.fixture(scope="module")
def layer_kinds():
    with benchmark_module("layer_kinds") as module:
        yield module


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, one_thread):
    """A finished stage-1 run folder (model/ and logs/config.json) on 5 phantom subjects: 2 train, 1 val, 2 test."""
    from lift3d.training.config import TrainConfig, apply
    from lift3d.training.loop import train

    folder = tmp_path_factory.mktemp("stage1")
    train(apply(TrainConfig(), {
        "run": {"stage": "slices", "output_dir": str(folder), "max_steps": 2, "log_every": 1, "checkpoint_every": 0},
        "data": {"dataset": "phantom", "batch_size": 4, "options": {"size": 16, "num_slices": 8, "num_subjects": 5,
                                                                    "val_size": 1, "test_size": 2}},
        "model": {"block_out_channels": [8, 16], "prediction_type": "v_prediction"}}, "test"))
    return folder


def test_a_sweep_scores_each_kind_and_choose_picks_the_default(layer_kinds, stage1, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the sweep hides any GPU: given back after the test
    sweep = tmp_path / "lr1.json"
    args = ["--stage1", str(stage1), "--out", str(tmp_path / "kinds"), "--kinds", "full", "low-rank:rank_min=4",
            "--steps", "2", "--lr", "1e-3", "--sampler-steps", "2", "--json", str(sweep)]
    assert layer_kinds.main(args) == 0
    assert "| slice-wise (stage 1) |" in capsys.readouterr().out
    report = json.loads(sweep.read_text())
    assert report["command"] == "python benchmarks/layer_kinds.py " + " ".join(args)
    assert report["reference"] == "full" and list(report["kinds"]) == ["full", "low-rank:rank_min=4"]
    low_rank = report["kinds"]["low-rank:rank_min=4"]
    assert low_rank["settings"] == {"kind": "low-rank", "rank_min": 4}
    for entry in (report["slice_wise"], *report["kinds"].values()):
        assert entry["solver"] == "dpm-2"  # a DDPM stage 1: DPM-Solver++
        for split, names in SUBJECTS.items():
            assert [row["subject"] for row in entry[split]] == names
            assert all({"psnr", "ssim", "mae", "z_inconsistency"} <= set(row) for row in entry[split])
    paired = low_rank["test_vs_reference"]["psnr"]["per_subject"]
    assert paired == pytest.approx({row["subject"]: row["psnr"] - full["psnr"] for row, full in
                                    zip(low_rank["test"], report["kinds"]["full"]["test"])})
    assert "test_vs_reference" not in report["kinds"]["full"]

    # --reuse keeps both exports (and the cached samples): the same scores again, without training.
    assert layer_kinds.main([*args, "--reuse", "--json", str(tmp_path / "again.json")]) == 0
    assert "stage 2," not in capsys.readouterr().out
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["kinds"]["full"]["val"] == report["kinds"]["full"]["val"]

    # A second sweep "at another learning rate", where full does better on validation: each kind keeps its best lr.
    other = json.loads(sweep.read_text())
    other["recipe"]["lr"] = 4e-3
    for row in other["kinds"]["full"]["val"]:
        row["psnr"] += 1.0
    (tmp_path / "lr4.json").write_text(json.dumps(other))
    choice = tmp_path / "choice.json"
    assert layer_kinds.main(["--choose", str(sweep), str(tmp_path / "lr4.json"), "--json", str(choice)]) == 0
    out = capsys.readouterr().out
    assert out.count("validation PSNR") == 4 and "low-rank:rank_min=4 (lr 0.001) - full (lr 0.004)" in out
    decision = json.loads(choice.read_text())["decisions"]["low-rank:rank_min=4"]
    assert (decision["lr"], decision["reference_lr"]) == (1e-3, 4e-3)
    assert decision["validation"]["psnr"]["mean"] < 0 and decision["within_reference_interval"] is False


def test_the_two_modes_refuse_what_they_cannot_do(layer_kinds, tmp_path, capsys):
    with pytest.raises(SystemExit):
        layer_kinds.main(["--kinds", "full"])  # a sweep needs a stage 1 and a work folder
    assert "a sweep needs --stage1 and --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        layer_kinds.main(["--stage1", "s", "--out", "o", "--kinds", "full", "--reference", "low-rank"])
    assert "--reference 'low-rank' is not among --kinds" in capsys.readouterr().err
    run = {"recipe": {"lr": 1e-3}, "kinds": {"low-rank": {"val": [{"subject": "a", "psnr": 1.0, "z_inconsistency": 0.5}],
                                                           "test": [{"subject": "b", "psnr": 1.0}]}}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert layer_kinds.main(["--choose", str(tmp_path / "run.json")]) == 2
    assert "no run has the reference kind 'full'" in capsys.readouterr().err
