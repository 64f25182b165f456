"""A shortened ``lift3d demo`` writes every promised file and reports both methods."""

import json

import nibabel as nib
import numpy as np

from lift3d.cli.main import main
from lift3d.data import load_image


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--scale", "quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for needle in ("stage 1", "stage-2", "synthesis", "evaluation", "metrics JSON", "slice-wise", "lifted"):
        assert needle in printed
    model = out / "stage2" / "model"
    assert (model / "diffusion_pytorch_model.safetensors").is_file() and (model / "volumetric.safetensors").is_file()
    summary = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(summary["methods"]) == {"slice-wise", "lifted"}
    for stats in summary["methods"].values():
        assert {"mae", "ssim", "psnr", "z_inconsistency"} <= set(stats)
    figures = list((out / "evaluation" / "figures").glob("*.png"))
    assert figures and figures[0].stat().st_size > 10_000
    synth = sorted((out / "synthesis").glob("*_lifted.nii.gz"))
    assert synth
    source = load_image(str(synth[0]).replace("_lifted", "_source"))
    lifted = nib.load(synth[0])
    assert lifted.shape == source.shape and np.allclose(lifted.affine, source.affine)
