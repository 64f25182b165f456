"""benchmarks/icbm_t1t2.py: its subjects come from the icbm152 plugin, and the whole benchmark at smoke scale.

The end-to-end test needs the ICBM 152 2009c files (``shared/data/icbm152-2009c`` next to the
checkout, or ``LIFT3D_ICBM_DIR``) and is skipped without them. The subject maker itself is tested
in tests/test_icbm152_plugin.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "icbm_t1t2.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("icbm_t1t2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["icbm_t1t2"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("icbm_t1t2", None)


def icbm_dir(bench) -> Path:
    folder = Path(os.environ.get("LIFT3D_ICBM_DIR") or bench.DEFAULT_DATA)
    missing = [name for name in bench.TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found in {folder}; set LIFT3D_ICBM_DIR to run the ICBM benchmark smoke test")
    return folder


def test_protocol_subjects_are_the_plugins_with_the_published_seeds(bench):
    options = bench.dataset_options(Path("/data/icbm"), bench.SCALES["cpu"])
    assert {k: options[k] for k in ("num_train", "num_val", "num_test", "voxel_mm")} == {
        "num_train": 13, "num_val": 1, "num_test": 3, "voxel_mm": 2}
    assert options["files"] == {"T1": "1mm_T1.nii.gz", "T2": "1mm_T2_brain.nii.gz", "mask": "1mm_brainmask.nii.gz"}
    cfg = bench.diffusion_config("slices", Path("/tmp/x"), bench.SCALES["cpu"], options, 0, 1)
    assert cfg.data.dataset == "icbm152"


def test_missing_data_is_one_clear_error(bench, tmp_path, capsys):
    code = bench.main(["--data", str(tmp_path / "nowhere"), "--scale", "smoke", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "1mm_T1.nii.gz" in err and "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


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
    test_subjects = ["test-00", "test-01", "test-02"]
    subjects = report["data"]["subjects"]
    assert {name: (entry["split"], entry["seed"]) for name, entry in subjects.items()} == {
        **{f"train-{i:02d}": ("train", 1000 + i) for i in range(13)}, "val-00": ("val", 1500),
        **{f"test-{i:02d}": ("test", 2000 + i) for i in range(3)}}
    assert report["data"]["dataset"] == "icbm152" and not Path(report["data"]["folder"]).is_absolute()
    assert not (out / "subjects").exists()

    # Every method on the same three test subjects, with finite metrics.
    methods = report["methods"]
    assert set(methods) == {"slice-wise", "lifted", "3d-unet", "lifted-dpm", "slice-wise-dpm"}
    for name, entry in methods.items():
        assert [row["subject"] for row in entry["subjects"]] == test_subjects, name
        for row in entry["subjects"]:
            assert all(math.isfinite(row[k]) for k in ("mae", "ssim", "psnr", "z_inconsistency")), (name, row)
        assert entry["seconds_per_volume"] > 0
    # Same stage-1 weights for slice-wise, the chosen stage-2 export for lifted, whatever the sampler.
    assert methods["slice-wise"]["model"] == methods["slice-wise-dpm"]["model"]
    assert methods["slice-wise"]["model"].endswith("stage1/model")
    selection = report["selection"]
    chosen = selection["chosen"]
    assert methods["lifted"]["model"] == methods["lifted-dpm"]["model"] == chosen["folder"]
    folder = "stage2" if chosen["variant"] == "default" else "stage2_kernel_size-5"
    assert chosen["folder"].endswith(f"{folder}/model-step{chosen['stage2_steps']}")
    # The stage-2 export is the validation subject's best PSNR, among every variant and step count.
    lifted = [row for row in selection["validation"] if row["model"] == "lifted"]
    candidates = bench.SCALES["smoke"].stage2_candidates
    assert sorted((row["variant"], row["stage2_steps"]) for row in lifted) == sorted(
        (variant, k) for variant in ("default", "kernel_size=5") for k in candidates)
    best = max(lifted, key=lambda row: (row["metrics"]["psnr"]["mean"], -row["stage2_steps"]))
    assert (best["variant"], best["stage2_steps"]) == (chosen["variant"], chosen["stage2_steps"])
    assert report["selection"]["validation_subject"] == ["val-00"]
    assert report["goal"]["compared"] == "lifted vs slice-wise" and isinstance(report["goal"]["met"], bool)
    observed = report["goal"]["observed"]
    summary = {name: methods[name]["summary"] for name in ("lifted", "slice-wise")}
    assert observed["psnr_gain_db"] == pytest.approx(summary["lifted"]["psnr"]["mean"] - summary["slice-wise"]["psnr"]["mean"])

    assert (out / "views.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| (b) lifted (stage 2) | DDIM-3, x0 clip |" in (out / "results.md").read_text()


def test_stage2_variants_parse_to_config_overrides(bench):
    assert bench.parse_variant("trainable=all") == {"trainable": "all"}
    assert bench.parse_variant("where=spatial, kernel_size=5") == {"where": "spatial", "kernel_size": 5}
    assert bench.variant_folder(bench.parse_variant("kernel_size=5")) == "stage2_kernel_size-5"
    for bad, words in (("kernel=5", "kernel_size"), ("kernel_size=five", "int"), ("", "names nothing")):
        with pytest.raises(ValueError, match=words):
            bench.parse_variant(bad)
