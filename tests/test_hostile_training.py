"""Training as a hostile or careless user meets it (issue 21): run folders that belong to one run,
checkpoint files that are all checked before use, writes that leave nothing partial, options that
say what this machine can do. Plus fuzz tests of every checkpoint file.

Tests lift3d/training/loop.py, lift3d/training/state.py and lift3d/training/tracking.py.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lift3d.training.state as TS
from lift3d.lifting.checkpoint import CheckpointError
from lift3d.cli.finetune import main
from lift3d.io.errors import Lift3dError, RunFolderError, UnsafePathError
from lift3d.io.writing import LOCK_FILE, is_temporary, temporary_path
from lift3d.training.checkpoints import list_checkpoints
from lift3d.training.loop import train
from test_training import losses, tiny_cfg
from tests.conftest import fuzz_examples

CLI_DATA = ["--data.options", "{size = 16, num_slices = 4, num_subjects = 5}", "--model.block_out_channels", "[16, 32]",
            "--run.stage", "slices"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def overwriting(cfg):
    """``run.overwrite = true``, set as the config layer will once RunConfig has the field."""
    cfg.run.overwrite = True
    return cfg


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if is_temporary(p.name) or ".tmp" in p.name)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run: checkpoints at steps 2 and 4 (EMA on), an exported model, its log."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_cfg(out, run={"max_steps": 4, "checkpoint_every": 2}, optim={"ema": True}))
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    return folder


def resume(folder: Path, **run):
    return tiny_cfg(folder, run={"max_steps": 4, "checkpoint_every": 2, "resume": "latest", **run}, optim={"ema": True})


# --------------------------------------------------------------------------------------------
# A run folder belongs to one run


HOLDER = ("import sys; from lift3d.io.writing import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
          "print('held', flush=True); sys.stdin.read()")


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(finished, tmp_path, capsys):
    folder = copy_of(finished, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(folder)
        with pytest.raises(RunFolderError, match=rf"{re.escape(str(folder))} is in use by another lift3d run "
                                                 rf"\(PID {holder.pid}\)"):
            train(resume(folder))
        code = main(CLI_DATA + ["--run.output_dir", str(folder), "--run.resume", "latest", "--optim.ema", "true",
                                "--run.max_steps", "4", "--optim.learning_rate", "1e-3"])  # as it was checkpointed
        err = capsys.readouterr().err
        assert code == 2 and f"PID {holder.pid}" in err and err.count("\n") == 1
        assert snapshot(folder) == before  # metrics.csv neither appended nor interleaved
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    train(resume(folder))  # the lock went with its holder
    assert (folder / "model").is_dir()


def test_a_fresh_run_in_an_old_runs_folder_is_refused_unless_told(finished, tmp_path, capsys):
    folder = copy_of(finished, tmp_path)
    before = snapshot(folder)
    with pytest.raises(RunFolderError) as refused:
        train(tiny_cfg(folder, run={"max_steps": 2, "checkpoint_every": 1}))
    message = str(refused.value)
    assert f"run.output_dir {folder} already holds another run's work (checkpoint-2, checkpoint-4, model)" in message
    assert "--run.resume latest" in message and "--run.overwrite true" in message
    assert snapshot(folder) == before
    # Resuming an earlier checkpoint with later ones beside it would rotate them into each other.
    with pytest.raises(RunFolderError, match=r"holds another run's work \(checkpoint-4\)"):
        train(resume(folder, resume=str(folder / "checkpoint-2")))
    assert snapshot(folder) == before
    assert main(CLI_DATA + ["--run.output_dir", str(folder)]) == 2
    assert "already holds another run's work" in capsys.readouterr().err
    # Told to overwrite: the old run's checkpoints and model go first, so rotation keeps this run's own.
    train(overwriting(tiny_cfg(folder, run={"max_steps": 3, "checkpoint_every": 1, "checkpoints_keep": 2})))
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2", "checkpoint-3"]
    assert not (folder / "checkpoint-4").exists()
    assert TS.read_trainer_state(folder / "checkpoint-3").step == 3
    assert [r["step"] for r in losses(folder) if r["loss"]] == ["1", "2", "3"]


def test_a_model_folder_alone_is_another_runs_work_too(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, run={"max_steps": 1}))
    exported = snapshot(out / "model")
    for run in ({}, {"resume": "latest"}):  # nothing to resume: this would be a fresh run over the model
        with pytest.raises(RunFolderError, match=r"already holds another run's work \(model\); a fresh run there "
                                                 r"would replace its exported model"):
            train(tiny_cfg(out, run={"max_steps": 1, **run}))
    assert snapshot(out / "model") == exported


@pytest.mark.parametrize("where", ["run folder", "model folder", "inside the model", "via a link"])
def test_stage2_refuses_an_output_dir_around_its_pretrained_model(tmp_path, capsys, where):
    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 1, "checkpoint_every": 1}))
    (tmp_path / "link").symlink_to(tmp_path / "s1")
    out = {"run folder": tmp_path / "s1", "model folder": stage1, "inside the model": stage1 / "stage2",
           "via a link": tmp_path / "link"}[where]
    before = snapshot(tmp_path / "s1")
    cfg = tiny_cfg(out, stage="volumes", model={"pretrained": str(stage1)}, data={"batch_size": 1},
                   run={"max_steps": 1})
    for attempt in (cfg, overwriting(cfg)):  # overwrite would delete the model it starts from: never
        with pytest.raises(RunFolderError, match=rf"run.output_dir {re.escape(str(out))} (is|contains|lies inside) "
                                                 rf"model.pretrained {re.escape(str(stage1))}: this run would "
                                                 "overwrite the model it starts from"):
            train(attempt)
    capsys.readouterr()
    assert main(["--model.pretrained", str(stage1), "--run.output_dir", str(out), "--data.options",
                 "{size = 16, num_slices = 4, num_subjects = 5}"]) == 2
    err = capsys.readouterr().err
    assert "this run would overwrite the model it starts from" in err and err.count("\n") == 1
    assert snapshot(tmp_path / "s1") == before


# --------------------------------------------------------------------------------------------
# Every checkpoint file is checked: one line naming it, nothing written


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value), allow_nan=True))


def with_key(key, value):
    return lambda d: {**d, key: value}


BAD_JSON = [
    ("trainer_state.json", with_key("step", -5), "step must be >= 0, got -5"),
    ("trainer_state.json", with_key("step", 10**20), "step must be <= 1000000000, got 100000000000000000000"),
    ("trainer_state.json", with_key("step", True), "step must be an integer, got True"),
    ("trainer_state.json", with_key("format", 2), "format 2 is not one this lift3d reads (1)"),
    ("trainer_state.json", lambda d: [d], "must be a JSON object, got a list"),
    ("trainer_state.json", lambda d: {k: v for k, v in d.items() if k != "step"}, "step is required but missing"),
    ("lr_scheduler.json", lambda d: [d], "must be a JSON object, got a list"),
    ("lr_scheduler.json", lambda d: {k: v for k, v in d.items() if k != "lr_lambdas"}, "lr_lambdas is required but missing"),
    ("lr_scheduler.json", with_key("lr_lambdas", [{"__class__": 1}]), "lr_lambdas[0] must be null, got a JSON object of 1"),
    ("lr_scheduler.json", with_key("_step_count", "3"), "_step_count is '3', but a schedule at last_epoch 4 has stepped 5 times"),
    ("lr_scheduler.json", with_key("optimizer", None), "unexpected keys ['optimizer']"),
    ("lr_scheduler.json", with_key("last_epoch", 3), "last_epoch is 3, but trainer_state.json is at step 4"),
    ("optimizer.json", lambda d: [d], "must be a JSON object, got a list"),
    ("optimizer.json", lambda d: {"param_groups": [{**d["param_groups"][0], "betas": "abc"}]}, "betas"),
    ("optimizer.json", lambda d: {"param_groups": [{**d["param_groups"][0], "amsgrad": 1}]},
     "param_groups[0].amsgrad must be bool, got 1"),
    ("optimizer.json", lambda d: {"param_groups": [{**d["param_groups"][0], "lr": float("inf")}]},
     "param_groups[0].lr must be a finite number, got inf"),
    ("optimizer.json", lambda d: {"param_groups": [{**d["param_groups"][0], "params": [0]}]},
     "is for another set of trained parameters"),
    ("optimizer.json", lambda d: {**d, "scalars": {"x": {"step": 1.0}}}, "scalars 'x' is not"),
    ("ema.json", with_key("decay", 7), "decay must be <= 1, got 7"),
    ("ema.json", with_key("optimization_step", 1.5), "optimization_step must be an integer, got 1.5"),
    ("ema.json", with_key("shadow_params", []), "unexpected keys ['shadow_params']"),
]


@pytest.mark.parametrize("name, change, message", BAD_JSON, ids=[f"{n}:{m[:30]}" for n, _, m in BAD_JSON])
def test_a_malformed_state_file_is_one_line_naming_it(finished, tmp_path, name, change, message):
    folder = copy_of(finished, tmp_path)
    edit_json(folder / "checkpoint-4" / name, change)
    with pytest.raises(CheckpointError) as refused:
        train(resume(folder))
    text = str(refused.value)
    assert str(folder / "checkpoint-4" / name) in text and message in text and "\n" not in text
    assert [p.name for p in list_checkpoints(folder)] == ["checkpoint-2", "checkpoint-4"]


def test_a_step_beyond_max_steps_is_refused(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    with pytest.raises(CheckpointError, match=r"trainer_state.json is at step 4, beyond run.max_steps = 3; raise "
                                              r"run.max_steps to at least 4"):
        train(resume(folder, max_steps=3))


def rewrite(path: Path, change) -> None:
    tensors = load_file(str(path))
    save_file(change(tensors), str(path))


BAD_TENSORS = [
    ("optimizer.safetensors", lambda t: {**t, "0.exp_avg": t["0.exp_avg"].flatten()[:3].clone()},
     "0.exp_avg is torch.float32 (3,); this run's parameter is torch.float32"),
    ("optimizer.safetensors", lambda t: {**t, "0.exp_avg": t["0.exp_avg"].to(torch.int32)}, "0.exp_avg is torch.int32"),
    ("optimizer.safetensors", lambda t: {**t, "0.exp_avg_sq": t["0.exp_avg_sq"] * float("nan")}, "holds NaN or inf"),
    ("optimizer.safetensors", lambda t: {**t, "999.exp_avg": torch.zeros(1)}, "holds tensor '999.exp_avg'"),
    ("optimizer.safetensors", lambda t: {k: v for k, v in t.items() if k != "1.step"}, "parameter 1 has state"),
    ("ema.safetensors", lambda t: {k: v for k, v in t.items() if k != "0"}, "EMA tensors, this run trains"),
    ("ema.safetensors", lambda t: {**t, "0": t["0"].double()}, "tensor 0 is torch.float64"),
    ("rng-0.safetensors", lambda t: {"cpu": t["cpu"].float()}, "the cpu RNG state is torch.float32"),
    ("rng-0.safetensors", lambda t: {"cpu": t["cpu"][:100].clone()}, "the cpu RNG state is torch.uint8 (100,)"),
    ("rng-0.safetensors", lambda t: {**t, "cuda7": t["cpu"].clone()}, "lift3d writes cpu and cuda0, cuda1"),
    ("model.safetensors", lambda t: {k: v.to(torch.int32) if k == "conv_in.weight" else v for k, v in t.items()},
     "model.safetensors has tensors of the wrong dtype: conv_in.weight"),
]


@pytest.mark.parametrize("name, change, message", BAD_TENSORS, ids=[f"{n}:{m[:30]}" for n, _, m in BAD_TENSORS])
def test_a_tensor_of_the_wrong_shape_or_kind_is_refused(finished, tmp_path, name, change, message):
    folder = copy_of(finished, tmp_path)
    rewrite(folder / "checkpoint-4" / name, change)
    with pytest.raises(CheckpointError) as refused:
        train(resume(folder))
    text = str(refused.value)
    assert str(folder / "checkpoint-4" / name) in text and message in text and "\n" not in text


@pytest.mark.parametrize("name", ["rng-0.safetensors", "optimizer.safetensors", "model.safetensors", "ema.safetensors"])
def test_a_truncated_safetensors_file_is_refused_before_anything_is_written(finished, tmp_path, name):
    folder = copy_of(finished, tmp_path)
    path = folder / "checkpoint-4" / name
    path.write_bytes(path.read_bytes()[:10])  # the 10-byte RNG file of the issue
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is not a readable safetensors file"):
        train(resume(folder))
    assert snapshot(folder) == before


def test_a_checkpoint_file_linked_out_of_its_folder_is_refused(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(folder / "checkpoint-4" / "model.safetensors", outside)
    (folder / "checkpoint-4" / "model.safetensors").unlink()
    (folder / "checkpoint-4" / "model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafePathError, match=r"model.safetensors.*outside"):
        train(resume(folder))


VALIDATED = {"options": {"size": 16, "num_slices": 8, "num_subjects": 7, "val_size": 1, "test_size": 1}}
VALIDATING = {"max_steps": 2, "checkpoint_every": 2, "validate_every": 2, "validate_steps": 2}


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> Path:
    """A run with sampled validation: its checkpoint holds best.safetensors and the scores."""
    out = tmp_path_factory.mktemp("validated") / "run"
    train(tiny_cfg(out, data=VALIDATED, run=VALIDATING))
    return out


BAD_VALIDATION = [
    ("best.safetensors", lambda folder: rewrite(folder / "best.safetensors", lambda t: dict(list(t.items())[1:])),
     "best.safetensors does not hold this run's trained weights: missing ["),
    ("trainer_state.json", lambda folder: (folder / "best.safetensors").unlink(),
     "trainer_state.json records a validation state, but best.safetensors is missing"),
    ("trainer_state.json", lambda folder: edit_json(folder / "trainer_state.json", lambda d: {
        **d, "validation": {**d["validation"], "scores": {"val_ssim": 0.5}}}), "validation scores hold no val_psnr"),
    ("trainer_state.json", lambda folder: edit_json(folder / "trainer_state.json", lambda d: {
        **d, "validation": {**d["validation"], "step": "2"}}), "validation.step must be an integer, got '2'"),
]


@pytest.mark.parametrize("name, spoil, message", BAD_VALIDATION, ids=[m[:40] for _, _, m in BAD_VALIDATION])
def test_a_tampered_validation_state_is_refused(validated, tmp_path, name, spoil, message):
    folder = copy_of(validated, tmp_path)
    spoil(folder / "checkpoint-2")
    with pytest.raises(CheckpointError) as refused:
        train(tiny_cfg(folder, data=VALIDATED, run={**VALIDATING, "resume": "latest"}))
    text = str(refused.value)
    assert str(folder / "checkpoint-2" / name) in text and message in text and "\n" not in text


# --------------------------------------------------------------------------------------------
# Writes that fail leave nothing partial, and say where


def test_a_full_disk_at_a_checkpoint_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    real = TS.save_safetensors

    def full(tensors, path, metadata=None):
        if "checkpoint-4" in str(path) and Path(path).name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(TS, "save_safetensors", full)
    out = tmp_path / "run"
    with pytest.raises(Lift3dError) as failed:
        train(tiny_cfg(out, run={"max_steps": 6, "checkpoint_every": 2}))
    assert str(failed.value) == (f"cannot write {out / 'checkpoint-4'}: the disk is full; "
                                 "nothing partial was left behind")
    assert leftovers(out) == []
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "checkpoint-2", "logs"]


@pytest.mark.parametrize("fault", ["safetensors", "oserror"])
def test_a_full_disk_during_export_leaves_no_temporary_model(tmp_path, monkeypatch, capsys, fault):
    import safetensors.torch

    import lift3d.lifting.checkpoint

    if fault == "safetensors":  # what diffusers' save_pretrained raises on a full disk
        def full(*args, **kwargs):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(lift3d.lifting.checkpoint, "save_safetensors", full)
    out = tmp_path / "run"
    with pytest.raises(Lift3dError) as failed:
        train(tiny_cfg(out, run={"max_steps": 2, "checkpoint_every": 2}))
    assert str(failed.value) == f"cannot write {out / 'model'}: the disk is full; nothing partial was left behind"
    assert leftovers(out) == [] and not (out / "model").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(CLI_DATA + ["--run.output_dir", str(out), "--run.resume", "latest", "--run.max_steps", "2",
                            "--optim.learning_rate", "1e-3"]) == 0  # the settings it was checkpointed with
    assert (out / "model" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_dead_writers_temporaries_are_removed_at_the_next_start(finished, tmp_path):
    folder = copy_of(finished, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = [folder / f".checkpoint-6.lift3d-tmp-{pid}-0123456789ab", folder / f".model.lift3d-tmp-{pid}-abcdef012345"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    alive = temporary_path(folder / "checkpoint-8")  # this process's: a live writer's, kept
    alive.mkdir()
    train(resume(folder))
    assert not any(p.exists() for p in stale) and alive.is_dir()


# --------------------------------------------------------------------------------------------
# Options this machine cannot honour are refused up front


def test_an_unavailable_tracker_is_refused(tmp_path, monkeypatch, capsys):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(Lift3dError, match=r"run.tracker = 'tensorboard' cannot log: the tensorboard package is not "
                                          r"installed \(pip install tensorboard\); trackers available here: csv, none"):
        train(tiny_cfg(out, run={"tracker": "tensorboard"}))
    assert main(CLI_DATA + ["--run.output_dir", str(out), "--run.tracker", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "tensorboard package is not installed" in err and err.count("\n") == 1
    assert not out.exists()


def test_fp16_on_the_cpu_is_refused_with_what_works(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(CLI_DATA + ["--run.output_dir", str(out), "--optim.mixed_precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "optim.mixed_precision = 'fp16' needs a CUDA GPU; on the CPU Accelerate would silently train in fp32. " \
           "Use 'bf16' (CPU mixed precision) or 'no'" in err and err.count("\n") == 1
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Fuzz: every checkpoint file, mutated, either loads or is one Lift3dError line naming it


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def tiny_state():
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    model = Tiny()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    ema = EMAModel(params, decay=0.9)
    scaler = torch.amp.GradScaler("cpu")
    return {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler, "ema": ema, "scaler": scaler}, params


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "checkpoint-2"
    folder.mkdir()
    state, params = tiny_state()
    for _ in range(2):
        state["model"](torch.randn(2, 2, 5, 5)).square().mean().backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad()
        state["lr_scheduler"].step()
        state["ema"].step(params)
    TS.save_training_state(folder, step=2, loss=0.5, **state)
    return folder


def training_step(state: dict, params: list) -> None:
    scaler = state["scaler"]
    scaler.scale(state["model"](torch.randn(2, 2, 5, 5)).square().mean()).backward()
    scaler.step(state["optimizer"])
    scaler.update()
    state["optimizer"].zero_grad()
    state["lr_scheduler"].step()
    state["ema"].step(params)


def load_mutated(original: Path, mutate) -> None:
    """Copy ``original``, let ``mutate(folder)`` spoil it, and load it: it raises one Lift3dError
    line naming the spoiled file, or it loads, and then training goes on from it."""
    rng = torch.get_rng_state()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / original.name
        shutil.copytree(original, folder)
        name = mutate(folder)
        state, params = tiny_state()
        try:
            step = TS.load_training_state(folder, max_steps=10, **state)
        except Lift3dError as exc:
            assert name in str(exc) and "\n" not in str(exc), str(exc)
        else:
            assert step == 2 or name == TS.TRAINER_STATE
            training_step(state, params)
        finally:
            torch.set_rng_state(rng)


def test_the_tiny_checkpoint_loads(tiny_checkpoint):
    state, _ = tiny_state()
    assert TS.load_training_state(tiny_checkpoint, **state) == 2
    assert state["lr_scheduler"].last_epoch == 2 and state["ema"].optimization_step == 2
    assert state["scaler"].state_dict() == json.loads((tiny_checkpoint / "scaler.json").read_text())


JSON_FILES = [TS.TRAINER_STATE, TS.OPTIMIZER_GROUPS, TS.LR_SCHEDULER, TS.EMA_SETTINGS, TS.SCALER]
HUGE = st.sampled_from([10**20, -10**20, 2**63, 10**400, 1e308, -1e308, float("nan"), float("inf"), -float("inf")])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**12) | HUGE | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)


def paths_in(value, prefix=()):
    """Every place in a JSON value: the value itself, its keys' values, its items."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_in(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths_in(item, prefix + (i,))


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@settings(max_examples=fuzz_examples(500), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_state_json_files(tiny_checkpoint, data):
    name = data.draw(st.sampled_from(JSON_FILES), label="file")
    original = json.loads((tiny_checkpoint / name).read_text())
    how = data.draw(st.sampled_from(["replace a value", "drop a key", "add a key", "whole file", "raw text"]))

    def mutate(folder: Path) -> str:
        path = folder / name
        if how == "raw text":
            text = path.read_text()
            cut = data.draw(st.integers(0, len(text)))
            path.write_text(text[:cut] + data.draw(st.text(max_size=4)))
            return name
        value = original
        if how == "replace a value":
            where = data.draw(st.sampled_from(list(paths_in(original))))
            value = replaced(original, where, data.draw(JSON))
        elif how == "drop a key":
            dropped = data.draw(st.sampled_from(sorted(original)))
            value = {k: v for k, v in original.items() if k != dropped}
        elif how == "add a key":
            value = {**original, data.draw(st.text(max_size=12)): data.draw(JSON)}
        else:
            value = data.draw(JSON)
        path.write_text(json.dumps(value, allow_nan=True))
        return name

    load_mutated(tiny_checkpoint, mutate)


SAFETENSORS_FILES = [TS.MODEL, TS.OPTIMIZER, TS.EMA, "rng-0.safetensors"]


@settings(max_examples=fuzz_examples(500), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_state_safetensors_files(tiny_checkpoint, data):
    name = data.draw(st.sampled_from(SAFETENSORS_FILES), label="file")
    raw = (tiny_checkpoint / name).read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    how = data.draw(st.sampled_from(["truncate", "flip header bytes", "flip data bytes", "header length", "header"]))

    def mutate(folder: Path) -> str:
        spoiled = bytearray(raw)
        if how == "truncate":
            spoiled = spoiled[:data.draw(st.integers(0, len(raw) - 1))]
        elif how in ("flip header bytes", "flip data bytes"):
            low, high = (8, header_end - 1) if how == "flip header bytes" else (header_end, len(raw) - 1)
            for at in data.draw(st.lists(st.integers(low, high), min_size=1, max_size=4)):
                spoiled[at] = data.draw(st.integers(0, 255))
        elif how == "header length":
            spoiled[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        else:  # a well-formed header with other dtypes, shapes or offsets
            header = json.loads(raw[8:header_end])
            key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            header[key][field] = data.draw(st.sampled_from(["I32", "F64", "U8", "F16", "BOOL", "X9"])) \
                if field == "dtype" else data.draw(st.lists(st.integers(0, 2**40), max_size=3))
            text = json.dumps(header).encode()
            spoiled = bytearray(len(text).to_bytes(8, "little") + text + raw[header_end:])
        (folder / name).write_bytes(bytes(spoiled))
        return name

    load_mutated(tiny_checkpoint, mutate)
