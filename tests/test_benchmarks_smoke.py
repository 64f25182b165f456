"""benchmarks/inflate_overhead.py at tiny widths: it runs end to end and reports sane figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lift3d

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inflate_overhead.py"


@pytest.mark.slow  # a benchmark run end to end
def test_inflate_overhead_small_reports_every_configuration(tmp_path):
    out = tmp_path / "overhead.json"
    env = {**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--slices", "3", "--repeats", "1", "--threads", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"command", "machine", "model", "settings", "configs", "results", "peak_method"} <= report.keys()

    lifted = [*lift3d.PRESETS, "resnet/naive", "resnet/grouped"]
    configs = report["configs"]
    assert set(configs) == {"2d", *lifted}
    for name in lifted:
        assert configs[name]["volumetric_parameters"] > 0 and configs[name]["flops"] > configs["2d"]["flops"]
    # Placement and grouping order the overhead as designed: one layer per block is half of one per
    # conv (two convs per block), grouped is far below full, and the literal path has the same weights.
    assert configs["block-output"]["volumetric_parameters"] * 2 == configs["resnet"]["volumetric_parameters"]
    assert configs["resnet/grouped"]["volumetric_parameters"] < configs["resnet"]["volumetric_parameters"] / 4
    assert configs["resnet/naive"]["volumetric_parameters"] == configs["resnet"]["volumetric_parameters"]
    assert configs["resnet"]["depthwise_parameters"] < configs["resnet/grouped"]["volumetric_parameters"]

    results = report["results"]["3"]
    assert set(results) == {"forward", "train-all", "train-volumetric"}
    assert set(results["forward"]) == {"2d", *lifted}
    assert set(results["train-all"]) == {"2d", *lift3d.PRESETS}
    assert set(results["train-volumetric"]) == set(lift3d.PRESETS)
    for mode, entries in results.items():
        for name, entry in entries.items():
            assert entry["time_s"] > 0 and entry["peak_bytes"] > 0, (mode, name, entry)
            if name != "2d":
                assert entry["ratio"] > 0 and entry["peak_ratio"] > 0, (mode, name, entry)
    assert "| resnet/naive |" in completed.stdout
