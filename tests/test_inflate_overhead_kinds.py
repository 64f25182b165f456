"""benchmarks/inflate_overhead.py --kinds: layer kinds and their inflate keywords measured against the 2D model in
one run, as the cost table of candidate default lifts is made."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import BENCHMARKS


@pytest.mark.slow  # a benchmark run end to end
def test_kinds_are_measured_with_their_settings(tmp_path):
    out = tmp_path / "kinds.json"
    kinds = ["full", "low-rank:rank_min=1", "low-rank", "low-rank:recompute=true", "low-rank:train_down=false"]
    done = subprocess.run([sys.executable, str(BENCHMARKS / "inflate_overhead.py"), "--small", "--slices", "3",
                           "--repeats", "1", "--threads", "1", "--presets", "--modes", "forward", "train-all",
                           "--kinds", *kinds, "--json", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LIFT3D_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    configs, results = report["configs"], report["results"]["3"]
    assert set(configs) == {"2d", *kinds}
    # the small U-Net has widths 16 and 32: C/8 gives ranks 2 and 4, the floor of 16 gives 16 and 16
    assert configs["low-rank:rank_min=1"]["ranks"] == {"16": 2, "32": 4}
    assert configs["low-rank"]["ranks"] == {"16": 16, "32": 16}
    assert configs["low-rank:rank_min=1"]["parameters"] < configs["low-rank"]["parameters"] < configs["full"]["parameters"]
    assert configs["low-rank"]["flops"] > configs["low-rank:rank_min=1"]["flops"] > configs["2d"]["flops"]
    assert "low-rank:recompute=true" not in results["forward"]  # recompute changes the train step only
    assert set(results["train-all"]) == {"2d", *kinds}
    for name in kinds:
        entry = results["train-all"][name]
        assert entry["ratio"] > 0 and entry["peak_with_model_ratio"] > 0 and entry["peak_with_model_bytes"] > 0
    assert "| low-rank:rank_min=1 | 16 | C=16: r=2, C=32: r=4 |" in done.stdout
