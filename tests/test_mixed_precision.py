"""What the GPU path needs, checked on the CPU: a bf16 stage-2 step through the loop, a compiled lifted model,
and an fp16 loss scaler that survives resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lift3d
from lift3d.lifting import hooks
from lift3d.training import loop
from lift3d.training.config import TrainConfig, apply
from lift3d.training.loop import train
from lift3d.training.state import SCALER, load_training_state, save_training_state
from tests.conftest import tiny_unet2d


def tiny_cfg(out: Path, stage: str = "slices", **sections) -> TrainConfig:
    cfg = apply(TrainConfig(), {
        "run": {"stage": stage, "output_dir": str(out), "max_steps": 2, "checkpoint_every": 0, "log_every": 1,
                "seed": 0},
        "data": {"dataset": "phantom", "options": {"size": 16, "num_slices": 4, "num_subjects": 3}, "batch_size": 4},
        "model": {"block_out_channels": [16, 32]},
        "optim": {"learning_rate": 1e-3},
    }, "test")
    return apply(cfg, sections, "test")


def first_loss(out: Path) -> float:
    with (out / "logs" / "metrics.csv").open() as f:
        return float(next(r["loss"] for r in csv.DictReader(f) if r["loss"]))


def test_bf16_stage2_step_runs_under_autocast_and_matches_fp32(tmp_path, monkeypatch, one_thread):
    """Accelerate's bf16 on the CPU (``native_amp``): the volumetric layers see bf16 activations, the trained
    weights stay fp32, and the first step's loss is the fp32 loss within bf16 rounding (2 % relative)."""
    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 1}))
    seen: dict[str, set] = {}
    original = hooks.HostHook.__call__

    def recording(self, host, args, output):
        seen.setdefault(current, set()).add(output.dtype)
        return original(self, host, args, output)

    monkeypatch.setattr(hooks.HostHook, "__call__", recording)
    losses, exported = {}, {}
    for current in ("no", "bf16"):
        out = tmp_path / current
        exported[current] = train(tiny_cfg(out, stage="volumes", model={"pretrained": str(stage1)},
                                           data={"batch_size": 1}, optim={"mixed_precision": current}))
        losses[current] = first_loss(out)
    assert seen["bf16"] == {torch.bfloat16} and seen["no"] == {torch.float32}
    weights = load_file(str(exported["bf16"] / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    volumetric = {k: v for k, v in weights.items() if lift3d.is_volumetric_parameter(k)}
    assert any(v.abs().sum() > 0 for v in volumetric.values())  # the step trained the (zero-started) layers
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.02)
    assert losses["bf16"] != losses["no"]  # it did run in bf16


@pytest.mark.slow
def test_compiled_lifted_model_matches_eager(one_thread):
    """torch.compile (inductor) of a lifted U-Net with trained-like layers: output and gradients match eager
    within fp32 reordering, rtol = atol = 1e-4 (outputs of order 1). One forward and backward of each."""
    unet = lift3d.inflate(tiny_unet2d()).train()
    generator = torch.Generator().manual_seed(0)
    for _, layer in lift3d.volumetric_layers(unet):
        layer.init_random_(std=0.05, generator=generator)
    volume, t = torch.randn(2, 2, 4, 16, 16, generator=generator), torch.tensor([10, 700])

    def run(model):
        unet.zero_grad(set_to_none=True)
        out = model(volume, t).sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}

    eager_out, eager_grads = run(unet)
    compiled_out, compiled_grads = run(torch.compile(unet))
    assert compiled_out.shape == (2, 1, 4, 16, 16)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-4)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-4, msg=name)
    assert max(g.abs().max() for n, g in eager_grads.items() if lift3d.is_volumetric_parameter(n)) > 0


def cpu_scaler() -> torch.amp.GradScaler:
    """fp16's loss scaler on the CPU: scale 2**10, doubled after every 2 steps without inf or NaN."""
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)


def test_scaler_state_round_trips_through_a_checkpoint_folder(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = cpu_scaler()
    for poison in (False, True, False):  # one step with an inf gradient backs the scale off and is skipped
        loss = model(torch.ones(1, 3)).sum() * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        schedule.step()
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0 ** 9 and saved["_growth_tracker"] == 1  # not a fresh scaler's state
    save_training_state(tmp_path, model=model, optimizer=optimizer, lr_scheduler=schedule, scaler=scaler, step=3,
                        loss=None)
    assert json.loads((tmp_path / SCALER).read_text())["scale"] == 2.0 ** 9
    fresh = cpu_scaler()
    load_training_state(tmp_path, model=model, optimizer=optimizer, lr_scheduler=schedule, scaler=fresh)
    assert fresh.state_dict() == saved


def test_fp16_loss_scaler_survives_resume(tmp_path, monkeypatch, one_thread):
    """The loop's fp16 path on the CPU: lift3d refuses fp16 there (Accelerate would train in fp32 without a
    scaler), so the test lets it through and gives the Accelerator a CPU GradScaler, which the loop then
    uses as it uses CUDA's (scaled backward, step and update through Accelerate, saved as scaler.json).
    A run resumed at step 2 must end at step 4 with the scaler of an uninterrupted run: scale 2**12 after
    two doublings. Had the resume lost the scaler, it would restart at 2**10 and end at 2**11."""
    monkeypatch.setattr(loop, "check_run_options", lambda cfg: None)
    original = loop.make_accelerator

    def with_scaler(cfg, output_dir):
        accelerator = original(cfg, output_dir)
        accelerator.scaler = cpu_scaler()
        return accelerator

    monkeypatch.setattr(loop, "make_accelerator", with_scaler)
    fp16 = {"mixed_precision": "fp16", "max_grad_norm": 0.0}  # no clipping: Accelerate unscales for it only on a GPU
    train(tiny_cfg(tmp_path / "whole", run={"max_steps": 4, "checkpoint_every": 2}, optim=fp16))
    train(tiny_cfg(tmp_path / "resumed", run={"max_steps": 2, "checkpoint_every": 2}, optim=fp16))
    assert json.loads((tmp_path / "resumed" / "checkpoint-2" / SCALER).read_text())["scale"] == 2.0 ** 11
    train(tiny_cfg(tmp_path / "resumed", run={"max_steps": 4, "checkpoint_every": 2, "resume": "latest"}, optim=fp16))
    states = [json.loads((tmp_path / run / "checkpoint-4" / SCALER).read_text()) for run in ("whole", "resumed")]
    assert states[0] == states[1] and states[0]["scale"] == 2.0 ** 12
    weights = [load_file(str(tmp_path / run / "model" / "diffusion_pytorch_model.safetensors"))
               for run in ("whole", "resumed")]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) <= 1e-6
