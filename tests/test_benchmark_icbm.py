"""benchmarks/icbm_t1t2.py: its subjects come from the icbm152 plugin, and the whole benchmark at smoke scale.

The end-to-end test needs the ICBM 152 2009c files (``shared/data/icbm152-2009c`` next to the
checkout, or ``LIFT3D_ICBM_DIR``) and is skipped without them. The subject maker itself is tested
in tests/test_icbm152_plugin.py.
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

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "icbm_t1t2.py"


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("icbm_t1t2") as module:
        yield module


def icbm_dir(bench) -> Path:
    folder = Path(os.environ.get("LIFT3D_ICBM_DIR") or bench.DEFAULT_DATA)
    missing = [name for name in bench.TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found in {folder}; set LIFT3D_ICBM_DIR to run the ICBM benchmark smoke test")
    return folder


def test_protocol_subjects_are_the_plugins_with_the_published_seeds(bench):
    options = bench.dataset_options(Path("/data/icbm"), bench.SCALES["cpu"])
    assert {k: options[k] for k in ("num_train", "num_val", "num_test", "voxel_mm", "source", "target")} == {
        "num_train": 13, "num_val": 3, "num_test": 6, "voxel_mm": 2, "source": "T1", "target": "T2"}
    assert options["files"] == {"T1": "1mm_T1.nii.gz", "T2": "1mm_T2_brain.nii.gz", "mask": "1mm_brainmask.nii.gz"}
    cfg = bench.diffusion_config("slices", Path("/tmp/x"), bench.SCALES["cpu"], options, 0, 1)
    assert cfg.data.dataset == "icbm152" and cfg.autoencoder.name == "identity"
    # Stage 2 exports the step best on all three validation subjects, step 0 (= stage 1) included.
    cfg = bench.diffusion_config("volumes", Path("/tmp/x"), bench.SCALES["cpu"], options, 0, 1)
    assert (cfg.run.validate_every, cfg.run.validate_steps, cfg.data.val_volumes) == (150, 25, 3)
    cfg = bench.diffusion_config("volumes", Path("/tmp/x"), bench.SCALES["cpu"], options, 0, 1, None,
                                 {"kind": "slice-attention", "lr_scheduler": "cosine"}, Path("/ae"))
    assert (cfg.lift.kind, cfg.optim.lr_scheduler, cfg.optim.learning_rate) == ("slice-attention", "cosine", 2e-3)
    assert cfg.autoencoder.name == "kl" and cfg.autoencoder.options == {"path": "/ae"}


def test_same_source_and_target_is_refused(bench, capsys):
    with pytest.raises(SystemExit) as excinfo:
        bench.parse_args(["--source", "T2", "--target", "T2"])
    assert excinfo.value.code == 2
    assert "both T2" in capsys.readouterr().err


def test_choose_says_when_no_lift_beats_stage1(bench):
    def row(model, variant, psnr):
        return {"model": model, "variant": variant, "metrics": {"psnr": {"mean": psnr}}}

    rows = [row("slice-wise", "-", 23.0), row("lifted", "default", 22.5), row("lifted", "kind=x", 22.9)]
    chosen, wins = bench.choose(rows)
    assert (chosen["variant"], wins) == ("kind=x", False)
    chosen, wins = bench.choose(rows + [row("lifted", "cosine", 23.1)])
    assert (chosen["variant"], wins) == ("cosine", True)


def test_missing_data_is_one_clear_error(bench, tmp_path, capsys):
    code = bench.main(["--data", str(tmp_path / "nowhere"), "--scale", "smoke", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "1mm_T1.nii.gz" in err and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the whole protocol at the smoke scale, twice
def test_smoke_run_end_to_end(bench, tmp_path):
    data = icbm_dir(bench)
    out = tmp_path / "icbm"
    env = {**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--scale", "smoke", "--data", str(data), "--out", str(out), "--device", "cpu",
         "--x0-clip", "--variant", "kernel_size=5"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())

    # Subjects: the icbm152 plugin's, with the protocol's seeds, and no copy written to disk.
    test_subjects = [f"test-{i:02d}" for i in range(6)]
    subjects = report["data"]["subjects"]
    assert {name: (entry["split"], entry["seed"]) for name, entry in subjects.items()} == {
        **{f"train-{i:02d}": ("train", 1000 + i) for i in range(13)},
        **{f"val-{i:02d}": ("val", 1500 + i) for i in range(3)},
        **{f"test-{i:02d}": ("test", 2000 + i) for i in range(6)}}
    assert report["data"]["dataset"] == "icbm152" and not Path(report["data"]["folder"]).is_absolute()
    assert not (out / "subjects").exists()

    # Every method on the same six test subjects, with finite metrics against the noisy and the clean target.
    methods = report["methods"]
    assert set(methods) == {"slice-wise", "lifted", "3d-unet", "lifted-dpm", "slice-wise-dpm",
                            *(f"{m}-k{k}" for m in ("slice-wise", "lifted") for k in (1, 4))}
    for name, entry in methods.items():
        for rows in (entry["subjects"], entry["clean_target"]["subjects"]):
            assert [row["subject"] for row in rows] == test_subjects, name
            for row in rows:
                assert all(math.isfinite(row[k]) for k in ("mae", "ssim", "psnr", "z_inconsistency")), (name, row)
        assert entry["seconds_per_volume"] > 0
    assert methods["lifted-k4"]["samples"] == 4 and methods["lifted-k1"]["samples"] == 1
    # Same stage-1 weights for slice-wise, the chosen stage-2 export for lifted, whatever the sampler.
    assert methods["slice-wise"]["model"] == methods["slice-wise-dpm"]["model"] == methods["slice-wise-k4"]["model"]
    assert methods["slice-wise"]["model"].endswith("stage1/model")
    selection = report["selection"]
    chosen = selection["chosen"]
    assert methods["lifted"]["model"] == methods["lifted-dpm"]["model"] == methods["lifted-k4"]["model"] == chosen["folder"]
    folder = "stage2" if chosen["variant"] == "default" else "stage2_kernel_size-5"
    assert chosen["folder"].endswith(f"{folder}/model")
    # The stage-2 export is the best variant on the validation subjects; each run logged its validation curve.
    lifted = [row for row in selection["validation"] if row["model"] == "lifted"]
    assert sorted(row["variant"] for row in lifted) == ["default", "kernel_size=5"]
    best = max(lifted, key=lambda row: row["metrics"]["psnr"]["mean"])
    assert best["variant"] == chosen["variant"]
    stage1 = next(row for row in selection["validation"] if row["model"] == "slice-wise")
    assert selection["lifted_beats_slice_wise"] == (best["metrics"]["psnr"]["mean"] > stage1["metrics"]["psnr"]["mean"])
    for curve in selection["stage2_validation_curves"].values():
        assert [row["step"] for row in curve] == [0, 1, 2] and all("val_psnr" in row for row in curve)
    assert selection["validation_subjects"] == ["val-00", "val-01", "val-02"]
    assert {row["noise_correlation"] for row in selection["noise_sweep"]} == {0.0, 0.5}
    assert selection["best_lift3d"] in ("lifted-k4", "slice-wise-k4")

    # Paired differences, with intervals, for each comparison and both references.
    paired = report["paired_differences"]
    assert set(paired) >= {"lifted vs slice-wise", f"{selection['best_lift3d']} vs 3d-unet"}
    diff = paired["lifted vs slice-wise"]["target"]["psnr"]
    per_subject = [b["psnr"] - a["psnr"] for a, b in zip(methods["slice-wise"]["subjects"], methods["lifted"]["subjects"])]
    assert diff["mean"] == pytest.approx(sum(per_subject) / 6) and diff["n"] == 6
    assert diff["ci"][0] <= diff["mean"] <= diff["ci"][1]
    assert report["goal"]["compared"] == "lifted vs slice-wise" and isinstance(report["goal"]["met"], bool)
    assert report["goal_3d_unet"]["compared"] == f"{selection['best_lift3d']} vs 3d-unet"
    observed = report["goal"]["observed"]
    summary = {name: methods[name]["summary"] for name in ("lifted", "slice-wise")}
    assert observed["psnr_gain_db"] == pytest.approx(summary["lifted"]["psnr"]["mean"] - summary["slice-wise"]["psnr"]["mean"])

    # Every method is scored per plane and downstream: tissue Dice from a segmenter trained on the real target.
    row = methods["lifted"]["subjects"][0]
    assert {"psnr_coronal", "ssim_sagittal", "through_plane_mae", "dice_gm", "dice_label_wm"} <= set(row)
    seg = report["segmentation"]
    assert set(seg["ceiling_vs_labels"]) == {"csf", "gm", "wm", "mean"} and set(seg["methods"]) == set(methods)
    assert "psnr_sagittal" in paired["lifted vs slice-wise"]["target"]
    assert "<table" in (out / "report.html").read_text()

    assert (out / "views.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "results.md").read_text()
    assert "| `lifted` (b) lifted (stage 2) | DDIM-3, x0 clip |" in text and "lifted vs slice-wise | clean target" in text
    assert report["timing"]["reused"] == [] and report["timing"]["reused_sampling_s"] == 0

    # Rerun with --reuse: every phase and sample comes from the first run, and the time it took then is counted.
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--scale", "smoke", "--data", str(data), "--out", str(out), "--device", "cpu",
         "--x0-clip", "--variant", "kernel_size=5", "--reuse"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["methods"]["lifted"]["subjects"] == methods["lifted"]["subjects"]
    assert again["timing"]["reused"] == ["stage1_s", "stage2_s", "baseline_s"]
    assert again["segmentation"] == report["segmentation"]  # the segmenter is reused too
    assert again["timing"]["reused_sampling_s"] > 0


def test_stage2_variants_parse_to_config_overrides(bench):
    assert bench.parse_variant("trainable=all") == {"trainable": "all"}
    assert bench.parse_variant("where=spatial, kernel_size=5") == {"where": "spatial", "kernel_size": 5}
    assert bench.variant_folder(bench.parse_variant("kernel_size=5")) == "stage2_kernel_size-5"
    assert bench.parse_variant("kind=slice-attention,lr_scheduler=cosine") == {"kind": "slice-attention",
                                                                              "lr_scheduler": "cosine"}
    for bad, words in (("kernel=5", "kernel_size"), ("kernel_size=five", "int"), ("", "names nothing")):
        with pytest.raises(ValueError, match=words):
            bench.parse_variant(bad)


@pytest.mark.slow  # the whole protocol at the smoke scale
def test_smoke_run_in_latent_space(bench, tmp_path):
    """--autoencoder: both diffusion stages on KL latents (f = 4), decoded back to the pixel grid for scoring."""
    data = icbm_dir(bench)
    from lift3d_plugins.autoencoders import tiny_kl_config
    from lift3d.plugins import create

    coder = tmp_path / "kl"
    create("autoencoders", "kl", config=tiny_kl_config(block_out_channels=[8, 8, 8], norm_num_groups=4),
           scaling_factor=1.0).save(coder)
    out = tmp_path / "latent"
    env = {**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--scale", "smoke", "--data", str(data), "--out", str(out), "--device", "cpu",
         "--autoencoder", str(coder), "--no-baseline"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert "latent space of the KL autoencoder" in report["settings"]["unet"]
    assert "3d-unet" not in report["methods"] and report["goal_3d_unet"] is None
    training = json.loads((out / "stage1" / "model" / "lift3d_training.json").read_text())
    assert training["autoencoder"]["name"] == "kl"
    # Scored on the 32 x 32 pixel grid, not on the 8 x 8 latents.
    assert report["settings"]["grid"] == "32 x 32 x 16"


def test_latent_grid_must_be_a_multiple_of_f(bench, tmp_path, capsys):
    data = icbm_dir(bench)
    from lift3d_plugins.autoencoders import tiny_kl_config
    from lift3d.plugins import create

    coder = tmp_path / "kl"
    create("autoencoders", "kl", config=tiny_kl_config(block_out_channels=[8, 8, 8], norm_num_groups=4),
           scaling_factor=1.0).save(coder)
    code = bench.main(["--scale", "smoke", "--data", str(data), "--out", str(tmp_path / "out"), "--autoencoder", str(coder),
                       "--size", "30"])
    assert code == 2
    err = capsys.readouterr().err
    assert "size 30" in err and "multiple" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_3d_unet_is_monais_and_refused_without_it(monkeypatch):
    from lift3d.io.errors import Lift3dError
    from lift3d.recipes.unet3d import build_unet3d

    net, description = build_unet3d((8, 8, 8, 16, 16, 8))
    assert type(net).__name__ == "BasicUNet" and description.startswith("MONAI ")
    monkeypatch.setitem(sys.modules, "monai", None)  # as on a machine without the bench extra
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    with pytest.raises(Lift3dError, match=r"MONAI is not installed: pip install 'lift3d\[bench\]'"):
        build_unet3d((8, 8, 8, 16, 16, 8))
