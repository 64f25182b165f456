"""Training state without pickle: checkpoint folders of safetensors and JSON that lift3d writes itself.

Accelerate's ``save_state`` pickles the optimizer, the LR scheduler and every object registered for
checkpointing, and its ``load_state`` unpickles them (``torch.load(weights_only=False)``), so a file
planted in a checkpoint folder would run code on resume. Here every piece is split into its tensors
(safetensors) and its plain values (JSON), and a folder holding anything else is refused by name.

A checkpoint folder holds exactly:

========================  ===================================================================
``trainer_state.json``    the step, the last logged loss, the format version
``model.safetensors``     every weight of the (unwrapped) model
``optimizer.*``           per-parameter state tensors (``.safetensors``) and the param groups (``.json``)
``lr_scheduler.json``     the LR scheduler's ``state_dict`` (plain numbers)
``ema.*``                 the EMA's shadow weights and counters, when ``optim.ema`` is on
``scaler.json``           the fp16 gradient scaler, when ``optim.mixed_precision = "fp16"``
``rng-<rank>.safetensors`` each process's torch RNG states
``best.safetensors``      the best sampled-validation step's trained weights (``run.validate_every``)
========================  ===================================================================

Nothing read is trusted: every file is read inside its checkpoint folder (a link out is refused),
each JSON file against a strict schema and then against the shape of this run's own optimizer,
scheduler, EMA and scaler state, and each tensor against its parameter's shape and dtype, before
anything is restored. Every failure is one ``Lift3dError`` line naming the file.

Noise, timesteps and the data order are seeded by (seed, step), so the RNG files only matter for
code that draws from the global generator (dropout, say).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field, field_validator
from safetensors import SafetensorError, safe_open
from torch import nn

from lift3d.io.errors import Lift3dError, UnsafePathError
from lift3d.io.paths import check_contained
from lift3d.io.schemas import Checked, read_json
from lift3d.lifting.checkpoint import CheckpointError, load_state_dict_checked, read_safetensors, save_safetensors
from lift3d.training.resume_checks import (check_adam_state, check_config, check_consistent_steps, check_ema,
                                           check_groups, check_scaler, check_schedule, check_tensor, check_validation,
                                           conform, expected_rates)

STATE_FORMAT = 1
MAX_STEP = 10**9
TRAINER_STATE = "trainer_state.json"
MODEL = "model.safetensors"
OPTIMIZER, OPTIMIZER_GROUPS = "optimizer.safetensors", "optimizer.json"
LR_SCHEDULER = "lr_scheduler.json"
EMA, EMA_SETTINGS = "ema.safetensors", "ema.json"
SCALER = "scaler.json"
BEST = "best.safetensors"
RNG = re.compile(r"rng-\d+\.safetensors")
KNOWN_FILES = {TRAINER_STATE, MODEL, OPTIMIZER, OPTIMIZER_GROUPS, LR_SCHEDULER, EMA, EMA_SETTINGS, SCALER, BEST}
# AdamW's per-parameter state (the only optimizer the loop builds): a scalar step and moments shaped as the parameter
ADAM_STATE, ADAM_REQUIRED = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}, {"step", "exp_avg", "exp_avg_sq"}


# Schemas: what each JSON file may hold, checked before anything is restored from it


class _Own(Checked):
    """A file lift3d writes itself: no key it does not know."""

    model_config = ConfigDict(extra="forbid")


class ValidationRecord(_Own):
    # Read as written, so that an inf is refused by resume_checks.check_validation with the score's valid range
    model_config = ConfigDict(allow_inf_nan=True)
    step: int = Field(ge=0, le=MAX_STEP)
    scores: dict[str, float]
    first: dict[str, float] | None = None


class TrainerState(_Own):
    format: int
    step: int = Field(ge=0, le=MAX_STEP)
    last_logged_loss: float | None = None  # finite: a run stops at a non-finite loss before it checkpoints
    validation: ValidationRecord | None = None

    @field_validator("format")
    @classmethod
    def _known(cls, value: int) -> int:
        if value != STATE_FORMAT:
            raise ValueError(f"format {value} is not one this lift3d reads ({STATE_FORMAT})")
        return value


class ParamGroupState(Checked):
    """One optimizer param group; its other keys are compared with this run's optimizer."""

    params: list[int] = Field(max_length=100_000)
    lr: float = Field(ge=0)
    initial_lr: float | None = Field(default=None, ge=0)
    eps: float | None = Field(default=None, gt=0)
    weight_decay: float | None = Field(default=None, ge=0)
    betas: list[float] | None = Field(default=None, min_length=2, max_length=2)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {value}")
        return value


class OptimizerState(_Own):
    param_groups: list[ParamGroupState] = Field(min_length=1, max_length=1024)
    scalars: dict[str, dict[str, float | bool | None]] = {}


class LrSchedulerState(Checked):
    """A ``LambdaLR``'s ``state_dict``: its other keys (``_step_count``...) are compared with this run's."""

    base_lrs: list[float]
    last_epoch: int = Field(ge=-1, le=MAX_STEP)
    lr_lambdas: list[None]  # a function is never stored; a dict here would be written into the lambda

    @field_validator("base_lrs")
    @classmethod
    def _rates(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value):
            raise ValueError(f"learning rates must be >= 0, got {value}")
        return value


class EmaState(Checked):
    """diffusers' ``EMAModel`` counters; the key set is compared with this run's EMA."""

    decay: float = Field(ge=0, le=1)
    min_decay: float = Field(ge=0, le=1)
    optimization_step: int = Field(ge=0, le=MAX_STEP)
    update_after_step: int = Field(ge=0, le=MAX_STEP)
    use_ema_warmup: bool
    inv_gamma: float = Field(gt=0)
    power: float = Field(gt=0)


class ScalerState(Checked):
    """A ``GradScaler``'s ``state_dict``; the key set is compared with this run's scaler."""

    scale: float = Field(gt=0)
    growth_factor: float = Field(gt=1)
    backoff_factor: float = Field(gt=0, lt=1)
    growth_interval: int = Field(ge=1, le=MAX_STEP)
    growth_tracker: int = Field(alias="_growth_tracker", ge=0, le=MAX_STEP)


JSON_SCHEMAS = {TRAINER_STATE: TrainerState, OPTIMIZER_GROUPS: OptimizerState, LR_SCHEDULER: LrSchedulerState,
                EMA_SETTINGS: EmaState, SCALER: ScalerState}


# Reading: every file through the trusted readers, inside its checkpoint folder


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, allow_nan=True))


def _read_json(folder: Path, name: str) -> Any:
    """The checked content of checkpoint file ``name``; every failure is one ``CheckpointError``
    line naming the file (a link out of the folder stays an ``UnsafePathError``)."""
    try:
        return read_json(folder / name, JSON_SCHEMAS[name], folder=folder, what="checkpoint file")
    except UnsafePathError:
        raise
    except Lift3dError as exc:  # one line even when a key of the file holds a line break
        raise CheckpointError(str(exc).replace("\r", "\\r").replace("\n", "\\n")) from None


def _dump(state) -> dict[str, Any]:
    return state.model_dump(by_alias=True, exclude_unset=True)


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return read_safetensors(folder / name, f"checkpoint file {name}", folder=folder)[0]


def _check_header(folder: Path, name: str) -> None:
    """A safetensors file's header is readable and covers the file (no tensor is read yet)."""
    path = folder / name
    check_contained(folder, path, f"checkpoint file {name}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {name} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc)[:160]})") from None


def _plain(value: Any, where: str) -> Any:
    """A JSON-ready copy of ``value``; tuples become lists (restored by ``_like``)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in JSON")


def _like(reference: Any, value: Any) -> Any:
    """``value`` read back from JSON, with the tuples and tensors that ``reference`` had."""
    if isinstance(reference, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(reference, torch.Tensor) and not isinstance(value, torch.Tensor):
        return torch.tensor(value, dtype=reference.dtype, device=reference.device)
    return value


# Optimizer: state tensors keyed "<param index>.<name>", param groups and scalars as JSON


def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = _plain(value, f"optimizer state {name}")
    save_safetensors(tensors, folder / OPTIMIZER)
    _write_json(folder / OPTIMIZER_GROUPS, {"param_groups": _plain(state["param_groups"], "optimizer param_groups"),
                                            "scalars": scalars})


def _read_optimizer(optimizer: torch.optim.Optimizer, folder: Path, step: int,
                    rates: list[float] | None) -> dict[str, Any]:
    """The optimizer's state dict from ``folder``, checked against ``optimizer`` (this run's): its options,
    its learning rates at ``step`` (``rates``), and every state tensor; nothing is loaded yet."""
    groups_path = folder / OPTIMIZER_GROUPS
    saved = _dump(_read_json(folder, OPTIMIZER_GROUPS))
    current = optimizer.state_dict()
    groups = saved["param_groups"]
    if len(groups) != len(current["param_groups"]) or any(
            g["params"] != c["params"] for g, c in zip(groups, current["param_groups"])):
        raise CheckpointError(f"{groups_path} is for another set of trained parameters "
                              "(did lift.trainable or the model change since the checkpoint?)")
    conform(current["param_groups"], groups, groups_path, "param_groups")
    check_groups(groups, current["param_groups"], rates, step, groups_path)
    # state_dict numbers the parameters group after group; those numbers key the saved state
    params = {i: p for c, g in zip(current["param_groups"], optimizer.param_groups)
              for i, p in zip(c["params"], g["params"])}
    state: dict[int, dict[str, Any]] = {}
    for key, value in _read_tensors(folder, OPTIMIZER).items():
        index, _, name = key.partition(".")
        if not (index.isdigit() and int(index) in params and name.isidentifier()):
            raise CheckpointError(f"{folder / OPTIMIZER} holds tensor {key!r}; lift3d writes "
                                  f"'<parameter index>.<name>' for parameters 0..{len(params) - 1}")
        param = params[int(index)]
        if name == "step" or value.dim() == 0:  # a step count: Adam raises its betas to this power
            if value.dim() != 0 or not value.is_floating_point() or not (
                    torch.isfinite(value) and 0 <= value <= MAX_STEP and value == value.round()):
                shown = f"{value.item()!r}" if value.numel() == 1 else f"{value.dtype} {tuple(value.shape)}"
                raise CheckpointError(f"{folder / OPTIMIZER}: {key} must be a whole-number step count from 0 to "
                                      f"{MAX_STEP} in a floating-point scalar, got {shown}")
        else:
            check_tensor(value, param.detach(), f"{folder / OPTIMIZER}: {key}")
        state.setdefault(int(index), {})[name] = value
    for index, entries in saved.get("scalars", {}).items():
        if not (index.isdigit() and int(index) in params) or any(
                isinstance(v, float) and not math.isfinite(v) for v in entries.values()):
            raise CheckpointError(f"{groups_path}: scalars {index!r} is not a finite value of a trained parameter "
                                  f"(0..{len(params) - 1})")
        state.setdefault(int(index), {}).update(entries)
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        for index, entries in state.items():
            if not ADAM_REQUIRED <= set(entries) <= ADAM_STATE or not all(isinstance(v, torch.Tensor)
                                                                          for v in entries.values()):
                raise CheckpointError(f"{folder / OPTIMIZER}: parameter {index} has state {sorted(entries)}; "
                                      f"{type(inner).__name__} keeps the tensors {', '.join(sorted(ADAM_REQUIRED))} "
                                      "(and max_exp_avg_sq with amsgrad), and no scalars")
        check_adam_state(state, current["param_groups"], step, folder / OPTIMIZER)
    param_groups = [{k: _like(c.get(k), v) for k, v in g.items()} for g, c in zip(groups, current["param_groups"])]
    return {"state": state, "param_groups": param_groups}


# Save and load a whole checkpoint


def save_training_state(folder: Path, *, model: nn.Module, optimizer, lr_scheduler, ema=None, scaler=None,
                        step: int, loss: float | None, is_main_process: bool = True, process_index: int = 0,
                        validation: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None) -> None:
    """Write the whole training state into ``folder`` (which must exist). Every process writes its
    own RNG file; the main process writes the rest."""
    generators = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        generators.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_safetensors(generators, folder / f"rng-{process_index}.safetensors")
    if not is_main_process:
        return
    save_safetensors(model.state_dict(), folder / MODEL)
    _save_optimizer(optimizer, folder)
    _write_json(folder / LR_SCHEDULER, _plain(lr_scheduler.state_dict(), "lr_scheduler"))  # lambdas: None each
    if ema is not None:
        ema_state = ema.state_dict()
        save_safetensors({str(i): p for i, p in enumerate(ema_state.pop("shadow_params"))}, folder / EMA)
        _write_json(folder / EMA_SETTINGS, _plain(ema_state, "ema"))
    if scaler is not None:
        _write_json(folder / SCALER, _plain(scaler.state_dict(), "scaler"))
    trainer = {"format": STATE_FORMAT, "step": step, "last_logged_loss": loss}
    if validation is not None:
        weights, trainer["validation"] = validation
        save_safetensors(weights, folder / BEST)
    _write_json(folder / TRAINER_STATE, trainer)


def check_checkpoint_files(folder: Path, expected: set[str] | None = None) -> None:
    """Refuse a checkpoint folder holding files lift3d does not read safely (pickles, say), by name.

    ``expected`` narrows the accepted names to those this run reads (no ``ema.*`` without an EMA).
    """
    accepted = KNOWN_FILES if expected is None else expected
    unknown = sorted(p.name for p in folder.iterdir() if p.name not in accepted and not RNG.fullmatch(p.name))
    if unknown:
        raise CheckpointError(
            f"checkpoint {folder} holds files lift3d does not read safely: {', '.join(unknown)}. lift3d reads only "
            f"its own safetensors and JSON ({', '.join(sorted(accepted))}, rng-<rank>.safetensors); a checkpoint "
            "written by Accelerate's save_state (pickles) or by a run with other optim.ema / mixed_precision "
            "settings cannot be resumed here. Remove those files, or start afresh")


def read_trainer_state(folder: Path) -> TrainerState:
    """The checked ``trainer_state.json``: format, step (0..10**9), last logged loss, validation."""
    return _read_json(folder, TRAINER_STATE)


def expected_files(folder: Path, *, ema: bool, scaler: bool) -> set[str]:
    """The files a run with (or without) an EMA and an fp16 scaler reads from checkpoint ``folder``."""
    expected = KNOWN_FILES - ({EMA, EMA_SETTINGS} if not ema else set()) - ({SCALER} if not scaler else set())
    return expected if read_trainer_state(folder).validation is not None else expected - {BEST}


def check_training_state(folder: Path, *, ema: bool, scaler: bool, max_steps: int | None = None,
                         expect: dict[str, float] | None = None) -> TrainerState:
    """Everything about checkpoint ``folder`` that can be checked before the model exists: the file
    names, every JSON file against its schema and the others (steps that agree, validation scores in
    range), the options ``expect`` gives by config name (``optim.learning_rate``...), every safetensors
    header, and the step against ``max_steps``. A resumed run calls this before it writes anything."""
    trainer = read_trainer_state(folder)
    expected = expected_files(folder, ema=ema, scaler=scaler)
    if trainer.validation is not None and not (folder / BEST).exists():
        raise CheckpointError(f"{folder / TRAINER_STATE} records a validation state, but {BEST} is missing")
    check_checkpoint_files(folder, expected)
    if max_steps is not None and trainer.step > max_steps:
        raise CheckpointError(f"{folder / TRAINER_STATE} is at step {trainer.step}, beyond run.max_steps = "
                              f"{max_steps}; raise run.max_steps to at least {trainer.step}, or resume from an "
                              "earlier checkpoint")
    files = {name: _dump(_read_json(folder, name)) for name in sorted(expected & set(JSON_SCHEMAS))}
    check_consistent_steps(trainer.step, files, folder)
    check_validation(files[TRAINER_STATE].get("validation"), trainer.step, folder / TRAINER_STATE)
    check_config(files, expect or {}, folder)
    rng = [p.name for p in folder.iterdir() if RNG.fullmatch(p.name)]
    for name in sorted((expected - set(JSON_SCHEMAS)) | set(rng)):
        _check_header(folder, name)
    return trainer


def _restore_rng(folder: Path, process_index: int) -> None:
    name = f"rng-{process_index}.safetensors"
    if not (folder / name).exists() and not (folder / name).is_symlink():
        return  # a run resumed on more processes than it was saved with starts their RNG afresh
    generators = _read_tensors(folder, name)
    cuda = sorted((k for k in generators if k.startswith("cuda")), key=lambda k: int(k[4:]) if k[4:].isdigit() else -1)
    own = torch.get_rng_state()
    if "cpu" not in generators or set(generators) - {"cpu"} != {f"cuda{i}" for i in range(len(cuda))}:
        raise CheckpointError(f"{folder / name} holds {sorted(generators)}; lift3d writes cpu and cuda0, cuda1, ...")
    for key, state in generators.items():
        like = own if key == "cpu" else state
        if state.dtype != torch.uint8 or state.dim() != 1 or state.shape != like.shape:
            raise CheckpointError(f"{folder / name}: the {key} RNG state is {state.dtype} {tuple(state.shape)}; "
                                  f"a torch RNG state is uint8 ({like.numel()},)")
    if torch.cuda.is_available():
        for i, key in enumerate(cuda[:torch.cuda.device_count()]):
            if generators[key].shape != torch.cuda.get_rng_state(i).shape:
                raise CheckpointError(f"{folder / name}: the {key} RNG state has {generators[key].numel()} bytes, "
                                      f"this GPU's has {torch.cuda.get_rng_state(i).numel()}")
    try:  # torch checks the Mersenne Twister's own fields
        torch.set_rng_state(generators["cpu"])
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([generators[k] for k in cuda[:torch.cuda.device_count()]])
    except RuntimeError as exc:
        raise CheckpointError(f"{folder / name} holds no valid RNG state ({str(exc).splitlines()[0][:120]})") from None


def load_training_state(folder: Path, *, model: nn.Module, optimizer, lr_scheduler, ema=None, scaler=None,
                        process_index: int = 0, max_steps: int | None = None) -> int:
    """Restore what ``save_training_state`` wrote; returns the step to continue from.

    Every file is read through the trusted readers, inside ``folder``, and checked against this run's own
    objects (keys, shapes, dtypes, kinds of values), its options and schedule (``lift3d.training.resume_checks``)
    and the checkpoint's step, all before anything is restored; each failure is one
    ``Lift3dError`` line naming the file and the key."""
    folder = Path(folder)
    step = check_training_state(folder, ema=ema is not None, scaler=scaler is not None, max_steps=max_steps).step
    rates = expected_rates(lr_scheduler, step)
    own_schedule = lr_scheduler.state_dict()
    schedule = conform(own_schedule, _dump(_read_json(folder, LR_SCHEDULER)), folder / LR_SCHEDULER)
    check_schedule(schedule, own_schedule, rates, step, folder / LR_SCHEDULER)
    ema_settings = shadow = None
    if ema is not None:
        reference = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        ema_settings = conform(reference, _dump(_read_json(folder, EMA_SETTINGS)), folder / EMA_SETTINGS)
        check_ema(ema_settings, reference, folder / EMA_SETTINGS)
        shadow = _read_shadow(folder, ema)
    scaler_state = None
    if scaler is not None:
        scaler_state = conform(scaler.state_dict(), _dump(_read_json(folder, SCALER)), folder / SCALER)
        check_scaler(scaler_state, scaler.state_dict(), folder / SCALER)
    optimizer_state = _read_optimizer(optimizer, folder, step, rates)
    weights = _read_tensors(folder, MODEL)
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{folder / MODEL}: {bad} holds NaN or inf; lift3d checkpoints only finite weights")

    load_state_dict_checked(model, weights, f"model weights {folder / MODEL}")
    optimizer.load_state_dict(optimizer_state)
    lr_scheduler.load_state_dict(schedule)
    if ema is not None:
        ema.load_state_dict({**ema_settings, "shadow_params": shadow})
    if scaler is not None:
        scaler.load_state_dict(scaler_state)
    _restore_rng(folder, process_index)
    return step


def _read_shadow(folder: Path, ema) -> list[torch.Tensor]:
    """The EMA's shadow weights, one per trained parameter, each of its shape and dtype, finite."""
    shadow = _read_tensors(folder, EMA)
    if set(shadow) != {str(i) for i in range(len(ema.shadow_params))}:
        raise CheckpointError(f"{folder / EMA} holds {len(shadow)} EMA tensors, this run trains "
                              f"{len(ema.shadow_params)} (keys 0..{len(ema.shadow_params) - 1})")
    for i, p in enumerate(ema.shadow_params):
        check_tensor(shadow[str(i)], p.detach(), f"{folder / EMA}: tensor {i}")
    return [shadow[str(i)].to(p.device) for i, p in enumerate(ema.shadow_params)]


def load_validation_state(folder: Path, reference: dict[str, torch.Tensor] | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The best validation step's weights and scores, as ``save_training_state`` wrote them.

    ``reference`` (name -> this run's trained tensor) is what the weights must match, key for key."""
    info = read_trainer_state(folder).validation
    if info is None:
        return {}, None
    weights = _read_tensors(folder, BEST)
    if reference is not None:
        if set(weights) != set(reference):
            missing, unexpected = sorted(set(reference) - set(weights)), sorted(set(weights) - set(reference))
            raise CheckpointError(f"{folder / BEST} does not hold this run's trained weights: missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]}")
        for name, like in reference.items():
            check_tensor(weights[name], like.detach().cpu(), f"{folder / BEST}: {name}")
    return weights, info.model_dump()
