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

Noise, timesteps and the data order are seeded by (seed, step), so the RNG files only matter for
code that draws from the global generator (dropout, say).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lift3d.checkpoint import CheckpointError, load_state_dict_checked, read_safetensors, save_safetensors

STATE_FORMAT = 1
TRAINER_STATE = "trainer_state.json"
MODEL = "model.safetensors"
OPTIMIZER, OPTIMIZER_GROUPS = "optimizer.safetensors", "optimizer.json"
LR_SCHEDULER = "lr_scheduler.json"
EMA, EMA_SETTINGS = "ema.safetensors", "ema.json"
SCALER = "scaler.json"
BEST = "best.safetensors"
RNG = re.compile(r"rng-\d+\.safetensors")
KNOWN_FILES = {TRAINER_STATE, MODEL, OPTIMIZER, OPTIMIZER_GROUPS, LR_SCHEDULER, EMA, EMA_SETTINGS, SCALER, BEST}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, allow_nan=True))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


def _plain(value: Any, where: str) -> Any:
    """A JSON-ready copy of ``value``; tuples become lists (restored by :func:`_like`)."""
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


# --------------------------------------------------------------------------------------------
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


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    tensors, _ = read_safetensors(folder / OPTIMIZER)
    saved = _read_json(folder / OPTIMIZER_GROUPS)
    current = optimizer.state_dict()
    groups = saved.get("param_groups", [])
    if len(groups) != len(current["param_groups"]) or any(
            len(g.get("params", [])) != len(c["params"]) for g, c in zip(groups, current["param_groups"])):
        raise CheckpointError(f"{folder / OPTIMIZER_GROUPS} is for another set of trained parameters "
                              "(did lift.trainable or the model change since the checkpoint?)")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in saved.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    param_groups = [{k: _like(c.get(k), v) for k, v in g.items()} for g, c in zip(groups, current["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


# --------------------------------------------------------------------------------------------
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


def read_trainer_state(folder: Path) -> dict[str, Any]:
    state = _read_json(folder / TRAINER_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{folder / TRAINER_STATE} holds no step: not a lift3d checkpoint")
    return state


def load_training_state(folder: Path, *, model: nn.Module, optimizer, lr_scheduler, ema=None, scaler=None,
                        process_index: int = 0) -> int:
    """Restore what :func:`save_training_state` wrote; returns the step to continue from."""
    expected = KNOWN_FILES - ({EMA, EMA_SETTINGS} if ema is None else set()) - ({SCALER} if scaler is None else set())
    if "validation" not in read_trainer_state(folder):
        expected = expected - {BEST}
    check_checkpoint_files(folder, expected)
    step = read_trainer_state(folder)["step"]
    weights, _ = read_safetensors(folder / MODEL)
    load_state_dict_checked(model, weights, f"model weights in {folder}")
    _load_optimizer(optimizer, folder)
    lr_scheduler.load_state_dict(_read_json(folder / LR_SCHEDULER))
    if ema is not None:
        shadow, _ = read_safetensors(folder / EMA)
        settings = _read_json(folder / EMA_SETTINGS)
        if len(shadow) != len(ema.shadow_params):
            raise CheckpointError(f"{folder / EMA} holds {len(shadow)} EMA tensors, this run trains {len(ema.shadow_params)}")
        ema.load_state_dict({**settings, "shadow_params": [shadow[str(i)].to(p.device)
                                                           for i, p in enumerate(ema.shadow_params)]})
    if scaler is not None:
        scaler.load_state_dict(_read_json(folder / SCALER))
    rng_file = folder / f"rng-{process_index}.safetensors"
    if rng_file.is_file():  # a run resumed on more processes than it was saved with starts their RNG afresh
        generators, _ = read_safetensors(rng_file)
        torch.set_rng_state(generators["cpu"])
        cuda = [generators[f"cuda{i}"] for i in range(sum(k.startswith("cuda") for k in generators))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    return step


def load_validation_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The best validation step's weights and scores, as :func:`save_training_state` wrote them."""
    info = read_trainer_state(folder).get("validation")
    if info is None:
        return {}, None
    weights, _ = read_safetensors(folder / BEST)
    return weights, info
