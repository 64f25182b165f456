"""Tests for lift3d/cli/synthesize.py (``lift3d-synthesize``) with tiny exported models and NIfTI files."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import lift3d
from lift3d.cli.synthesize import OUTPUT_SUFFIX, STD_DIR, STD_SUFFIX, main
from lift3d.training.config import TrainConfig
from lift3d.training.export import export_model
from lift3d.training.unets import build_autoencoder, build_objective, new_unet2d

SIZE, SLICES = 16, 8
# Oblique, anisotropic and not RAS (axis codes P, S, L): the axial slices are the file's second axis.
AFFINE = np.array([[0.0, 0.05, -1.5, 20.0], [-0.9, 0.0, 0.0, 30.0], [0.0, 1.2, 0.1, -10.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (20, 12, 14)  # (P, S, L): 12 axial slices of 20 x 14


pytestmark = pytest.mark.usefixtures("one_thread")


class _Dataset:
    num_slices = SLICES


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny lifted model with random volumetric weights, exported as lift3d-finetune does."""
    cfg = TrainConfig()
    cfg.run.stage = "volumes"
    cfg.data.options = {"size": SIZE, "num_slices": SLICES}
    cfg.model.block_out_channels = [16, 32]
    torch.manual_seed(0)
    unet = lift3d.inflate(new_unet2d(cfg, 2, 1, SIZE))
    for _, layer in lift3d.volumetric_layers(unet):
        layer.init_random_(std=0.05, generator=torch.Generator().manual_seed(1))
    root = tmp_path_factory.mktemp("model")
    return export_model(cfg, unet, build_autoencoder(cfg), build_objective(cfg), _Dataset(), root)


def write_source(path, shape=SHAPE, affine=AFFINE, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    data = 300 * (sum(g**2 for g in grids) < 0.8) + rng.normal(0, 10, shape)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_output_keeps_the_source_grid_and_affine(model_folder, tmp_path, capsys):
    source = write_source(tmp_path / "sub-01_T1.nii.gz")
    out = tmp_path / "out"
    code, stdout, _ = run(["--model", model_folder, "--source", source, "--out", out, "--steps", 2], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["sub-01_T1" + OUTPUT_SUFFIX]  # no temp file left
    result = nib.load(out / f"sub-01_T1{OUTPUT_SUFFIX}")
    assert result.shape == SHAPE
    np.testing.assert_allclose(result.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(result.get_sform(), AFFINE, atol=1e-5)
    data = result.get_fdata()
    assert np.isfinite(data).all() and data.std() > 0
    assert f"({SLICES}x{SIZE}x{SIZE} grid, " in stdout and "windows" not in stdout  # the training grid


def test_seed_and_sampler_change_the_result_and_repeat_exactly(model_folder, tmp_path, capsys):
    source = write_source(tmp_path / "a.nii.gz")

    def synth(name, *extra):
        assert run(["--model", model_folder, "--source", source, "--out", tmp_path / name, "--steps", 2, *extra],
                   capsys)[0] == 0
        return nib.load(tmp_path / name / f"a{OUTPUT_SUFFIX}").get_fdata()

    first = synth("seed0")
    assert np.array_equal(first, synth("seed0-again"))
    assert not np.allclose(first, synth("seed1", "--seed", 1))
    dpm = synth("dpm", "--solver", "dpm")
    assert not np.allclose(first, dpm)
    assert np.array_equal(dpm, synth("dpm-old-name", "--scheduler", "dpm"))  # the option's old name still works


def test_folder_of_sources_with_native_slices_is_windowed(model_folder, tmp_path, capsys):
    folder = tmp_path / "sources"
    folder.mkdir()
    write_source(folder / "a.nii.gz")
    write_source(folder / "b.nii", shape=(16, 10, 16), affine=np.diag([1.0, 1.0, 2.0, 1.0]), seed=1)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, stdout, _ = run(["--model", model_folder, "--source", folder, "--out", out, "--steps", 2,
                           "--num-slices", "native", "--size", "native", "--solver", "dpm"], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [f"a{OUTPUT_SUFFIX}", f"b{OUTPUT_SUFFIX}"]
    assert nib.load(out / f"a{OUTPUT_SUFFIX}").shape == SHAPE
    assert nib.load(out / f"b{OUTPUT_SUFFIX}").shape == (16, 10, 16)
    # a: 12 native axial slices of 20 x 14 > the 8 it was fine-tuned on, so windows; b: 16 x 10 x 16 RAS.
    assert "(12x20x14 grid, windows of 8 slices overlapping by 2" in stdout
    assert "(16x10x16 grid, windows of 8 slices overlapping by 2" in stdout


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--source", "--out", "--solver", "--steps", "--seed", "--window", "--overlap",
                   "--slice-wise", "--device", "--dtype", "--num-slices", "--size", "--samples", "--sample-batch",
                   "--noise-correlation", "--antithetic"):
        assert option in text
    for words in ("ddpm", "ddim", "dpm", "200 for ddim", "25 for dpm", "1000 for ddpm", "'native'",
                  "w/o volumetric layers", "affine", f"{STD_DIR}/<name>{STD_SUFFIX}", "uncertainty map",
                  "(seed, k)", "sqrt(RHO) x shared + sqrt(1 - RHO) x own-per-slice"):
        assert words in text


def _plain_diffusers_folder(tmp_path, model_folder):
    folder = tmp_path / "plain"
    new_unet2d(TrainConfig(), 2, 1, SIZE).save_pretrained(folder, safe_serialization=True)
    return folder


def _mismatched_autoencoder(tmp_path, model_folder):
    folder = tmp_path / "mismatch"
    shutil.copytree(model_folder, folder)
    settings = json.loads((folder / "lift3d_training.json").read_text())
    settings["autoencoder"] = {"name": "identity", "options": {"image_channels": 2}}
    (folder / "lift3d_training.json").write_text(json.dumps(settings))
    return folder


BAD_INPUTS = {
    "model without lift3d settings": (
        lambda tmp, model: ["--model", _plain_diffusers_folder(tmp, model)],
        "has no lift3d settings (neither lift3d_training.json nor lift3d.json)"),
    "autoencoder latent channels": (
        lambda tmp, model: ["--model", _mismatched_autoencoder(tmp, model)],
        "has 2 latent channels, so the U-Net must take 4 input channels"),
    "forced size not a multiple": (
        lambda tmp, model: ["--model", model, "--size", "15"],
        "--size 15x15 does not fit this model: in-plane size 15 is not a positive multiple of 2"),
    "native size not a multiple": (
        lambda tmp, model: ["--model", model, "--size", "native", "--source",
                            write_source(tmp / "odd.nii.gz", shape=(21, 12, 15))],
        "in-plane size after reorienting to axial slices is 21x15, which this model cannot take"),
    "out is a file": (
        lambda tmp, model: ["--model", model, "--out", write_source(tmp / "file.nii.gz")],
        "exists and is not a folder"),
    "out cannot be created": (
        lambda tmp, model: ["--model", model, "--out", write_source(tmp / "file.nii.gz") / "sub"],
        "cannot write to --out"),
    "missing source": (
        lambda tmp, model: ["--model", model, "--source", tmp / "nope.nii.gz"],
        "source file not found"),
    "corrupt source": (
        lambda tmp, model: ["--model", model, "--source", _corrupt(tmp)],
        "not a readable NIfTI file"),
    "device without CUDA": (
        lambda tmp, model: ["--model", model, "--device", "cuda"],
        "device 'cuda' asked for, but CUDA is not available here; use cpu"),
    "overlap as large as the window": (
        lambda tmp, model: ["--model", model, "--window", "4", "--overlap", "4"],
        "overlap must be smaller than the window (4 slices), got 4"),
}


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(b"not gzip at all")
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, model_folder, tmp_path, capsys):
    if case == "device without CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    make_args, message = BAD_INPUTS[case]
    extra = make_args(tmp_path, model_folder)
    argv = ["--source", write_source(tmp_path / "good.nii.gz"), "--out", tmp_path / "out", "--steps", 2]
    code, stdout, stderr = run(argv + extra, capsys)  # later options win, so extra replaces the defaults
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and message in lines[0], stderr
    assert not (tmp_path / "out").exists()
    if case == "native size not a multiple":
        assert "--size 22x16" in lines[0] and "21: 20 or 22; 15: 14 or 16" in lines[0]
    if case == "forced size not a multiple":
        assert "nearest valid sizes: 14 or 16" in lines[0]
    assert "synth" not in " ".join(p.name for p in tmp_path.rglob("*"))


def _synth(model_folder, source, out, capsys, *extra):
    code, stdout, stderr = run(["--model", model_folder, "--source", source, "--out", out, "--steps", 2, *extra],
                               capsys)
    assert code == 0, stderr
    return stdout


def test_samples_write_the_mean_and_a_std_map_on_the_source_grid(model_folder, tmp_path, capsys):
    source = write_source(tmp_path / "sub-01_T1.nii.gz")
    one = tmp_path / "one"
    _synth(model_folder, source, one, capsys, "--samples", 1)
    assert sorted(p.name for p in one.iterdir()) == [f"sub-01_T1{OUTPUT_SUFFIX}"]  # no std map for one sample
    out = tmp_path / "three"
    stdout = _synth(model_folder, source, out, capsys, "--samples", 3, "--solver", "ddpm", "--sample-batch", 3)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"sub-01_T1{OUTPUT_SUFFIX}", STD_DIR])
    assert [p.name for p in (out / STD_DIR).iterdir()] == [f"sub-01_T1{STD_SUFFIX}"]
    assert "3 samples (3 at a time)" in stdout and "(mean of 3)" in stdout and "s per sample" in stdout
    mean, std = nib.load(out / f"sub-01_T1{OUTPUT_SUFFIX}"), nib.load(out / STD_DIR / f"sub-01_T1{STD_SUFFIX}")
    for image in (mean, std):
        assert image.shape == SHAPE
        np.testing.assert_allclose(image.affine, AFFINE, atol=1e-5)
    std_data = std.get_fdata()
    assert np.isfinite(std_data).all() and std_data.min() >= 0 and std_data.mean() > 1  # source units (0-300)
    assert not np.allclose(mean.get_fdata(), nib.load(one / f"sub-01_T1{OUTPUT_SUFFIX}").get_fdata())
    # Batching is a matter of speed only (on the CPU the default is one sample at a time).
    capped = tmp_path / "capped"
    assert "3 samples (1 at a time)" in _synth(model_folder, source, capped, capsys, "--samples", 3, "--solver",
                                               "ddpm")
    np.testing.assert_allclose(nib.load(capped / f"sub-01_T1{OUTPUT_SUFFIX}").get_fdata(), mean.get_fdata(),
                               atol=1e-3)
    np.testing.assert_allclose(nib.load(capped / STD_DIR / f"sub-01_T1{STD_SUFFIX}").get_fdata(), std_data, atol=1e-3)


def test_noise_correlation_changes_the_result_and_zero_changes_nothing(model_folder, tmp_path, capsys):
    source = write_source(tmp_path / "a.nii.gz")
    default = _synth(model_folder, source, tmp_path / "default", capsys)
    _synth(model_folder, source, tmp_path / "zero", capsys, "--noise-correlation", 0)
    stdout = _synth(model_folder, source, tmp_path / "half", capsys, "--noise-correlation", 0.5)
    assert "noise correlated across slices by 0.5" in stdout and "correlated" not in default

    def load(name):
        return nib.load(tmp_path / name / f"a{OUTPUT_SUFFIX}").get_fdata()

    assert np.array_equal(load("default"), load("zero"))
    assert not np.allclose(load("default"), load("half"))


def test_antithetic_pairs_from_the_command_line_and_through_predict(model_folder, tmp_path, capsys):
    from lift3d.cli.main import main as lift3d_main

    source = write_source(tmp_path / "a.nii.gz")
    stdout = _synth(model_folder, source, tmp_path / "anti", capsys, "--samples", 2, "--solver", "ddim",
                    "--antithetic")
    assert "2 antithetic samples" in stdout and (tmp_path / "anti" / STD_DIR / f"a{STD_SUFFIX}").is_file()
    _synth(model_folder, source, tmp_path / "indep", capsys, "--samples", 2, "--solver", "ddim")

    def load(name):
        return nib.load(tmp_path / name / f"a{OUTPUT_SUFFIX}").get_fdata()

    assert not np.allclose(load("anti"), load("indep"))
    for extra, message in ((["--samples", 1], "--antithetic pairs samples, but --samples is 1: give --samples 2"),
                           (["--samples", 2, "--solver", "ddpm"], "antithetic pairs need a deterministic solver")):
        code, _, stderr = run(["--model", model_folder, "--source", source, "--out", tmp_path / "bad", "--steps", 2,
                               "--antithetic", *extra], capsys)
        assert code == 2 and message in stderr and not (tmp_path / "bad").exists()
    # a fit that chose antithetic pairs: lift3d predict samples its model so
    fitted = tmp_path / "fitted"
    shutil.copytree(model_folder, fitted)
    (fitted / "lift3d_fit.json").write_text(json.dumps({"solver": "ddim", "steps": 2, "samples": 2,
                                                        "antithetic": True}))
    assert lift3d_main(["predict", "--model", str(fitted), "--source", str(source), "--out",
                        str(tmp_path / "pred")]) == 0
    assert "2 antithetic samples" in capsys.readouterr().out
    np.testing.assert_allclose(nib.load(tmp_path / "pred" / f"a{OUTPUT_SUFFIX}").get_fdata(), load("anti"), atol=1e-4)


@pytest.mark.parametrize("option, value, message", [
    ("--samples", "0", "argument --samples: expected a positive integer, got 0"),
    ("--sample-batch", "0", "argument --sample-batch: expected a positive integer, got 0"),
    ("--noise-correlation", "1.5", "argument --noise-correlation: expected a number from 0 (independent slices) "
                                   "to 1 (the same noise in every slice), got '1.5'"),
    ("--noise-correlation", "high", "got 'high'"),
])
def test_bad_sampling_options_exit_2_with_one_error_line(model_folder, tmp_path, capsys, option, value, message):
    argv = ["--model", model_folder, "--source", write_source(tmp_path / "a.nii.gz"), "--out", tmp_path / "out",
            option, value]
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_negative_step_count_is_called_what_it_is(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "m", "--source", "s.nii.gz", "--out", "o", "--steps=-5"])
    err = capsys.readouterr().err
    assert "argument --steps: expected a positive integer, got -5" in err and "non-negative" not in err
