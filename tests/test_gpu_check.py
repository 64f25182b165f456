"""benchmarks/gpu_check.py's ``--smoke`` on the CPU: every planned measurement is in the report, measured or skipped with
a reason, the fast paths (``lifted-fast``, the one- and two-pass student, the 3D U-Net's pass) among them, eager and
compiled; a failure is recorded and the rest go on; the time budget is kept; a run killed midway leaves its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import BENCHMARKS, benchmark_module

FAST = ("one-pass", "two-pass", "lifted-fast")
PASSES = {"one-pass": 1, "two-pass": 2, "lifted-fast": 4}  # K x steps; the smoke caps lifted-fast's 4 steps at 2
SYNTHESIS_FIELDS = {"seconds", "times_s", "warmup_s", "peak_bytes", "s_per_pass", "s_per_step", "unet_evaluations",
                    "dtype", "compiled_with", "wall_s"}
TRAIN_FIELDS = {"s_per_step", "step_times_s", "warmup_s", "peak_bytes", "gradient_checkpointing", "trained_parameters",
                "loss_scale", "wall_s"}
PLANNED = 4 * 2 + 12 * 2 + 6 + 1  # fast x eager/compiled, train (2 N x 2 precisions x 3 models) x 2, SYNTHESIS x 2D/lifted, 3D


def smoke(tmp_path: Path, *args: str) -> dict:
    """Run the script's CPU smoke as the device would (a process of its own), its JSON in $OUT."""
    env = {**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert report["finished"] is True and report["device"] == "cpu" and report["compile_backend"] == "eager"
    assert report["command"].startswith("python benchmarks/gpu_check.py --smoke")
    assert len(report["measurements"]) == PLANNED and {"machine", "scale", "samplers", "runtime_s"} <= report.keys()
    for m in report["measurements"]:
        if m["status"] == "skipped":
            assert m["reason"], m
        else:
            assert m["status"] == "ok", m
            assert (TRAIN_FIELDS if m["what"] == "train" else SYNTHESIS_FIELDS) <= m.keys(), m["name"]
            assert m["peak_bytes"] is None  # not measured in one CPU process
    return report


def check_fast(report: dict, compiled: bool) -> None:
    results, n = {m["name"]: m for m in report["measurements"]}, report["scale"]["fast_slices"]
    suffix = " compiled" if compiled else ""
    for name in FAST:
        m = results[f"synthesis stage2 {name} N={n}{suffix}"]
        assert m["status"] == "ok" and m["fast"] and m["solver"] == "flow" and m["objective"] == "flow", m
        assert m["unet_evaluations"] == PASSES[name] and m["samples"] == (1 if name == "one-pass" else 2)
        assert m["fused"] and m["seconds"] > 0 and m["compiled_with"] == ("eager" if compiled else False)
        assert report["ratios"]["fast"][name][f"{'compiled' if compiled else 'eager'}_s"] == m["seconds"]
    baseline = results[f"synthesis unet3d forward N={n}{suffix}"]
    assert baseline["status"] == "ok" or "MONAI" in baseline["reason"]


def test_smoke_runs_the_fast_paths(tmp_path):
    """The issue's measurements, eager, in seconds; the rest of the plan skipped with its reason."""
    report = smoke(tmp_path, "--parts", "fast", "--compile", "off")
    check_fast(report, compiled=False)
    results = {m["name"]: m for m in report["measurements"]}
    assert results["synthesis stage2 lifted-fast N=20 compiled"]["reason"] == "--compile off"
    assert results["train stage2 bf16 N=16 eager"]["reason"] == "--parts fast"
    assert [m["name"] for m in report["measurements"]][:4] == [f"synthesis stage2 {s} N=20" for s in FAST] + [
        "synthesis unet3d forward N=20"]  # first: what a short lease must not miss


@pytest.mark.slow  # every code path, torch.compile included (its eager backend on the CPU): about 2 minutes here
def test_smoke_runs_every_measurement(tmp_path):
    report = smoke(tmp_path)
    check_fast(report, compiled=False)
    check_fast(report, compiled=True)
    results = {m["name"]: m for m in report["measurements"]}
    assert results["train stage2 fp16 N=16 eager"]["reason"].startswith("fp16 needs CUDA")
    for model in ("stage2", "stage1"):
        for mode in ("eager", "compiled"):
            assert results[f"train {model} bf16 N=20 {mode}"]["status"] == "ok"
        assert results[f"synthesis {model} ddim-200 N=16"]["steps"] == 2  # capped at the smoke's size
    assert results["train stage2 bf16 N=16 eager"]["lift"]["trainable"] == "volumetric"
    assert results["synthesis stage2 flow-euler-4 N=16"]["objective"] == "flow"
    fast = report["ratios"]["fast"]
    assert all(fast[name]["compile_speedup"] > 0 for name in FAST)
    ratios = report["ratios"]["stage2/stage1"]
    assert {"train bf16 N=16 eager", "train bf16 N=20 compiled", "synthesis dpm-25 N=16"} <= ratios.keys()
    assert all(r["time"] > 0 for r in ratios.values())


def test_the_gpu_plan_and_its_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with benchmark_module("gpu_check") as gpu_check:
        args = gpu_check.parse_args(["--device", "cuda"])  # planning needs no GPU
        names = [m.name for m, reason in gpu_check.plan(args, None) if reason is None]
    assert args.compile_backend == "inductor" and args.budget_s == 450 and args.json.name == "gpu_check_cuda.json"
    assert args.json.parent.parent == tmp_path  # a temporary folder without OUT
    fast = [f"synthesis stage2 {s} N=128" for s in FAST] + ["synthesis unet3d forward N=128"]
    assert names[:4] == fast and names[16:20] == [f"{name} compiled" for name in fast]
    assert names[4:16] == [f"train {model} {p} N={n} eager" for n in (35, 100) for p in ("bf16", "fp16")
                           for model in ("stage2", "stage1", "unet3d")]
    assert "synthesis stage1 ddim-200 N=100" in names and names[-1] == "train unet3d fp16 N=100 compiled"
    assert len(names) == PLANNED


def test_nothing_starts_past_the_budget(tmp_path):
    with benchmark_module("gpu_check") as gpu_check:
        assert gpu_check.main(["--smoke", "--device", "cpu", "--budget-s", "0", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["finished"] and all(m["status"] == "skipped" for m in report["measurements"])
    assert sum("budget" in m["reason"] for m in report["measurements"]) >= 20  # all but fp16's (CUDA only)


def test_a_failure_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    def run_one(m, ctx):
        if m.name.endswith("compiled"):
            raise RuntimeError("BackendCompilerFailed: inductor\nthe rest of a long trace")
        if "two-pass" in m.name:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return {"seconds": 1.0, "unet_evaluations": 1} if m.what == "synthesis" else {"s_per_step": 1.0}

    out = tmp_path / "r.json"
    with benchmark_module("gpu_check") as gpu_check:
        monkeypatch.setattr(gpu_check, "run_one", run_one)
        gpu_check.main(["--smoke", "--device", "cpu", "--json", str(out)])
    results = {m["name"]: m for m in json.loads(out.read_text())["measurements"]}
    compiled = results["synthesis stage2 lifted-fast N=20 compiled"]
    assert compiled["status"] == "failed" and compiled["reason"] == "RuntimeError: BackendCompilerFailed: inductor"
    assert results["synthesis stage2 two-pass N=20"]["status"] == "out of memory"
    assert results["synthesis stage2 lifted-fast N=20"]["status"] == "ok"
    assert results["train stage1 bf16 N=20 eager"]["status"] == "ok"  # after the failures


def test_a_run_killed_midway_leaves_the_figures_it_had(tmp_path, monkeypatch):
    out, calls = tmp_path / "r.json", []

    def first_then_killed(m, ctx):
        calls.append(m.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a SIGINT or a kill between two measurements
        return {"seconds": 1.5, "unet_evaluations": 1, "peak_bytes": None}

    with benchmark_module("gpu_check") as gpu_check:
        monkeypatch.setattr(gpu_check, "run_one", first_then_killed)
        with pytest.raises(KeyboardInterrupt):
            gpu_check.main(["--smoke", "--device", "cpu", "--compile", "off", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["finished"] is False
    measured = [m for m in report["measurements"] if m["status"] == "ok"]
    assert [m["name"] for m in measured] == calls[:1] and measured[0]["seconds"] == 1.5
    assert report["ratios"]["fast"]["one-pass"]["eager_s"] == 1.5
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
        result = gpu_check.run_one(gpu_check.measurement("train", "stage2", 100, "bf16"), None)
    assert tried == [False, True]
    assert result["gradient_checkpointing"] and result["without_checkpointing"] == "out of memory"


def test_a_measurement_past_the_budget_is_stopped_and_the_rest_skipped(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    with benchmark_module("gpu_check") as gpu_check:
        monkeypatch.setattr(gpu_check, "run_one", lambda m, ctx: time.sleep(30))
        started = time.perf_counter()
        gpu_check.main(["--smoke", "--device", "cpu", "--budget-s", "2", "--json", str(out)])
        assert time.perf_counter() - started < 15
    statuses = [m["status"] for m in json.loads(out.read_text())["measurements"]]
    assert statuses.count("timed out") == 1 and set(statuses) == {"timed out", "skipped"}
