"""benchmarks/speed.py at tiny widths: every figure is there and sane for the 2D model, lifted models of several
kinds and settings (the inflate-overhead and layer-kinds tables) and the native 3D peer; the plan leaves out what it
should."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import BENCHMARKS, benchmark_module

needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None,
                                 reason="the native 3D peer needs MONAI (pip install 'lift3d[bench]')")
# Widths 16 and 32: low-rank's C/8 gives ranks 2 and 4, its floor of 16 gives 16 and 16; 16 divides both.
KINDS = ["full:where=resnet,naive=true", "full:where=resnet,groups=16", "full:where=resnet,groups=depthwise",
         "low-rank:rank_min=1", "low-rank:recompute=true", "full:fused=true"]


@pytest.fixture(scope="module")
def speed():
    with benchmark_module("speed") as module:
        yield module


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "speed.py"), "--size", "small", "--slices", "3", "--repeats", "1",
         "--threads", "1", "--sample-steps", "1", "--fit-check", "4", "--models", "2d", "lifted", "lifted-volumetric",
         "native3d", *KINDS, "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=300,
        env={**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


@pytest.mark.slow  # a benchmark run end to end (the module fixture)
def test_small_run_reports_every_figure(small_run):
    report, stdout = small_run
    assert {"command", "machine", "settings", "models", "autoencoders", "results", "sampling", "fit_check",
            "failures", "load", "peak_method", "runtime_s"} <= report.keys()
    assert report["failures"] == []
    models = report["models"]
    # The lifted model adds exactly its volumetric layers, and only those train in lifted-volumetric.
    added = models["lifted"]["parameters"] - models["2d"]["parameters"]
    assert added == models["lifted"]["volumetric_parameters"] > 0
    assert models["lifted-volumetric"]["trainable"] == added
    assert models["lifted"]["ranks"] == {"16": 16, "32": 16}
    assert models["low-rank:rank_min=1"]["ranks"] == {"16": 2, "32": 4}
    assert models["low-rank:rank_min=1"]["parameters"] < models["lifted"]["parameters"]
    assert models["lifted"]["flops"] > models["low-rank:rank_min=1"]["flops"] > models["2d"]["flops"]
    naive, grouped, depthwise = (models[f"full:where=resnet,{key}"] for key in ("naive=true", "groups=16",
                                                                                 "groups=depthwise"))
    assert naive["groups"] == 1 and grouped["groups"] == 16 and depthwise["groups"] == "channels"
    assert naive["volumetric_parameters"] > grouped["volumetric_parameters"] > depthwise["volumetric_parameters"]

    results = report["results"]["3"]
    assert set(results["forward"]["models"]) == set(models) - {"lifted-volumetric", "low-rank:recompute=true"}
    assert set(results["train"]["models"]) == set(models) - {"full:fused=true"}
    for mode, result in results.items():
        for name, entry in result["models"].items():
            assert entry["time_s"] > 0 and entry["cpu_s"] > 0, (mode, name, entry)
            assert entry["peak_bytes"] >= entry["peak_above_setup_bytes"] > 0, (mode, name, entry)
        for pair, ratio in result["ratios"].items():
            assert ratio["time"] > 0 and ratio["cpu"] > 0 and ratio["peak"] > 0, (mode, pair, ratio)
    assert {"lifted/2d", "lifted-volumetric/2d", "low-rank:recompute=true/2d"} <= results["train"]["ratios"].keys()

    (sampling,) = report["sampling"]
    assert sampling["n"] == 3 and sampling["steps"] == 1 and sampling["ddim200_extrapolated"]
    assert 0 < sampling["total_s"] < sampling["ddim200_s"] and sampling["decode_s"] > 0 and sampling["step_s"] > 0
    assert report["fit_check"]["peak_bytes"] > 0 and report["fit_check"]["time_s"] > 0
    assert all(ae["encode_flops_per_slice"] > 0 for ae in report["autoencoders"].values())
    assert "| lifted-volumetric |" in stdout and "| low-rank:rank_min=1 | " in stdout
    assert "C=16: r=2, C=32: r=4" in stdout


@pytest.mark.slow
@needs_monai
def test_small_run_measures_the_native_3d_peer(small_run):
    report, stdout = small_run
    assert report["models"]["native3d"]["parameters"] > report["models"]["2d"]["parameters"]
    for mode in ("forward", "train"):
        results = report["results"]["3"][mode]
        assert results["models"]["native3d"]["time_s"] > 0
        assert results["ratios"]["lifted/native3d"]["time"] > 0 and results["ratios"]["lifted/native3d"]["peak"] > 0
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


def test_model_names_give_inflate_keywords_and_benchmark_keys(speed):
    assert speed.model_settings("lifted") == {} and speed.model_settings("2d") == {}
    assert speed.model_settings("lifted-volumetric") == {"trainable": "volumetric"}
    assert speed.model_settings("full:where=resnet,naive=true") == {"kind": "full", "where": "resnet", "naive": True}


def test_plan_interleaves_and_leaves_out_what_it_should(speed):
    args = speed.parse_args(["--slices", "35", "100", "--repeats", "2", "1", "--train-repeats", "1", "--skip",
                             "*:train:100", "native3d:train:*", "--models", "2d", "lifted", "lifted-volumetric",
                             "native3d", "full:fused=true", "low-rank:recompute=true"])
    jobs = speed.plan(args)
    measured = {(n, mode, model) for _, n, mode, model in jobs}
    assert (100, "train", "2d") not in measured and (35, "train", "2d") in measured
    assert not any(model == "native3d" and mode == "train" for _, mode, model in measured)
    assert (35, "forward", "lifted-volumetric") not in measured  # its forward pass is lifted's
    assert (35, "train", "full:fused=true") not in measured
    assert (35, "forward", "low-rank:recompute=true") not in measured
    assert not any(repeat == 1 and mode == "train" for repeat, _, mode, _ in jobs)  # --train-repeats 1
    assert not any(repeat == 1 and n == 100 for repeat, n, _, _ in jobs)  # --repeats 2 1
    first = [model for repeat, n, mode, model in jobs if (repeat, n, mode) == (0, 35, "forward")]
    second = [model for repeat, n, mode, model in jobs if (repeat, n, mode) == (1, 35, "forward")]
    assert second == first[1:] + first[:1]  # the order rotates from repeat to repeat
    for bad in (["--skip", "native3d:backward:35"], ["--models", "lifted"], ["--slices", "3", "--repeats", "1", "2"]):
        with pytest.raises(SystemExit):
            speed.parse_args(bad)
