"""benchmarks/speed.py at tiny widths: every figure is there and sane; the native 3D peer matches the 2D model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "speed.py"
HAS_MONAI = importlib.util.find_spec("monai") is not None
needs_monai = pytest.mark.skipif(not HAS_MONAI, reason="the native 3D peer needs MONAI (pip install 'lift3d[bench]')")


@pytest.fixture(scope="module")
def speed():
    sys.path.insert(0, str(BENCHMARKS))  # speed.py imports its sibling inflate_overhead.py
    try:
        spec = importlib.util.spec_from_file_location("speed", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    env = {**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--slices", "3", "--repeats", "1", "--threads", "1",
         "--sample-steps", "1", "--fit-check", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


@pytest.mark.slow  # a benchmark run end to end (the module fixture)
def test_small_run_reports_every_figure(small_run):
    report, stdout = small_run
    assert {"command", "machine", "settings", "models", "results", "targets", "sampling", "fit_check", "skipped",
            "failures", "load", "peak_method", "runtime_s"} <= report.keys()
    assert report["failures"] == []
    models = report["models"]
    # The lifted model adds exactly its volumetric layers, and only those train in lifted-volumetric.
    added = models["lifted"]["parameters"] - models["2d"]["parameters"]
    assert added > 0 and models["lifted-volumetric"]["trainable"] == added
    assert models["lifted"]["flops"] > models["2d"]["flops"]

    results = report["results"]["3"]
    expected = {"forward": {"2d", "lifted"}, "train": {"2d", "lifted", "lifted-volumetric"}}
    for mode, names in expected.items():
        entries = results[mode]["models"]
        assert names <= entries.keys(), (mode, entries.keys())
        for name, entry in entries.items():
            assert entry["time_s"] > 0 and entry["peak_bytes"] > 0, (mode, name, entry)
        for pair, ratio in results[mode]["ratios"].items():
            assert ratio["time"] > 0 and ratio["peak"] > 0, (mode, pair, ratio)
    assert "lifted/2d" in results["train"]["ratios"] and "lifted-volumetric/2d" in results["train"]["ratios"]
    assert {check["ratio"] for check in report["targets"]} >= {"lifted/2d", "lifted-volumetric/2d"}

    (sampling,) = report["sampling"]
    assert sampling["steps"] == 1 and sampling["ddim200_extrapolated"]
    assert 0 < sampling["total_s"] < sampling["ddim200_s"] and sampling["decode_s"] > 0 and sampling["step_s"] > 0
    assert report["fit_check"]["peak_bytes"] > 0 and report["fit_check"]["time_s"] > 0
    assert report["load"]["samples"] and "| lifted-volumetric |" in stdout


@pytest.mark.slow
@needs_monai
def test_small_run_measures_the_native_3d_peer(small_run):
    report, stdout = small_run
    assert report["models"]["native3d"]["parameters"] > report["models"]["2d"]["parameters"]
    for mode in ("forward", "train"):
        results = report["results"]["3"][mode]
        assert results["models"]["native3d"]["time_s"] > 0
        assert results["ratios"]["lifted/native3d"]["time"] > 0 and results["ratios"]["lifted/native3d"]["peak"] > 0
    assert "lifted/native3d" in {check["ratio"] for check in report["targets"]}
    assert "| lifted / native3d |" in stdout


@needs_monai
def test_native3d_config_mirrors_the_2d_model(speed):
    config = speed.native3d_config(speed.UNET_CONFIGS["full"])
    assert config["channels"] == (128, 256, 512, 512) and config["num_res_blocks"] == 2
    assert config["attention_levels"] == (False, False, True, False)  # AttnDownBlock2D at the third level only
    assert config["num_head_channels"] == 8 and config["norm_num_groups"] == 32
    assert (config["in_channels"], config["out_channels"], config["spatial_dims"]) == (6, 3, 3)


@needs_monai
def test_native3d_pads_the_depth_and_crops_it_back(speed):
    model = speed.build_model("small", "native3d").eval()
    assert model.depth_multiple == 2
    x = torch.randn(1, 6, 3, 16, 16)  # 3 slices: padded to 4 inside, 3 out
    with torch.no_grad():
        out = model(x, torch.tensor([10])).sample
    assert out.shape == (1, 3, 3, 16, 16)


def test_skip_patterns_leave_out_what_they_name(speed):
    args = speed.parse_args(["--slices", "35", "100", "--skip-train-at", "100", "--skip", "native3d:train:*"])
    jobs, skipped = speed.plan(args)
    measured = {(n, mode, model) for _, n, mode, model in jobs}
    assert (100, "train", "2d") not in measured and (35, "train", "2d") in measured
    assert not any(model == "native3d" and mode == "train" for _, mode, model in measured)
    assert (35, "forward", "lifted-volumetric") not in measured  # its forward pass is lifted's
    assert any(line.startswith("2d train N=100") for line in skipped)
    with pytest.raises(SystemExit):
        speed.parse_args(["--skip", "native4d:train:35"])
