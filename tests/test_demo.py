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
    for needle in ("stage 1", "stage-2", "synthesis", "evaluation", "metrics JSON", "slice-wise", "lifted",
                   "lifted vs slice-wise: z-inconsistency"):
        assert needle in printed
    assert ("ICBM 152 subjects (real anatomy)" in printed) == (dataset == "icbm152")
    model = out / "stage2" / "model"
    assert (model / "diffusion_pytorch_model.safetensors").is_file() and (model / "volumetric.safetensors").is_file()
    summary = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert summary["dataset"] == dataset
    assert set(summary["methods"]) == {"slice-wise", "lifted"}
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
    assert set(summary["seconds_per_volume"]) == {"slice-wise", "lifted"} and "s / volume" in printed
    synth = sorted((out / "synthesis").glob("*_lifted.nii.gz"))
    assert synth
    if dataset == "icbm152":  # the mean of K samples, with the per-voxel std beside it on the same grid
        assert summary["settings"]["samples"] == 2 and summary["settings"]["num_val"] == 1
        # the validated stage-2 schedule reaches the trained model's recorded config
        stage2 = json.loads((out / "stage2" / "model" / "lift3d_training.json").read_text())
        assert stage2["config"]["optim"]["lr_scheduler"] == summary["settings"]["stage2_lr_scheduler"] == "cosine"
        std = nib.load(out / "synthesis" / "std" / synth[0].name.replace("_lifted", "_lifted_std"))
        assert std.shape == nib.load(synth[0]).shape and (np.asarray(std.dataobj) >= 0).all()
        assert "validation" in printed
    source = load_image(str(synth[0]).replace("_lifted", "_source"))
    lifted = nib.load(synth[0])
    assert lifted.shape == source.shape and np.allclose(lifted.affine, source.affine)
    if dataset == "icbm152":  # written back on the generation grid: 8 mm voxels in RAS
        assert nib.aff2axcodes(lifted.affine) == ("R", "A", "S")
        np.testing.assert_allclose(np.linalg.norm(lifted.affine[:3, :3], axis=0), [8.0, 8.0, 8.0])


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
