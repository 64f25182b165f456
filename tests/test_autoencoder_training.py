"""The autoencoder stage (lift3d/training/stages/autoencoder.py through lift3d/training/loop.py) and the whole
latent pipeline it opens: autoencoder -> stage 1 -> lift -> stage 2 -> synthesis back to NIfTI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lift3d.cli.finetune import main as finetune
from lift3d.plugins import create
from lift3d.training.loop import train
from test_training import BIN, KILLER, losses, max_diff, run_cli, tiny_cfg, weights

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = {"block_out_channels": [8, 8, 8], "latent_channels": 4, "norm_num_groups": 8}


def ae_cfg(out: Path, **sections):
    return tiny_cfg(out, stage="autoencoder", **{"vae": TINY_VAE, "optim": {"learning_rate": 2e-3}, **sections})


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "run"
    train(ae_cfg(out, run={"max_steps": 30, "log_every": 5}))
    return out


def test_the_autoencoder_stage_learns_and_exports_a_kl_folder(trained_ae):
    rows = losses(trained_ae)
    l1 = [float(r["l1"]) for r in rows if r["l1"]]
    assert l1[-1] < 0.6 * l1[0]
    psnr = [float(r["val_psnr"]) for r in rows if r["val_psnr"]]
    assert psnr[-1] > psnr[0] + 3
    folder = trained_ae / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and len(config["block_out_channels"]) == 3  # f = 4
    ae = create("autoencoders", "kl", path=str(folder))
    assert ae.downsampling_factor == 4 and ae.scaling_factor == config["scaling_factor"]
    settings = json.loads((folder / "lift3d_training.json").read_text())
    assert settings["stage"] == "autoencoder" and settings["scaling_factor"] == config["scaling_factor"]


def test_the_exported_scale_gives_unit_variance_latents(trained_ae):
    """The scale is measured on the training slices: their scaled latents have mean 0 and std 1."""
    ae = create("autoencoders", "kl", path=str(trained_ae / "model")).eval()
    dataset = create("datasets", "phantom", split="train", size=16, num_slices=4, num_subjects=5)
    x = torch.cat([torch.cat([dataset[i].source, dataset[i].target]).transpose(0, 1) for i in range(len(dataset))])
    with torch.no_grad():
        z = ae.encode(x.reshape(-1, 1, 16, 16))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


def test_resume_reproduces_an_uninterrupted_autoencoder_run(tmp_path):
    """Posterior samples come from the global RNG, whose state the checkpoint restores."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(ae_cfg(straight, run={"max_steps": 4, "checkpoint_every": 2}))
    train(ae_cfg(resumed, run={"max_steps": 2, "checkpoint_every": 2}))
    train(ae_cfg(resumed, run={"max_steps": 4, "checkpoint_every": 2, "resume": "latest"}))
    name = "diffusion_pytorch_model.safetensors"
    assert (straight / "model" / name).read_bytes() == (resumed / "model" / name).read_bytes()


AE_TOML = """
[run]
stage = "autoencoder"
output_dir = "{out}"
max_steps = 6
checkpoint_every = 2
log_every = 1
[data]
dataset = "phantom"
options = {{ size = 16, num_slices = 4, num_subjects = 5 }}
batch_size = 4
[vae]
block_out_channels = [8, 8, 8]
norm_num_groups = 8
adversarial_weight = 0.5
adversarial_start = 2
discriminator_width = 8
[optim]
learning_rate = 2e-3
warmup_steps = 2
lr_scheduler = "linear"
"""


@pytest.mark.slow  # three processes; test_resume_reproduces_an_uninterrupted_autoencoder_run covers resume in one
def test_the_autoencoder_resumes_after_sigkill_like_an_uninterrupted_run(tmp_path):
    """Killed while writing the step-4 checkpoint, with the discriminator on since step 2: resuming from
    step 2 (autoencoder, discriminator, both optimizers, RNG) ends where a run never killed ends."""
    import signal

    from lift3d.training.checkpoints import list_checkpoints

    config = tmp_path / "ae.toml"
    config.write_text(AE_TOML.format(out=tmp_path / "killed"))
    killed = run_cli(sys.executable, "-c", KILLER, "--config", str(config), cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["checkpoint-2"]
    resumed = run_cli(str(BIN / "lift3d-finetune"), "--config", str(config), "--run.resume", "latest", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    clean = run_cli(str(BIN / "lift3d-finetune"), "--config", str(config), "--run.output_dir", str(tmp_path / "clean"),
                    cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert max_diff(weights(tmp_path / "killed" / "model"), weights(tmp_path / "clean" / "model")) <= 1e-5
    assert [r["step"] for r in losses(tmp_path / "killed")] == [r["step"] for r in losses(tmp_path / "clean")]


def test_the_discriminator_switches_on_after_its_warm_up(tmp_path):
    out = tmp_path / "gan"
    train(ae_cfg(out, run={"max_steps": 4}, vae={**TINY_VAE, "adversarial_weight": 0.5, "adversarial_start": 2,
                                                "discriminator_width": 8}))
    rows = [r for r in losses(out) if r["l1"]]
    assert [bool(r["discriminator"]) for r in rows] == [False, False, True, True]
    assert all(float(r["adaptive_weight"]) > 0 for r in rows[2:])


def test_bad_autoencoder_inputs_are_one_line(tmp_path, capsys, trained_ae):
    common = ["--data.options", "{size = 18, num_slices = 4, num_subjects = 5, multiple = 2}", "--vae.block_out_channels", "[8, 8, 8]",
              "--vae.norm_num_groups", "8"]
    assert finetune(["--run.stage", "autoencoder", "--run.output_dir", str(tmp_path / "a"), *common]) == 2
    err = capsys.readouterr().err
    assert "in-plane size 18x18 is not a multiple of 4 (the autoencoder's f); valid sizes near it: 16, 20" in err
    assert not (tmp_path / "a").exists()
    # A pixel-space stage-1 U-Net cannot denoise 4-channel latents.
    pixel = train(tiny_cfg(tmp_path / "pixel", run={"max_steps": 1}))
    capsys.readouterr()
    code = finetune(["--model.pretrained", str(pixel), "--run.output_dir", str(tmp_path / "b"), "--autoencoder.name", "kl",
                     "--autoencoder.options", f"{{path = '{trained_ae / 'model'}'}}",
                     "--data.options", "{size = 16, num_slices = 4, num_subjects = 5}"])
    err = capsys.readouterr().err
    assert code == 2 and "takes 2 -> 1 channels, but autoencoder 'kl' with conditioning 'concat' needs 8 -> 4" in err
    assert not (tmp_path / "b").exists()


def test_the_latent_pipeline_runs_end_to_end(tmp_path, trained_ae):
    """Autoencoder -> stage 1 in latents -> lift -> stage 2 -> synthesis decoded back to NIfTI."""
    from lift3d.cli.synthesize import OUTPUT_SUFFIX, main as synthesize

    ae = {"name": "kl", "options": {"path": str(trained_ae / "model")}, "cache_latents": True}
    stage1 = train(tiny_cfg(tmp_path / "s1", autoencoder=ae, model={"block_out_channels": [16],
                                                                   "prediction_type": "v_prediction"},
                            run={"max_steps": 3}))
    stage2 = train(tiny_cfg(tmp_path / "s2", stage="volumes", autoencoder=ae, data={"batch_size": 1},
                            model={"pretrained": str(stage1), "prediction_type": "v_prediction"}, run={"max_steps": 2}))
    assert (stage2 / "autoencoder" / "config.json").is_file()
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [10, -20, 5]
    source = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(100, 20, (20, 20, 6)).astype(np.float32), affine), source)
    assert synthesize(["--model", str(stage2), "--source", str(source), "--out", str(tmp_path / "synth"),
                       "--steps", "2", "--size", "16", "--num-slices", "4"]) == 0
    written = nib.load(tmp_path / "synth" / f"t1{OUTPUT_SUFFIX}")
    assert written.shape == (20, 20, 6) and np.allclose(written.affine, affine)
    assert np.isfinite(written.get_fdata()).all()


EXAMPLE_AE = ROOT / "examples" / "configs" / "phantom-autoencoder.toml"


def test_the_example_autoencoder_config_runs_and_exports_an_f4_autoencoder(tmp_path):
    """The example as shipped, for two steps on fewer subjects (the full run, which must learn, is slow)."""
    out = tmp_path / "example"
    assert finetune(["--config", str(EXAMPLE_AE), "--run.output_dir", str(out), "--run.checkpoint_every", "0",
                     "--run.max_steps", "2", "--run.log_every", "1", "--data.batch_size", "4",
                     "--data.options", "{size = 32, num_slices = 4, num_subjects = 4}"]) == 0
    assert [int(r["step"]) for r in losses(out) if r["l1"]] == [1, 2]
    assert create("autoencoders", "kl", path=str(out / "model")).downsampling_factor == 4


@pytest.mark.slow  # minutes on 2 CPU cores: the example's whole run
def test_the_example_autoencoder_config_trains(tmp_path):
    out = tmp_path / "example"
    assert finetune(["--config", str(EXAMPLE_AE), "--run.output_dir", str(out), "--run.checkpoint_every", "0"]) == 0
    rows = losses(out)
    psnr = [float(r["val_psnr"]) for r in rows if r["val_psnr"]]
    assert psnr[-1] > psnr[0] + 10
    assert create("autoencoders", "kl", path=str(out / "model")).downsampling_factor == 4
