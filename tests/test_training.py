"""The training loop: both stages, resume after SIGKILL, 2 processes, faults, determinism."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lift3d.training.config import ConfigError, TrainConfig, apply
from lift3d.training.checkpoints import list_checkpoints
from lift3d.training.data_order import BatchPlan
from lift3d.training.loop import NonFiniteLossError, train
from lift3d.training.stages import get_stage

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tiny_cfg(out: Path, stage: str = "slices", **sections) -> TrainConfig:
    cfg = TrainConfig()
    apply(cfg, {
        "run": {"stage": stage, "output_dir": str(out), "max_steps": 4, "checkpoint_every": 0, "log_every": 1,
                "seed": 0},
        "data": {"dataset": "phantom", "options": {"size": 16, "num_slices": 4, "num_subjects": 5}, "batch_size": 4},
        "optim": {"learning_rate": 1e-3},
    }, "test")
    if "model" in get_stage(stage).reads:  # a stage refuses the options it ignores
        apply(cfg, {"model": {"block_out_channels": [16, 32]}}, "test")
    return apply(cfg, sections, "test")


def losses(out: Path) -> list[dict]:
    with (out / "logs" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_both_stages_loss_falls_and_stage2_starts_at_the_stage1_loss(tmp_path):
    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 25, "log_every": 5}))
    rows1 = losses(tmp_path / "s1")
    train_losses = [float(r["loss"]) for r in rows1 if r["loss"]]
    assert train_losses[-1] < 0.5 * train_losses[0]
    final_val = float([r for r in rows1 if r["val_loss"]][-1]["val_loss"])

    train(tiny_cfg(tmp_path / "s2", stage="volumes", model={"pretrained": str(stage1)},
                   data={"batch_size": 1}, run={"max_steps": 6, "log_every": 2}))
    rows2 = losses(tmp_path / "s2")
    vals = [float(r["val_loss"]) for r in rows2 if r["val_loss"]]
    assert vals[0] == final_val  # identity initialisation: exactly the stage-1 loss
    assert vals[-1] < vals[0]
    exported = tmp_path / "s2" / "model"
    assert {"lift3d.json", "volumetric.safetensors", "lift3d_training.json"} <= {p.name for p in exported.iterdir()}
    settings = json.loads((exported / "lift3d_training.json").read_text())
    assert settings["stage"] == "volumes" and settings["conditioning"] == "concat"


def test_stage2_must_predict_what_stage1_predicts(tmp_path):
    stage1 = train(tiny_cfg(tmp_path / "s1", model={"prediction_type": "v_prediction"}, run={"max_steps": 1}))
    with pytest.raises(ValueError, match=r"trained with prediction_type 'v_prediction', but this run says 'epsilon'; "
                                         r"set --model.prediction_type v_prediction"):
        train(tiny_cfg(tmp_path / "s2", stage="volumes", model={"pretrained": str(stage1)}, data={"batch_size": 1}))
    assert not (tmp_path / "s2").exists()  # refused before anything is written
    model = train(tiny_cfg(tmp_path / "s2", stage="volumes", data={"batch_size": 1}, run={"max_steps": 1},
                           model={"pretrained": str(stage1), "prediction_type": "v_prediction"}))
    settings = json.loads((model / "lift3d_training.json").read_text())
    assert settings["prediction_type"] == "v_prediction"
    assert json.loads((model / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_same_seed_gives_identical_safetensors(tmp_path):
    a = train(tiny_cfg(tmp_path / "a", run={"max_steps": 3}))
    b = train(tiny_cfg(tmp_path / "b", run={"max_steps": 3}))
    name = "diffusion_pytorch_model.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    c = train(tiny_cfg(tmp_path / "c", run={"max_steps": 3, "seed": 1}))
    assert (a / name).read_bytes() != (c / name).read_bytes()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import lift3d.training.loop as T
    from lift3d.cli.finetune import main
    from lift3d.training.state import save_training_state

    original = T.save_checkpoint

    def save_then_die(accelerator, output_dir, step, keep, state, loss=None):
        if step == 4:  # killed while writing: the temp folder exists, the rename never happens
            tmp = output_dir / f".tmp-checkpoint-{step}"
            tmp.mkdir()
            save_training_state(tmp, model=state.model, optimizer=state.optimizer, lr_scheduler=state.lr_scheduler,
                                step=step, loss=loss)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(accelerator, output_dir, step, keep, state, loss)

    T.save_checkpoint = save_then_die
    sys.exit(main(sys.argv[1:]))
""")


def write_config(path: Path, out: Path, **extra) -> Path:
    stage = extra.pop("stage", "slices")
    path.write_text(textwrap.dedent(f"""
        [run]
        stage = "{stage}"
        output_dir = "{out}"
        max_steps = {extra.pop('max_steps', 6)}
        checkpoint_every = {extra.pop('checkpoint_every', 2)}
        log_every = 1
        [data]
        dataset = "phantom"
        options = {{ size = 16, num_slices = 4, num_subjects = 5 }}
        batch_size = {extra.pop('batch_size', 4)}
        [model]
        block_out_channels = [16, 32]
        [optim]
        learning_rate = 1e-3
        warmup_steps = 2
        lr_scheduler = "linear"
    """))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # three processes; tests/test_training_state.py covers resume in one
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    config = write_config(tmp_path / "c.toml", tmp_path / "killed")
    killed = run_cli(sys.executable, "-c", KILLER, "--config", str(config), cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["checkpoint-2"]
    assert (tmp_path / "killed" / ".tmp-checkpoint-4").is_dir()  # the half checkpoint is ignored
    resumed = run_cli(str(BIN / "lift3d-finetune"), "--config", str(config), "--run.resume", "latest", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    clean = run_cli(str(BIN / "lift3d-finetune"), "--config", str(config), "--run.output_dir",
                    str(tmp_path / "clean"), cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert max_diff(weights(tmp_path / "killed" / "model"), weights(tmp_path / "clean" / "model")) <= 1e-5
    assert [p.name for p in list_checkpoints(tmp_path / "clean")] == ["checkpoint-4", "checkpoint-6"]  # keeps 2
    # The rows logged between the checkpoint and the kill are not kept twice.
    steps = lambda out: [(r["step"], bool(r["loss"])) for r in losses(out)]  # noqa: E731
    assert steps(tmp_path / "killed") == steps(tmp_path / "clean")


@pytest.mark.slow  # two accelerate launches (three processes); test_each_rank_sees_different_data is the fast check
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """README: ``accelerate launch --multi_gpu --num_processes 2 -m lift3d.finetune --config ...``
    (on a machine without GPUs Accelerate then runs 2 CPU processes over gloo)."""
    config = write_config(tmp_path / "c.toml", tmp_path / "two", max_steps=3, checkpoint_every=0, batch_size=2)
    two = run_cli(str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "-m", "lift3d.finetune",
                  "--config", str(config), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    one = run_cli(str(BIN / "accelerate"), "launch", "-m", "lift3d.finetune", "--config", str(config),
                  "--data.batch_size", "4", "--run.output_dir", str(tmp_path / "one"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "on 1 process(es)" in one.stdout
    # Same items, same per-item noise: only the order of the gradient all-reduce differs.
    assert max_diff(weights(tmp_path / "two" / "model"), weights(tmp_path / "one" / "model")) <= 1e-4


@pytest.mark.slow  # two accelerate launches
def test_accelerate_launch_runs_the_console_script_with_no_python(tmp_path):
    """README and docs: ``accelerate launch --no_python lift3d-finetune ...`` (Accelerate's own flag for a
    console script) is the same program as ``accelerate launch -m lift3d.finetune ...``."""
    config = write_config(tmp_path / "c.toml", tmp_path / "script", max_steps=2, checkpoint_every=0)
    env_path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    script = subprocess.run([str(BIN / "accelerate"), "launch", "--num_processes", "1", "--no_python", "lift3d-finetune",
                             "--config", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PATH": env_path, "PYTHONUNBUFFERED": "1"})
    assert script.returncode == 0, script.stderr[-3000:]
    module = run_cli(str(BIN / "accelerate"), "launch", "--num_processes", "1", "-m", "lift3d.finetune", "--config",
                     str(config), "--run.output_dir", str(tmp_path / "module"), cwd=tmp_path)
    assert module.returncode == 0, module.stderr[-3000:]
    assert max_diff(weights(tmp_path / "script" / "model"), weights(tmp_path / "module" / "model")) == 0


def test_each_rank_sees_different_data():
    ranks = [BatchPlan(20, 2, 2, r, seed=0) for r in range(2)]
    single = BatchPlan(20, 4, 1, 0, seed=0)
    for step in range(12):
        a, b = ranks[0].indices(step), ranks[1].indices(step)
        assert not set(a) & set(b)
        assert a + b == single.indices(step)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import lift3d.training.stages.diffusion as T

    calls = {"n": 0}
    original = T.diffusion_loss

    def poisoned(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # training calls only, not the validation loss
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(T, "diffusion_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss became \[nan\] at step 3.*checkpoint-2"):
        train(tiny_cfg(tmp_path / "nan", run={"max_steps": 5, "checkpoint_every": 2}))
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["checkpoint-2"]
    assert not (tmp_path / "nan" / "model").exists()


def test_ema_weights_are_exported(tmp_path):
    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 2}))
    out = tmp_path / "s2"
    train(tiny_cfg(out, stage="volumes", model={"pretrained": str(stage1)}, data={"batch_size": 1},
                   run={"max_steps": 3, "checkpoint_every": 3}, optim={"ema": True, "ema_decay": 0.99}))
    exported = load_file(str(out / "model" / "volumetric.safetensors"))
    raw = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    ema_norm = sum(v.norm() for v in exported.values())
    raw_norm = sum(raw[k].norm() for k in exported)
    assert 0 < ema_norm < raw_norm  # the average lags behind the raw weights, which start at zero


def test_stage1_ema_weights_are_exported(tmp_path):
    out = tmp_path / "s1"
    train(tiny_cfg(out, run={"max_steps": 3, "checkpoint_every": 3}, optim={"ema": True, "ema_decay": 0.99}))
    exported, raw = weights(out / "model"), load_file(str(out / "checkpoint-3" / "model.safetensors"))
    assert exported.keys() == raw.keys()
    assert max_diff(exported, raw) > 0  # the export holds the EMA, not the live weights


def test_latent_cache_gives_the_same_training(tmp_path):
    from lift3d_plugins.autoencoders import tiny_kl_config

    ae = {"name": "kl", "options": {"config": tiny_kl_config(block_out_channels=[8, 8, 8])}}
    runs = []
    for cache in (False, True):
        out = tmp_path / f"cache-{cache}"
        train(tiny_cfg(out, stage="volumes", autoencoder={**ae, "cache_latents": cache}, data={"batch_size": 1},
                       model={"block_out_channels": [16]}, run={"max_steps": 3}))
        runs.append(weights(out / "model"))
        assert (out / "model" / "autoencoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert max_diff(*runs) <= 1e-6  # encoded in different batch compositions: float rounding only


def test_bf16_accumulation_checkpointing_runs_train_the_weights(tmp_path):
    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 1}))
    out = train(tiny_cfg(tmp_path / "bf16", stage="volumes", model={"pretrained": str(stage1),
                         "gradient_checkpointing": True}, data={"batch_size": 1, "window": 2},
                         lift={"trainable": "all"},
                         optim={"mixed_precision": "bf16", "gradient_accumulation_steps": 2}, run={"max_steps": 2}))
    after, before = weights(out), weights(stage1)
    assert all(v.dtype == torch.float32 for v in after.values())
    base = [k for k in before if k in after]
    assert max_diff({k: after[k] for k in base}, before) > 0  # trainable = all moved the base too


def test_help_explains_every_option(capsys):
    from lift3d.cli.finetune import build_parser

    text = build_parser().format_help()
    for section, obj in vars(TrainConfig()).items():
        for name in vars(obj):
            assert f"--{section}.{name}" in text
    assert "make-a-volume" in text and "accelerate launch" in text


def test_config_errors_are_one_clear_line(tmp_path, capsys):
    from lift3d.cli.finetune import main

    assert main(["--run.stage", "volume"]) == 2
    err = capsys.readouterr().err
    assert "run.stage = 'volume' is not allowed; choose one of: autoencoder, distill, segmenter, slices, volumes" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rat = 1\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown option optim.learning_rat; available: learning_rate" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a valid int"):
        apply(TrainConfig(), {"run": {"max_steps": "many"}}, "test")
    assert main(["--data.dataset", "rire2", "--run.output_dir", str(tmp_path / "x")]) == 2
    assert "Unknown dataset 'rire2'; available:" in capsys.readouterr().err
