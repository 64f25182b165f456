"""benchmarks/icbm_t1t2.py: subjects made from one template, and the whole benchmark at smoke scale.

The end-to-end test needs the ICBM 152 2009c files (``shared/data/icbm152-2009c`` next to the
checkout, or ``LIFT3D_ICBM_DIR``) and is skipped without them; the subject tests need nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
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
    try:
        bench.check_data(folder)
    except FileNotFoundError as exc:
        pytest.skip(f"{exc}; set LIFT3D_ICBM_DIR to run the ICBM benchmark smoke test")
    return folder


def phantom_template(bench, same_contrast: bool):
    """A 24^3 ellipsoid 'brain' with structure inside, on a 2 mm grid."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij")
    mask = x**2 + y**2 / 0.8 + z**2 / 0.7 < 0.8
    t1 = ((1 + np.sin(6 * x) * np.cos(5 * y) + 0.3 * rng.random(x.shape)) * 100 * mask).astype(np.float32)
    t2 = t1.copy() if same_contrast else (300 - t1) * mask
    return bench.Template(t1, t2.astype(np.float32), mask, np.diag([2.0, 2.0, 2.0, 1.0]))


def test_deformation_is_shared_by_both_modalities_and_bias_and_noise_are_not(bench):
    template = phantom_template(bench, same_contrast=True)
    clean = bench.make_subject(template, 1000, bench.Corruption(bias_log_std=0.0, noise_fraction=0.0))
    # With T1 == T2 and neither bias nor noise, an identical deformation gives identical volumes.
    assert np.array_equal(clean["T1"], clean["T2"])
    changed = np.abs(clean["T1"] - template.t1 * clean["mask"]).mean() / template.t1[template.mask].mean()
    assert changed > 0.05, f"the deformation barely moved anything ({changed:.3f})"

    subject = bench.make_subject(template, 1000)
    assert np.array_equal(subject["mask"], clean["mask"])  # the deformation is drawn first, from the seed
    assert not np.allclose(subject["T1"], subject["T2"])  # bias field and noise are drawn per modality
    for name in ("T1", "T2"):
        assert (subject[name][~subject["mask"]] == 0).all()
        assert (subject[name] >= 0).all()
    again = bench.make_subject(template, 1000)
    assert all(np.array_equal(again[k], subject[k]) for k in subject)
    other = bench.make_subject(template, 2000)
    assert not np.array_equal(other["mask"], subject["mask"])


def test_subject_seeds_are_disjoint_and_as_documented(bench):
    plan = bench.subject_plan()
    by_split = {split: [seed for _, s, seed in plan if s == split] for split in ("train", "val", "test")}
    assert by_split == {"train": list(range(1000, 1013)), "val": [1500], "test": [2000, 2001, 2002]}
    assert len({name for name, _, _ in plan}) == 17


def test_missing_data_is_one_clear_error(bench, tmp_path, capsys):
    code = bench.main(["--data", str(tmp_path / "nowhere"), "--scale", "smoke", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "1mm_T1.nii.gz" in err and "nowhere" in err and "Traceback" not in err


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

    # Subjects: written with the template's geometry, skull-stripped, split as planned.
    test_subjects = ["test-00", "test-01", "test-02"]
    assert sorted(p.name for p in (out / "subjects").iterdir() if p.is_dir()) == sorted(
        name for name, _, _ in bench.subject_plan())
    images = {k: nib.load(out / "subjects" / "test-00" / f"{k}.nii.gz") for k in ("T1", "T2", "mask")}
    assert nib.aff2axcodes(images["T1"].affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(images["T1"].affine[:3, :3], axis=0), [4.0, 4.0, 4.0])
    mask = images["mask"].get_fdata() > 0.5
    for name in ("T1", "T2"):
        np.testing.assert_allclose(images[name].affine, images["mask"].affine)
        volume = images[name].get_fdata()
        assert (volume[~mask] == 0).all() and (volume[mask] > 0).mean() > 0.9

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
