"""Two machines, emulated on one: two ``accelerate launch`` processes, one per "machine" (``--num_machines 2
--machine_rank 0/1``, rendezvous on 127.0.0.1, gloo on the CPU), train stage 2 as one process does with the
same global batch (docs/pages/training.md, "Several machines")."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lift3d

BIN = Path(sys.executable).parent
WEIGHTS = "diffusion_pytorch_model.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(path: Path, out: Path, stage: str, batch_size: int, pretrained: Path | None = None) -> Path:
    path.write_text(textwrap.dedent(f"""
        [run]
        stage = "{stage}"
        output_dir = "{out}"
        max_steps = 3
        checkpoint_every = 0
        log_every = 1
        threads = 1
        [data]
        dataset = "phantom"
        options = {{ size = 16, num_slices = 4, num_subjects = 5 }}
        batch_size = {batch_size}
        [model]
        block_out_channels = [16, 32]
        pretrained = "{pretrained or ''}"
        [lift]
        trainable = "all"
        [optim]
        learning_rate = 1e-3
    """))
    return path


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def launch(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "accelerate"), "launch", *args], cwd=cwd, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    assert process.returncode == 0, err[-3000:]
    return out, err


@pytest.mark.slow
def test_two_machines_match_one_process_with_the_same_global_batch(tmp_path):
    stage1 = tmp_path / "stage1"
    finish(launch("--num_processes", "1", "-m", "lift3d.finetune", "--config",
                  str(config(tmp_path / "s1.toml", stage1, "slices", 4)), cwd=tmp_path))
    # One volume per machine, two machines: the global batch of the single process's two volumes.
    two = config(tmp_path / "two.toml", tmp_path / "two", "volumes", 1, stage1 / "model")
    port = str(free_port())
    machines = [launch("--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                       "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--rdzv_backend", "static",
                       "-m", "lift3d.finetune", "--config", str(two), cwd=tmp_path) for rank in (0, 1)]
    outputs = [finish(machine) for machine in machines]
    assert "on 2 process(es)" in outputs[0][0]
    one = config(tmp_path / "one.toml", tmp_path / "one", "volumes", 2, stage1 / "model")
    out, _ = finish(launch("--num_processes", "1", "-m", "lift3d.finetune", "--config", str(one), cwd=tmp_path))
    assert "on 1 process(es)" in out
    a, b = (load_file(str(tmp_path / run / "model" / WEIGHTS)) for run in ("two", "one"))
    start = load_file(str(stage1 / "model" / WEIGHTS))
    assert a.keys() == b.keys()
    # Same items and per-item noise; only the order of the gradient all-reduce differs: 1e-5, against a
    # training that moved the weights by far more.
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - start[k]).abs().max().item() for k in start) > 1e-3
    assert any(lift3d.is_volumetric_parameter(k) for k in a) and all(torch.isfinite(v).all() for v in a.values())
