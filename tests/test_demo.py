"""A shortened ``lift3d demo`` writes every promised file and reports both methods, on icbm152 and the phantom."""

import json

import nibabel as nib
import numpy as np
import pytest

from lift3d.cli.main import main
from lift3d.data import load_image


@pytest.mark.parametrize("dataset", ["icbm152", "phantom"])
def test_quick_demo_end_to_end(tmp_path, capsys, dataset):
    out = tmp_path / "demo"
    argv = ["demo", "--scale", "quick", "--out", str(out)] + (["--dataset", dataset] if dataset != "icbm152" else [])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for needle in ("stage 1", "stage-2", "[choose solver]", "[choose student]", "metrics JSON", "slice-wise", "lifted",
                   "lifted vs slice-wise: z-inconsistency"):
        assert needle in printed
    assert ("ICBM 152 subjects (real anatomy)" in printed) == (dataset == "icbm152")
    model = out / "model"  # the fit's published model: the stage-2 export or its distilled student
    assert (model / "diffusion_pytorch_model.safetensors").is_file() and (model / "volumetric.safetensors").is_file()
    assert (model / "README.md").is_file() and (out / "plan.json").is_file()
    summary = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert summary["dataset"] == dataset
    assert set(summary["methods"]) == {"slice-wise", "lifted", "lifted-student"}
    assert summary["unet_evaluations"]["lifted-student"] <= 2 and summary["published"] in summary["methods"]
    for stats in summary["methods"].values():
        assert {"mae", "ssim", "psnr", "z_inconsistency"} <= set(stats)
    # icbm152 also scores against the clean target (before its bias field and noise), inside the brain.
    assert ("methods_vs_clean_target" in summary) == (dataset == "icbm152")
    assert summary["scored_inside"] == ("the brain mask" if dataset == "icbm152" else "the whole volume")
    trained_on = json.loads((out / "stage1" / "model" / "lift3d_training.json").read_text())
    assert trained_on["data"]["dataset"] == dataset
    figures = list((out / "evaluation" / "figures").glob("*.png"))
    assert figures and figures[0].stat().st_size > 10_000
    # the report: one self-contained page, every method and subject in it, images embedded, nothing fetched
    report = (out / "evaluation" / "report.html").read_text()
    assert "report.html" in printed and report.count("data:image/png;base64,") >= 2
    assert "http://" not in report and "https://" not in report and "psnr_coronal" in report
    for stats in summary["methods"].values():  # per-plane and through-plane scores are in the metrics too
        assert {"psnr_coronal", "ssim_sagittal", "through_plane_mae"} <= set(stats)
    assert set(summary["seconds_per_volume"]) == set(summary["methods"]) and "s / volume" in printed
    synth = sorted((out / "synthesis" / "lifted").glob("*_synth.nii.gz"))
    assert synth
    if summary["settings"]["samples"] > 1:  # the mean of K samples, with the per-voxel std beside it on the same grid
        std = nib.load(out / "synthesis" / "lifted" / "std" / synth[0].name.replace("_synth", "_std"))
        assert std.shape == nib.load(synth[0]).shape and (np.asarray(std.dataobj) >= 0).all()
    if dataset == "icbm152":  # the validated stage-2 schedule reaches the trained model's recorded config
        stage2 = json.loads((out / "stage2-0" / "model" / "lift3d_training.json").read_text())
        assert stage2["config"]["optim"]["lr_scheduler"] == summary["settings"]["stage2_variants"][0]["lr_scheduler"]
        assert summary["settings"]["num_val"] == 1 and "validation" in printed
    # every subject of every split as a paired-nifti folder on the training grid, with the masks it was scored in
    subject = synth[0].name.replace("_synth.nii.gz", "")
    source = load_image(out / "data" / subject / "T1.nii.gz")
    lifted = nib.load(synth[0])
    assert lifted.shape == source.shape and np.allclose(lifted.affine, source.affine)
    assert nib.aff2axcodes(lifted.affine) == ("R", "A", "S")
    assert (out / "data" / subject / "brainmask.nii.gz").is_file() == (dataset == "icbm152")
    assert len(list((out / "data").iterdir())) == sum(summary["settings"][k] for k in ("num_train", "num_val",
                                                                                        "num_test"))
    rescored = rescore(out, dataset, tmp_path / "eval")
    for method, stats in summary["methods"].items():  # the demo's table, from its files alone
        for metric in ("mae", "ssim", "psnr", "z_inconsistency"):
            assert rescored[method][metric] == pytest.approx(stats[metric]["mean"], rel=1e-4, abs=1e-4), (method, metric)


def rescore(out, dataset, where):
    """The README's command after the demo: lift3d-evaluate on the demo's own outputs, per method."""
    from lift3d.cli.evaluate import main as evaluate

    means = {}
    for method in ("slice-wise", "lifted", "lifted-student"):
        masks = ["--mask", str(out / "data" / "{name}" / "brainmask.nii.gz")] if dataset == "icbm152" else []
        assert evaluate(["--pred", str(out / "synthesis" / method), "--target", str(out / "data" / "{name}" / "T2.nii.gz"),
                         *masks, "--out", str(where / method)]) == 0
        summary = json.loads((where / method / "summary.json").read_text())
        means[method] = {k: v["mean"] for k, v in summary["metrics"].items() if isinstance(v, dict) and "mean" in v}
    return means


def test_demo_help_says_which_data(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ICBM 152 2009c template that ships with lift3d" in text and "--dataset phantom" in text


def test_unknown_demo_dataset_is_one_clear_error(capsys):
    from lift3d.recipes.demo import run_demo

    with pytest.raises(ValueError, match="Unknown demo dataset 'brats'; available: icbm152, phantom"):
        run_demo("unused", dataset="brats")


def test_threads_auto_drops_to_one_on_a_busy_machine(monkeypatch, capsys):
    import os

    import torch

    from lift3d.recipes import demo

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        demo.set_threads("auto")
        assert torch.get_num_threads() == 2 and capsys.readouterr().out == ""
        monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count() or 1), 0.0, 0.0))
        demo.set_threads("auto")
        assert torch.get_num_threads() == 1 and "1 torch thread" in capsys.readouterr().out
        with pytest.raises(ValueError, match="threads must be a positive integer or 'auto', got 0"):
            demo.set_threads(0)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("seed", [-1, 2**32, 10**30])
def test_a_refused_demo_seed_leaves_no_out_folder(tmp_path, capsys, seed):
    from lift3d.recipes.demo import run_demo

    out = tmp_path / "demo"
    try:
        code = main(["demo", "--scale", "quick", "--out", str(out), f"--seed={seed}", "--threads", "1"])
    except SystemExit as exc:  # refused by the argument parser
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "seed" in err[-1] and "4294967295" in err[-1]
    with pytest.raises(ValueError, match=f"seed must be a whole number from 0 to 4294967295, got {seed}"):
        run_demo(out, scale="quick", seed=seed, threads=None)  # the Python API checks it too
    assert not out.exists()


def test_a_demo_that_fails_in_training_leaves_no_half_done_phase(tmp_path, monkeypatch):
    import lift3d.training.loop
    from lift3d.io.errors import Lift3dError
    from lift3d.recipes import demo

    def refused(cfg):
        raise Lift3dError(f"refused {cfg.run.stage}")

    monkeypatch.setattr(lift3d.training.loop, "train", refused)
    with pytest.raises(Lift3dError, match="refused slices"):
        demo.run_demo(tmp_path / "demo", dataset="phantom", scale="quick", threads=None)
    assert (tmp_path / "demo" / "plan.json").is_file() and not (tmp_path / "demo" / "stage1").exists()
