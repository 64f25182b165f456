"""benchmarks/gpu_check.py at the tiny scale on the CPU: every measurement it plans is in the report, measured or
skipped with a reason, the time budget is kept, and a run killed midway leaves the figures it had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import BENCHMARKS, benchmark_module

TRAIN_FIELDS = {"s_per_step", "step_times_s", "warmup_s", "peak_bytes", "peak_method", "gradient_checkpointing",
                "trained_parameters", "wall_s"}
SYNTHESIS_FIELDS = {"seconds", "steps", "s_per_step", "warmup_s", "peak_bytes", "objective", "scheduler",
                    "unet_evaluations", "dtype", "wall_s"}


@pytest.mark.slow  # every planned measurement, for real; the tests below check the plan and the report fast
def test_tiny_cpu_run_reports_every_measurement(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--compile", "off", "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"] is True and report["device"] == "cpu" and report["command"].startswith("python benchmarks")
    assert {"machine", "scale", "budget_s", "synthesis_settings", "protocol", "ratios", "runtime_s"} <= report.keys()
    assert [s["name"] for s in report["synthesis_settings"]] == ["flow-euler-4", "dpm-25", "ddim-200"]
    results = {m["name"]: m for m in report["measurements"]}
    # 2 N x 2 precisions x 3 models x eager/compiled, 3 settings x lifted/2D, one 3D forward
    assert len(results) == len(report["measurements"]) == 24 + 6 + 1
    for m in results.values():
        assert m["status"] in ("ok", "skipped"), m
        if m["status"] == "skipped":
            assert m["reason"], m
            continue
        fields = TRAIN_FIELDS if m["what"] == "train" else {"seconds", "warmup_s", "peak_bytes", "wall_s"}
        if m["what"] == "synthesis" and m["model"] != "unet3d":
            fields = SYNTHESIS_FIELDS
        assert fields <= m.keys(), (m["name"], fields - m.keys())
        assert m["peak_bytes"] is None  # not measured in one CPU process
        assert (m.get("s_per_step") or m["seconds"]) > 0
    assert results["train stage2 fp16 N=16 eager"]["reason"].startswith("fp16 needs CUDA")
    assert results["train stage2 bf16 N=16 compiled"]["reason"] == "--compile off"
    for model in ("stage2", "stage1"):
        assert results[f"train {model} bf16 N=20 eager"]["status"] == "ok"
        assert results[f"synthesis {model} ddim-200 N=16"]["steps"] == 2  # capped at the tiny scale
    assert results["synthesis stage2 flow-euler-4 N=16"]["objective"] == "flow"
    assert results["train stage2 bf16 N=16 eager"]["lift"]["trainable"] == "volumetric"
    baseline = results["train unet3d bf16 N=16 eager"]
    assert baseline["status"] == "ok" or "MONAI" in baseline["reason"]
    ratios = report["ratios"]["stage2/stage1"]
    assert {"train bf16 N=16 eager", "train bf16 N=20 eager", "synthesis dpm-25 N=16"} <= ratios.keys()
    assert all(r["time"] > 0 for r in ratios.values())


def test_nothing_starts_past_the_budget(tmp_path):
    with benchmark_module("gpu_check") as gpu_check:
        assert gpu_check.main(["--tiny", "--device", "cpu", "--budget-s", "0", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["finished"] and all(m["status"] == "skipped" for m in report["measurements"])
    budget = [m for m in report["measurements"] if m["reason"].startswith("time budget")]
    assert len(budget) >= 6  # every eager bf16 step and every synthesis, at least


def test_a_run_killed_midway_leaves_the_figures_it_had(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    with benchmark_module("gpu_check") as gpu_check:
        calls = []

        def first_then_killed(m, ctx):
            calls.append(m.name)
            if len(calls) == 2:
                raise KeyboardInterrupt  # as a SIGINT or a kill between two measurements
            return {"s_per_step": 1.5, "step_times_s": [1.5], "peak_bytes": None}

        monkeypatch.setattr(gpu_check, "run_one", first_then_killed)
        with pytest.raises(KeyboardInterrupt):
            gpu_check.main(["--tiny", "--device", "cpu", "--compile", "off", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["finished"] is False
    measured = [m for m in report["measurements"] if m["status"] == "ok"]
    assert [m["name"] for m in measured] == calls[:1] and measured[0]["s_per_step"] == 1.5
    assert not list(Path(tmp_path).glob(".*.tmp"))


def test_a_step_out_of_memory_is_retried_with_gradient_checkpointing():
    with benchmark_module("gpu_check") as gpu_check:
        tried = []

        def train_steps(m, ctx, checkpointing):
            tried.append(checkpointing)
            if not checkpointing:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
            return {"s_per_step": 2.0, "gradient_checkpointing": True}

        gpu_check.train_steps = train_steps
        result = gpu_check.run_one(gpu_check.Measurement("train", "stage2", 100, "bf16"), None)
    assert tried == [False, True]
    assert result["gradient_checkpointing"] and result["without_checkpointing"] == "out of memory"


def test_a_measurement_past_the_budget_is_stopped_and_the_rest_skipped(tmp_path, monkeypatch):
    import time

    out = tmp_path / "r.json"
    with benchmark_module("gpu_check") as gpu_check:
        monkeypatch.setattr(gpu_check, "run_one", lambda m, ctx: time.sleep(30))
        started = time.perf_counter()
        gpu_check.main(["--tiny", "--device", "cpu", "--budget-s", "2", "--json", str(out)])
        assert time.perf_counter() - started < 15
    statuses = [m["status"] for m in json.loads(out.read_text())["measurements"]]
    assert statuses.count("timed out") == 1 and set(statuses) == {"timed out", "skipped"}
