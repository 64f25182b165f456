"""Training state that cannot run code, and the bad inputs a refused run must leave no trace of.

Tests lift3d/training/state.py, the option rules of lift3d/training/config.py and the refusals of
lift3d/training/loop.py as ``lift3d-finetune`` users meet them.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import lift3d.training.loop as T
import lift3d.training.stages.diffusion as D
from lift3d.lifting.checkpoint import CheckpointError, save_safetensors
from lift3d.cli.finetune import main
from lift3d.training.checkpoints import list_checkpoints
from lift3d.training.loop import NonFiniteLossError, train
from lift3d.training.state import KNOWN_FILES
from test_training import losses, tiny_cfg


class Plant:
    """Unpickling this touches ``marker``: proof that the file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny_cfg(out, run={"max_steps": 2, "checkpoint_every": 2}, optim={"ema": True}))
    return out


def test_a_checkpoint_is_safetensors_and_json_only(checkpointed):
    names = {p.name for p in (checkpointed / "checkpoint-2").iterdir()}
    assert names == KNOWN_FILES - {"scaler.json", "best.safetensors"} | {"rng-0.safetensors"}  # no fp16, no validation
    assert all(n.endswith((".safetensors", ".json")) for n in names)


@pytest.mark.parametrize("planted", sorted(KNOWN_FILES | {"rng-0.safetensors", "custom_checkpoint_0.pkl",
                                                          "optimizer.bin", "random_states_0.pkl", "pytorch_model.bin"}))
def test_a_pickle_planted_in_a_checkpoint_never_runs(checkpointed, tmp_path, monkeypatch, planted):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    folder = tmp_path / "run"
    shutil.copytree(checkpointed, folder)
    marker = tmp_path / "marker"
    (folder / "checkpoint-2" / planted).write_bytes(pickle.dumps(Plant(marker)))
    before = snapshot(folder)
    with pytest.raises(CheckpointError) as refused:
        train(tiny_cfg(folder, run={"max_steps": 3, "checkpoint_every": 2, "resume": "latest"}, optim={"ema": True}))
    assert not marker.exists()
    message = str(refused.value)
    if planted in KNOWN_FILES - {"scaler.json", "best.safetensors"} or planted.startswith("rng-"):  # files this run reads
        assert planted in message and ("not a readable safetensors" in message or "not valid JSON" in message)
    else:
        assert f"holds files lift3d does not read safely: {planted}" in message
    assert snapshot(folder) == before  # refused before anything was written


def test_resume_continues_where_the_checkpoint_left(checkpointed, tmp_path):
    """Optimizer moments, scheduler, EMA and step come back: 2 + 2 steps == 4 steps."""
    cfg = dict(optim={"ema": True}, run={"max_steps": 4, "checkpoint_every": 2})
    folder = tmp_path / "resumed"
    shutil.copytree(checkpointed, folder)
    shutil.rmtree(folder / "model")
    train(tiny_cfg(folder, **{**cfg, "run": {**cfg["run"], "resume": "latest"}}))
    train(tiny_cfg(tmp_path / "straight", **cfg))
    name = "diffusion_pytorch_model.safetensors"
    assert (folder / "model" / name).read_bytes() == (tmp_path / "straight" / "model" / name).read_bytes()
    train_rows = lambda out: [(r["step"], r["loss"]) for r in losses(out) if r["loss"]]  # noqa: E731
    assert train_rows(folder) == train_rows(tmp_path / "straight")  # every step logged once, same losses


def test_two_identical_stage2_runs_write_identical_files(tmp_path):
    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 1}))
    runs = []
    for name in ("a", "b"):
        out = tmp_path / "s2"
        train(tiny_cfg(out, stage="volumes", model={"pretrained": str(stage1)}, data={"batch_size": 1},
                       run={"max_steps": 2, "checkpoint_every": 2}))
        runs.append(snapshot(out / "model") | {f"ckpt/{k}": v for k, v in snapshot(out / "checkpoint-2").items()})
        out.rename(tmp_path / name)
    assert runs[0].keys() == runs[1].keys()
    assert [k for k in runs[0] if runs[0][k] != runs[1][k]] == []


def test_safetensors_metadata_order_is_reproducible(tmp_path):
    metadata = {k: str(i) for i, k in enumerate("kind where kernel_size groups padding_mode format".split())}
    files = [save_safetensors({"w": torch.ones(3)}, tmp_path / f"{i}.safetensors", metadata) for i in range(6)]
    assert len({f.read_bytes() for f in files}) == 1


# --------------------------------------------------------------------------------------------
# Options and inputs refused with one line, exit 2, nothing written


@pytest.mark.parametrize("flag, value, message", [
    ("--run.max_steps", "0", "run.max_steps = 0 is not allowed; it must be >= 1"),
    ("--run.max_steps", "-5", "run.max_steps = -5 is not allowed; it must be >= 1"),
    ("--run.checkpoint_every", "-1", "run.checkpoint_every = -1 is not allowed; it must be >= 0"),
    ("--data.batch_size", "0", "data.batch_size = 0 is not allowed; it must be >= 1"),
    ("--optim.learning_rate", "-1e-3", "optim.learning_rate = -0.001 is not allowed; it must be > 0"),
    ("--lift.kernel_size", "4", "lift.kernel_size = 4 is not allowed; it must be an odd number >= 1"),
    ("--diffusion.timestep_sampler", "make-a-volum", "Unknown timestep sampler 'make-a-volum'; available:"),
    ("--run.resume", "MISSING", "is not a complete lift3d checkpoint folder"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    value = str(tmp_path / "nowhere") if value == "MISSING" else value
    code = main(["--data.options", "{size = 16, num_slices = 4, num_subjects = 5}", "--model.block_out_channels",
                 "[16, 32]", "--run.stage", "slices", "--run.output_dir", str(out), f"{flag}={value}"])
    err = capsys.readouterr().err
    assert code == 2
    assert message.lower() in err.lower()
    assert err.count("\n") == 1, err
    assert not out.exists()


def test_options_set_in_python_are_checked_too(tmp_path):
    cfg = tiny_cfg(tmp_path / "out")
    cfg.run.max_steps = 0
    with pytest.raises(ValueError, match="run.max_steps = 0 is not allowed"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_second_subject_leaves_nothing_behind(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        (root / f"sub-{i}").mkdir(parents=True)
        for name in ("T1", "T2"):
            data = np.random.default_rng(i).normal(100, 10, (16, 16, 4)).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.eye(4)), root / f"sub-{i}" / f"{name}.nii.gz")
    (root / "sub-1" / "T2.nii.gz").write_bytes(b"not a nifti file at all")
    out = tmp_path / "out"
    cfg = tiny_cfg(out, data={"dataset": "paired-nifti", "batch_size": 4,
                              "options": {"root": str(root), "source": "T1", "target": "T2", "size": 16,
                                          "num_slices": 4, "train": ["sub-0", "sub-1", "sub-2"]}})
    with pytest.raises(ValueError, match="sub-1"):
        train(cfg)
    assert not out.exists()


def test_a_stage1_folder_with_a_fake_safetensors_file_is_one_line(tmp_path, capsys):
    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 1}))
    (stage1 / "diffusion_pytorch_model.safetensors").write_bytes(pickle.dumps({"w": 1}))
    capsys.readouterr()
    code = main(["--model.pretrained", str(stage1), "--run.output_dir", str(tmp_path / "s2"),
                 "--data.options", "{size = 16, num_slices = 4, num_subjects = 5}"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a readable safetensors file" in err and err.count("\n") == 1
    assert not (tmp_path / "s2").exists()


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """As root, chmod cannot make a folder read-only; a read-only mount answers mkdir with EROFS."""
    blocked = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == blocked / "out" or blocked in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code = main(["--run.output_dir", str(blocked / "out"), "--run.stage", "slices", "--model.block_out_channels",
                 "[16, 32]", "--data.options", "{size = 16, num_slices = 4, num_subjects = 5}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().endswith(f"error: cannot write or read {blocked / 'out'}: Read-only file system")
    assert err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# The NaN guard names what it keeps, and never saves non-finite weights


def poison_loss(monkeypatch, bad) -> None:
    """Make the training loss NaN on the training calls ``bad(n)`` says (n counts from 1)."""
    calls = {"n": 0}
    original = D.diffusion_loss

    def poisoned(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # training calls only, not the validation loss
        loss = original(*args, **kwargs)
        return loss * float("nan") if bad(calls["n"]) else loss

    monkeypatch.setattr(D, "diffusion_loss", poisoned)


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda n: n == 3)
    monkeypatch.setattr(T, "check_finite", lambda *a, **k: None)  # as if the loss guard had missed it
    with pytest.raises(NonFiniteLossError, match=r"weight tensor\(s\) hold NaN or inf at step 4; stopped without saving"):
        train(tiny_cfg(tmp_path / "nan", run={"max_steps": 6, "checkpoint_every": 2}, optim={"max_grad_norm": 0.0}))
    assert [p.name for p in list_checkpoints(tmp_path / "nan")] == ["checkpoint-2"]


def test_the_nan_message_names_the_checkpoint_with_its_last_loss(tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda n: n >= 3)
    with pytest.raises(NonFiniteLossError) as stopped:
        train(tiny_cfg(tmp_path / "nan", run={"max_steps": 5, "checkpoint_every": 2}))
    rows = losses(tmp_path / "nan")
    last = float([r for r in rows if r["loss"] and int(r["step"]) <= 2][-1]["loss"])
    message = str(stopped.value)
    assert f"checkpoint-2 (step 2, last logged loss {last:.6g}" in message
    assert "good" not in message


def test_a_fresh_run_in_an_old_folder_starts_a_fresh_log(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, run={"max_steps": 3}))
    train(tiny_cfg(out, run={"max_steps": 2, "overwrite": True}))
    rows = losses(out)
    assert [r["step"] for r in rows if r["loss"]] == ["1", "2"]


# --------------------------------------------------------------------------------------------
# Sampled validation inside training (run.validate_every): logged, the best step exported


VALIDATED = {"options": {"size": 16, "num_slices": 8, "num_subjects": 7, "val_size": 1, "test_size": 1}}  # 3D SSIM: >= 7 slices


def test_sampled_validation_is_logged_and_the_best_step_exported(tmp_path, capsys):
    import lift3d.training.loop as T
    from lift3d.training.validation import SampledValidation

    scripted = iter([20.0, 25.0, 21.0, 22.0])  # step 0, 2, 4 and the final step 4 is the same scoring: 3 calls
    calls = []
    real = SampledValidation.score

    def score(self, unet):
        scores = real(self, unet)
        calls.append(scores)
        return {**scores, "val_psnr": next(scripted)}

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SampledValidation, "score", score)
        snapshots = {}
        real_snapshot = T.ValidationTracker.score

        def remember(self, step):
            scores = real_snapshot(self, step)
            snapshots[step] = {n: p.detach().clone() for n, p in zip(self.names, self.params)}
            return scores

        mp.setattr(T.ValidationTracker, "score", remember)
        model = train(tiny_cfg(out, data=VALIDATED, run={"max_steps": 4, "validate_every": 2, "validate_steps": 2}))
    assert len(calls) == 3 and {"val_psnr", "val_ssim", "val_mae", "val_z_inconsistency"} <= set(calls[0])
    rows = [r for r in losses(out) if r.get("val_ssim")]
    assert [r["step"] for r in rows] == ["0", "2", "4"]
    exported = load_weights(model)
    assert all(torch.equal(exported[n], snapshots[2][n]) for n in snapshots[2])  # step 2 had the best PSNR
    assert not all(torch.equal(exported[n], snapshots[4][n]) for n in snapshots[4])
    assert "best validation psnr at step 2" in capsys.readouterr().out


def test_a_stage2_that_never_beats_stage1_says_so(tmp_path, capsys, monkeypatch):
    from lift3d.training.validation import SampledValidation

    stage1 = train(tiny_cfg(tmp_path / "s1", data=VALIDATED, run={"max_steps": 1}))
    scripted = iter([30.0, 20.0, 21.0])
    real = SampledValidation.score
    monkeypatch.setattr(SampledValidation, "score", lambda self, unet: {**real(self, unet), "val_psnr": next(scripted)})
    capsys.readouterr()
    model = train(tiny_cfg(tmp_path / "s2", stage="volumes", model={"pretrained": str(stage1)},
                           data={**VALIDATED, "batch_size": 1},
                           run={"max_steps": 2, "validate_every": 1, "validate_steps": 2}))
    out = capsys.readouterr().out
    assert "no stage-2 step beat the stage-1 model on validation (stage 1: psnr 30" in out
    from einops import rearrange

    from lift3d.lifting.checkpoint import load_lifted
    from lift3d.lifting.checkpoint import load_unet2d

    lifted, flat = load_lifted(model), load_unet2d(stage1).eval()
    x, t = torch.randn(1, 2, 8, 16, 16), torch.tensor([500])
    with torch.no_grad():
        expected = rearrange(flat(rearrange(x, "b c n h w -> (b n) c h w"), t.repeat(8)).sample, "(b n) c h w -> b c n h w", n=8)
        assert torch.allclose(lifted(x, t).sample, expected, atol=1e-6)  # the stage-1 model, lifted at identity


def test_sampled_validation_needs_validation_subjects(tmp_path):
    with pytest.raises(ValueError, match="'val' split"):  # the dataset's own words, or lift3d's
        train(tiny_cfg(tmp_path / "run", run={"validate_every": 2}))
    assert not (tmp_path / "run").exists()


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_stage2_takes_the_layer_kind_from_the_config(tmp_path, capsys):
    import lift3d

    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 1}))
    model = train(tiny_cfg(tmp_path / "s2", stage="volumes", model={"pretrained": str(stage1)}, data={"batch_size": 1},
                           lift={"kind": "depthwise", "where": "resnet", "recompute": True}, run={"max_steps": 1}))
    settings = json.loads((model / "lift3d.json").read_text())["lift"]
    assert settings["kind"] == "depthwise" and lift3d.is_lifted(lift3d.lifting.checkpoint.load_lifted(model))
    capsys.readouterr()
    assert main(["--model.pretrained", str(stage1), "--run.output_dir", str(tmp_path / "bad"), "--lift.kind", "ful",
                 "--data.options", "{size = 16, num_slices = 4, num_subjects = 5}"]) == 2
    err = capsys.readouterr().err
    assert "'ful'" in err and "full" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
