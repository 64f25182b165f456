"""benchmarks/icbm_fast.py at smoke scale: the few-step frontier end to end (needs the ICBM 152 files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import benchmark_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "icbm_fast.py"


@pytest.fixture(scope="module")
def fast():
    with benchmark_module("icbm_t1t2"), benchmark_module("icbm_fast") as module:  # icbm_fast imports icbm_t1t2
        yield module


def test_evaluations_count_as_the_sampler_does(fast):
    from dataclasses import replace

    base = fast.Method("m", "", Path("x"), {"run_id": "0"}, scheduler="flow", steps=8)
    assert fast.evaluations(base) == 8
    assert fast.evaluations(replace(base, samples=4, steps=2)) == 8
    assert fast.evaluations(replace(base, start="estimate", strength=0.25)) == 3  # 1 estimate + 2 of 8 steps
    assert fast.evaluations(replace(base, start="source", strength=0.5)) == 4
    tried = fast.candidates(base, {"flow": base, "flow-tuned": base, "flow-matched": base})
    assert all(fast.evaluations(m) <= fast.FAST_BUDGET for _, m in tried.values())
    assert {family for family, _ in tried.values()} == {"ddpm", "flow", "flow-tuned", "flow-matched"}
    assert all(name.startswith(family + "-") for name, (family, _) in tried.items())


@pytest.mark.slow
def test_smoke_frontier_end_to_end(fast, tmp_path):
    import icbm_t1t2

    data = Path(os.environ.get("LIFT3D_ICBM_DIR") or icbm_t1t2.DEFAULT_DATA)
    if not all((data / name).is_file() for name in icbm_t1t2.TEMPLATE_FILES.values()):
        pytest.skip(f"ICBM 152 files not found in {data}; set LIFT3D_ICBM_DIR")
    out = tmp_path / "icbm"
    completed = subprocess.run([sys.executable, str(SCRIPT), "--scale", "smoke", "--data", str(data), "--out", str(out),
                                "--timing-repeats", "1", "--flow-variant", "learning_rate=0.004"], capture_output=True, text=True, timeout=900,
                               env={**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "fast_results.json").read_text())
    fast_name = report["selection"]["lifted_fast"]
    row = report["methods"][fast_name]
    assert row["unet_evaluations"] <= 8 and len(row["subjects"]) == 6
    assert report["seconds_per_volume"][fast_name] > 0 and report["seconds_per_volume"]["3d-unet"] > 0
    assert {f"{fast_name} vs lifted-k4", f"{fast_name} vs 3d-unet"} <= set(report["paired_differences"])
    assert {r["family"] for r in report["selection"]["candidates"]} == {"ddpm", "flow", "flow-tuned", "flow-matched"}
    assert (tmp_path / "icbm-flow" / "stage2_train_steps-4" / "model").is_dir()
    assert (tmp_path / "icbm-flow" / "stage2_learning_rate-0.004" / "model").is_dir()
    assert report["models"]["flow"]["flow-tuned"]["variant"] == "learning_rate=0.004"
    assert (out / "fast_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_tables_the_published_frontier(fast):
    published = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "icbm_fast_cpu.json"
    report = json.loads(published.read_text())
    text = fast.markdown(report)
    fast_name = report["selection"]["lifted_fast"]
    assert f"`lifted-fast` ({fast_name})" in text
    assert text.count("| lifted-k8 |") == 2 and text.count("| 3d-unet |") == 2
    assert "3D U-Net (MONAI BasicUNet, L1)" in text
    frontier = text.split("\n\n")[0].splitlines()
    assert len(frontier) >= 2 + len(fast.BUDGETS) + 4  # header, rule, a row per budget, the 4 references
    assert {line.count("|") for line in frontier} == {10}  # 9 columns in every row


def test_merged_pairs_lifted_fast_with_the_protocol_files_own_rows(fast):
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    # The run on the protocol's own models (same references), not the later retrained one.
    report = json.loads((results / "icbm_fast_cpu_protocol_models.json").read_text())
    protocol_run = json.loads((results / "icbm_cpu.json").read_text())
    fast_name = report["selection"]["lifted_fast"]

    whole = fast.merged(protocol_run, report)  # the same models: the in-run pairs are the published pairs
    assert whole["methods"]["lifted-fast"]["frontier_run"]["same_references"] == {"lifted-k8": True, "3d-unet": True}
    in_run = report["paired_differences"][f"{fast_name} vs lifted-k8"]["target"]["psnr"]["mean"]
    assert whole["paired_differences"]["lifted-fast vs lifted-k8"]["target"]["psnr"]["mean"] == pytest.approx(in_run)
    assert "lifted-fast" not in json.dumps(protocol_run["methods"].get("lifted-k8", {}))  # input left alone

    # References trained again elsewhere: the file pairs lifted-fast with its own lifted-k8, and says so.
    for row in protocol_run["methods"]["lifted-k8"]["subjects"]:
        row["psnr"] += 1.0
    whole = fast.merged(protocol_run, report)
    assert whole["methods"]["lifted-fast"]["frontier_run"]["same_references"]["lifted-k8"] is False
    assert whole["paired_differences"]["lifted-fast vs lifted-k8"]["target"]["psnr"]["mean"] == pytest.approx(in_run - 1.0)
