"""A checkpoint must agree with the run that resumes it (issue 33): the same options, consistent steps,
values in range. A tampered state that type-checks (``maximize = true``, ``lr = 0``, an EMA step of 1e8,
a validation score of 1e308, a negative ``exp_avg_sq``) is one line naming the file and the key, and
nothing is restored from it, so nothing is trained.

Tests lift3d/training/state.py and lift3d/training/resume_checks.py on tiny state files built directly
(a 2-layer model, two AdamW steps), and once end to end through ``lift3d-finetune``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lift3d.training.state as TS
from lift3d.cli.finetune import main
from lift3d.lifting.checkpoint import CheckpointError

LR, EMA_DECAY, STEP = 1e-3, 0.9, 2


from tests.test_hostile_training import Tiny  # noqa: E402  (one tiny model for every state test)


def run_state(*, amsgrad: bool = False, warmup: int = 1) -> dict:
    """This run's objects, as the loop builds them from its config (AdamW, a diffusers schedule, EMA, scaler)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, amsgrad=amsgrad)
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    ema = EMAModel(list(model.parameters()), decay=EMA_DECAY)
    return {"model": model, "optimizer": optimizer, "lr_scheduler": schedule, "ema": ema,
            "scaler": torch.amp.GradScaler("cpu")}


def write_checkpoint(folder: Path, validation=None, **options) -> Path:
    folder.mkdir(parents=True)
    state = run_state(**options)
    params = list(state["model"].parameters())
    for _ in range(STEP):
        state["model"](torch.randn(2, 2, 5, 5)).square().mean().backward()
        state["optimizer"].step()
        state["optimizer"].zero_grad()
        state["lr_scheduler"].step()
        state["ema"].step(params)
    TS.save_training_state(folder, step=STEP, loss=0.5, validation=validation, **state)
    return folder


SCORES = {"val_mae": 20.0, "val_psnr": 18.0, "val_ssim": 0.4, "val_z_inconsistency": 1.5}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    weights = {n: p.detach().clone() for n, p in Tiny().named_parameters()}
    first = {**SCORES, "val_psnr": 15.0}
    return write_checkpoint(tmp_path_factory.mktemp("state") / "checkpoint-2",
                            validation=(weights, {"step": STEP, "scores": SCORES, "first": first}))


def edit_json(name: str, change):
    def spoil(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(change(json.loads(path.read_text())), allow_nan=True))
    return spoil


def edit_tensors(name: str, change):
    def spoil(folder: Path) -> None:
        tensors = load_file(str(folder / name))
        save_file(change(tensors), str(folder / name))
    return spoil


def group(key, value):
    return edit_json("optimizer.json", lambda d: {**d, "param_groups": [{**d["param_groups"][0], key: value}]})


def key(name, key, value):
    return edit_json(name, lambda d: {**d, key: value})


def validation(**change):
    return edit_json("trainer_state.json", lambda d: {**d, "validation": {**d["validation"], **change}})


def scores(part="scores", **change):
    return edit_json("trainer_state.json", lambda d: {
        **d, "validation": {**d["validation"], part: {**d["validation"][part], **change}}})


# What each check protects: (file, spoil, what the line must say)
OPTIONS_OF_THE_RUN = [
    ("optimizer.json", group("maximize", True), "param_groups[0].maximize is true, but this run has false"),
    ("optimizer.json", group("amsgrad", True), "param_groups[0].amsgrad is true, but this run has false"),
    ("optimizer.json", group("lr", 0.0), "the param_groups' lr are [0.0], but"),
    ("optimizer.json", group("lr", 1e308), "the param_groups' lr are [1e+308], but"),
    ("lr_scheduler.json", lambda folder: (group("lr", 0.0)(folder), key("lr_scheduler.json", "_last_lr", [0.0])(folder)),
     "_last_lr is [0.0], but this run's learning-rate schedule (optim.learning_rate"),
    ("optimizer.json", group("initial_lr", 0.5), "initial_lr is 0.5, but this run's optim.learning_rate is 0.001"),
    ("optimizer.json", group("weight_decay", 0.5), "weight_decay is 0.5, but this run's optim.weight_decay is 0.01"),
    ("optimizer.json", group("betas", [0.5, 0.5]), "param_groups[0].betas is [0.5, 0.5], but this run has [0.9, 0.999]"),
    ("optimizer.json", group("eps", 1.0), "param_groups[0].eps is 1.0, but this run has 1e-08"),
    ("optimizer.json", group("decoupled_weight_decay", False), "decoupled_weight_decay is false, but this run has true"),
    ("lr_scheduler.json", key("lr_scheduler.json", "base_lrs", [0.5]), "base_lrs is [0.5], but this run's "
                                                                        "optim.learning_rate gives [0.001]"),
    ("ema.json", key("ema.json", "decay", 0.5), "decay is 0.5, but this run's optim.ema_decay is 0.9"),
    ("ema.json", key("ema.json", "power", 2.0), "power is 2.0, but this run has 0.6666666666666666"),
    ("ema.json", key("ema.json", "use_ema_warmup", True), "use_ema_warmup is true, but this run has false"),
    ("ema.json", key("ema.json", "update_after_step", 5), "update_after_step is 5, but this run has 0"),
    ("scaler.json", key("scaler.json", "growth_factor", 4.0), "growth_factor is 4.0, but this run has 2.0"),
]
STEPS_THAT_AGREE = [
    ("ema.json", key("ema.json", "optimization_step", 10**8), "optimization_step is 100000000, but trainer_state.json "
                                                             "is at step 2"),
    ("lr_scheduler.json", key("lr_scheduler.json", "last_epoch", 1), "last_epoch is 1, but trainer_state.json is at step 2"),
    ("lr_scheduler.json", key("lr_scheduler.json", "_step_count", 99), "_step_count is 99, but a schedule at last_epoch 2"),
    ("lr_scheduler.json", key("lr_scheduler.json", "_last_lr", [0.0]), "lr are [0.001], but"),
    ("lr_scheduler.json", key("lr_scheduler.json", "_get_lr_called_within_step", True), "_get_lr_called_within_step "
                                                                                        "must be false"),
    ("optimizer.safetensors", edit_tensors("optimizer.safetensors", lambda t: {**t, "0.step": torch.tensor(1e8)}),
     "0.step is 1e+08, past the checkpoint's own step 2"),
    ("trainer_state.json", validation(step=3), "validation.step is 3, past the checkpoint's own step 2"),
    ("scaler.json", key("scaler.json", "_growth_tracker", 5000), "_growth_tracker is 5000; it counts up to "
                                                                 "growth_interval 2000"),
]
VALUES_IN_RANGE = [
    ("trainer_state.json", scores(val_psnr=1e308), "validation.scores.val_psnr is 1e+308; a psnr score is a finite "
                                                   "number from 0 to 1000"),
    ("trainer_state.json", scores(val_psnr=float("inf")), "validation.scores.val_psnr is inf"),
    ("trainer_state.json", scores(val_ssim=float("nan")), "validation.scores.val_ssim is nan"),
    ("trainer_state.json", scores(val_mae=-1.0), "validation.scores.val_mae is -1.0; a mae score is a finite number "
                                                 "from 0 to 255"),
    ("trainer_state.json", scores("first", val_psnr=1e308), "validation.first.val_psnr is 1e+308"),
    ("trainer_state.json", scores(val_cheat=1.0), "validation.scores.val_cheat is not a score lift3d records; valid: "
                                                  "val_mae, val_psnr"),
    ("trainer_state.json", scores(val_psnr=10.0), "validation.scores.val_psnr 10 is below step 0's 15"),
    ("trainer_state.json", key("trainer_state.json", "last_logged_loss", float("inf")),
     "last_logged_loss must be a finite number, got inf"),
    ("scaler.json", key("scaler.json", "scale", 1e39), "scale is 1e+39; a gradient scale is a finite float32"),
]
NON_NEGATIVE = [
    ("optimizer.safetensors", edit_tensors("optimizer.safetensors", lambda t: {**t, "0.exp_avg_sq": -t["0.exp_avg_sq"] - 1}),
     "0.exp_avg_sq holds negative values"),
    ("optimizer.safetensors", edit_tensors("optimizer.safetensors", lambda t: {**t, "1.exp_avg": t["1.exp_avg"] + 1e30}),
     "1.exp_avg is larger than its exp_avg_sq allows"),
    ("optimizer.safetensors", edit_tensors("optimizer.safetensors", lambda t: {
        **t, "0.max_exp_avg_sq": t["0.exp_avg_sq"].clone()}), "parameter 0 has state"),
    ("model.safetensors", edit_tensors("model.safetensors", lambda t: {**t, "head.bias": t["head.bias"] * float("inf")}),
     "head.bias holds NaN or inf"),
]
CASES = OPTIONS_OF_THE_RUN + STEPS_THAT_AGREE + VALUES_IN_RANGE + NON_NEGATIVE


def restorable(state: dict) -> dict:
    """What loading would change: the weights, the optimizer, the schedule, the EMA, the scaler."""
    return {"model": {k: v.clone() for k, v in state["model"].state_dict().items()},
            "optimizer": repr(state["optimizer"].state_dict()), "schedule": state["lr_scheduler"].state_dict(),
            "ema": repr(state["ema"].state_dict()), "scaler": state["scaler"].state_dict()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and \
        all(a[k] == b[k] for k in a if k != "model")


def test_the_checkpoint_as_written_loads(checkpoint):
    state = run_state()
    assert TS.load_training_state(checkpoint, max_steps=10, **state) == STEP
    weights, info = TS.load_validation_state(checkpoint, dict(state["model"].named_parameters()))
    assert info["scores"] == SCORES and set(weights) == {n for n, _ in state["model"].named_parameters()}


def test_amsgrad_state_loads_when_the_run_has_amsgrad(tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint-2", amsgrad=True)
    assert TS.load_training_state(folder, max_steps=10, **run_state(amsgrad=True)) == STEP
    with pytest.raises(CheckpointError, match=r"optimizer.json: param_groups\[0\].amsgrad is true, but this run has "
                                              r"false"):
        TS.load_training_state(folder, max_steps=10, **run_state())


@pytest.mark.parametrize("name, spoil, message", CASES, ids=[m[:48] for _, _, m in CASES])
def test_a_state_that_disagrees_with_its_run_is_refused_and_nothing_restored(checkpoint, tmp_path, name, spoil,
                                                                             message):
    folder = Path(shutil.copytree(checkpoint, tmp_path / checkpoint.name))
    spoil(folder)
    state = run_state()
    before = restorable(state)
    with pytest.raises(CheckpointError) as refused:
        TS.load_training_state(folder, max_steps=10, **state)
    text = str(refused.value)
    assert str(folder / name) in text and message in text and "\n" not in text, text
    assert same(restorable(state), before)


def test_a_schedule_of_other_settings_is_refused(checkpoint):
    """The learning rate at the checkpoint's step is the one this run's schedule gives (here: still warming up)."""
    with pytest.raises(CheckpointError, match=r"lr_scheduler.json: _last_lr is \[0.001\], but this run's "
                                              r"learning-rate schedule .* gives \[0.0006666666666666666\] at step 2"):
        TS.load_training_state(checkpoint, max_steps=10, **run_state(warmup=3))


# --------------------------------------------------------------------------------------------
# End to end: lift3d-finetune refuses, in one line, and the run folder is left as it was


CLI = ["--data.options", "{size = 16, num_slices = 4, num_subjects = 5}", "--model.block_out_channels", "[16, 32]",
       "--run.stage", "slices", "--run.max_steps", "2", "--run.checkpoint_every", "2", "--optim.ema", "true",
       "--optim.learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(CLI + ["--run.output_dir", str(out)]) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def untouched(folder: Path) -> None:
    pass


@pytest.mark.parametrize("name, spoil, options, message", [
    ("optimizer.json", group("maximize", True), [], "param_groups[0].maximize is true"),
    ("optimizer.json", group("lr", 0.0), [], "the param_groups' lr are [0.0]"),
    ("ema.json", key("ema.json", "optimization_step", 10**8), [], "optimization_step is 100000000"),
    ("optimizer.safetensors", edit_tensors("optimizer.safetensors", lambda t: {
        **t, "0.exp_avg_sq": -t["0.exp_avg_sq"] - 1}), [], "0.exp_avg_sq holds negative values"),
    ("optimizer.json", untouched, ["--optim.learning_rate", "1e-2"],
     "param_groups[0].initial_lr is 0.001, but this run's optim.learning_rate is 0.01"),
    ("ema.json", untouched, ["--optim.ema_decay", "0.5"], "decay is 0.999, but this run's optim.ema_decay is 0.5"),
], ids=["maximize", "lr-0", "ema-step", "negative-exp_avg_sq", "config-lr", "config-ema-decay"])
def test_finetune_refuses_a_tampered_resume_in_one_line_and_trains_nothing(finished, tmp_path, capsys, name, spoil,
                                                                           options, message):
    folder = Path(shutil.copytree(finished, tmp_path / "run"))
    spoil(folder / "checkpoint-2")
    before = snapshot(folder)
    capsys.readouterr()
    assert main(CLI + ["--run.output_dir", str(folder), "--run.resume", "latest", "--run.max_steps", "4", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder / "checkpoint-2" / name) in err and message in err, err
    assert snapshot(folder) == before
