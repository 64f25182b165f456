"""A checkpoint must agree with the run that resumes it, and its files with each other.

The schemas of ``lift3d.training.state`` check each file's shape; here its values are checked against
this run's own optimizer, learning-rate schedule, EMA and scaler (built from its config) and against the
step the checkpoint records. A state that type-checks can still train something else: ``maximize = true``
makes AdamW ascend the loss, ``lr = 0`` stops it, an EMA step of 1e8 freezes the average, a validation
score of 1e308 makes the exporter pick the wrong step, a negative ``exp_avg_sq`` puts NaN in the weights.
Every mismatch is one ``CheckpointError`` line naming the file and the
key, raised before anything is trained.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lift3d.lifting.checkpoint import CheckpointError

# Where a param group's option comes from, for the message that names what the user can change.
CONFIG_OPTIONS = {"initial_lr": "optim.learning_rate", "weight_decay": "optim.weight_decay",
                  "decay": "optim.ema_decay"}
RELATIVE_TOLERANCE = 1e-9


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "null" if value is None else str(value).lower()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def mismatch(reference: Any, value: Any, where: str) -> str | None:
    """Where ``value`` (read from JSON) differs in kind from ``reference`` (this run's own state), or None.

    Numbers stay numbers (finite; an int where an int was), flags stay flags, lists keep their
    length and dicts their keys: nothing of another shape reaches ``load_state_dict``."""
    if isinstance(reference, torch.Tensor) and reference.numel() == 1:
        reference = reference.item()
    if reference is None or isinstance(reference, (bool, str)):
        ok = value is None if reference is None else type(value) is type(reference)
        kind = "null" if reference is None else type(reference).__name__
        return None if ok else f"{where} must be {kind}, got {_show(value)}"
    if isinstance(reference, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{where} must be a finite number, got {_show(value)}"
        if isinstance(reference, int) and not isinstance(value, int):
            return f"{where} must be an integer, got {_show(value)}"
        return None
    if isinstance(reference, (list, tuple)):
        if not isinstance(value, list) or len(value) != len(reference):
            return f"{where} must be a list of {len(reference)}, got {_show(value)}"
        found = (mismatch(r, v, f"{where}[{i}]") for i, (r, v) in enumerate(zip(reference, value)))
        return next((m for m in found if m), None)
    if isinstance(reference, dict):
        if not isinstance(value, dict):
            return f"{where} must be an object, got {_show(value)}"
        missing, unexpected = sorted(set(reference) - set(value)), sorted(set(value) - set(reference))
        if missing or unexpected:
            return f"{where or 'the file'} has missing keys {missing} and unexpected keys {unexpected}"
        found = (mismatch(reference[k], value[k], f"{where}.{k}".lstrip(".")) for k in reference)
        return next((m for m in found if m), None)
    return f"{where} holds a {type(reference).__name__}, which lift3d does not restore from JSON"


def conform(reference: Any, value: Any, path: Path, where: str = "") -> Any:
    """``value``, if it has the kind of ``reference`` throughout (``mismatch``); else one line naming ``path``."""
    problem = mismatch(reference, value, where)
    if problem:
        raise CheckpointError(f"{path} does not match this run's state: {problem}")
    return value


def check_tensor(tensor: torch.Tensor, like: torch.Tensor, where: str) -> None:
    """``tensor`` has ``like``'s shape and dtype, and holds finite values."""
    if tuple(tensor.shape) != tuple(like.shape) or tensor.dtype != like.dtype:
        raise CheckpointError(f"{where} is {tensor.dtype} {tuple(tensor.shape)}; this run's parameter is "
                              f"{like.dtype} {tuple(like.shape)}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"{where} holds NaN or inf")


def _same(a: Any, b: Any) -> bool:
    """Equal as the file stores them (a tuple is a list), floats to rounding."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-300)
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def check_options(saved: dict[str, Any], own: dict[str, Any], path: Path, where: str, skip: set[str] = frozenset()) -> None:
    """Every option in ``saved`` (a param group, the EMA's or the scaler's settings) equals this run's."""
    for key, value in saved.items():
        if key in skip or key not in own or _same(value, _plain(own[key])):
            continue
        source = CONFIG_OPTIONS.get(key)
        origin = f"this run's {source} is {_show(_plain(own[key]))}" if source else \
            f"this run has {_show(_plain(own[key]))} (lift3d builds it so; a checkpoint cannot change it)"
        raise CheckpointError(f"{path}: {where}{key} is {_show(value)}, but {origin}; resume with the settings "
                              "the checkpoint was written with")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return list(value) if isinstance(value, tuple) else value


# The files against each other: what can be checked before the model exists


def check_consistent_steps(step: int, files: dict[str, dict[str, Any]], folder: Path) -> None:
    """The learning-rate schedule, the optimizer's learning rates and the EMA are at the trainer's ``step``.

    ``files`` maps each checkpoint file name read so far to its content."""
    schedule, groups, ema = (files.get(n) for n in ("lr_scheduler.json", "optimizer.json", "ema.json"))
    if schedule is not None:
        path = folder / "lr_scheduler.json"
        if schedule["last_epoch"] != step:
            raise CheckpointError(f"{path}: last_epoch is {schedule['last_epoch']}, but trainer_state.json is at step "
                                  f"{step}: the files come from different checkpoints")
        if "_step_count" in schedule and schedule["_step_count"] != step + 1:
            raise CheckpointError(f"{path}: _step_count is {_show(schedule['_step_count'])}, but a schedule at "
                                  f"last_epoch {step} has stepped {step + 1} times")
        if schedule.get("_get_lr_called_within_step") not in (None, False):
            raise CheckpointError(f"{path}: _get_lr_called_within_step must be false between steps")
        rates = [g["lr"] for g in groups["param_groups"]] if groups is not None else None
        if rates is not None and "_last_lr" in schedule and not _same(schedule["_last_lr"], rates):
            raise CheckpointError(f"{folder / 'optimizer.json'}: the param_groups' lr are {_show(rates)}, but {path} "
                                  f"has _last_lr {_show(schedule['_last_lr'])}: the files come from different checkpoints")
    if ema is not None and ema["optimization_step"] != step:
        raise CheckpointError(f"{folder / 'ema.json'}: optimization_step is {_show(ema['optimization_step'])}, but "
                              f"trainer_state.json is at step {step}; the EMA takes one step per optimizer step")


def check_config(files: dict[str, dict[str, Any]], expect: dict[str, float], folder: Path) -> None:
    """The options a checkpoint records that a config sets one for one (``expect``: ``optim.learning_rate``,
    ``optim.weight_decay``, ``optim.ema_decay``), checked before the run touches its folder."""
    places = {"optim.learning_rate": [("optimizer.json", "initial_lr"), ("lr_scheduler.json", "base_lrs")],
              "optim.weight_decay": [("optimizer.json", "weight_decay")], "optim.ema_decay": [("ema.json", "decay")]}
    for option, value in expect.items():
        for name, key in places.get(option, []):
            content = files.get(name)
            if content is None:
                continue
            held = [g.get(key) for g in content["param_groups"]] if name == "optimizer.json" else content[key]
            for i, saved in enumerate(held if isinstance(held, list) else [held]):
                if saved is not None and not _same(float(saved), float(value)):
                    where = f"param_groups[{i}].{key}" if name == "optimizer.json" else \
                        f"{key}[{i}]" if isinstance(held, list) else key
                    raise CheckpointError(f"{folder / name}: {where} is {_show(saved)}, but this run's {option} is "
                                          f"{_show(value)}; resume with the settings the checkpoint was written with")


def check_validation(record: dict[str, Any] | None, step: int, path: Path) -> None:
    """The sampled-validation record of ``trainer_state.json``: its step at most the trainer's, every score
    finite, in its metric's range and recorded by lift3d, and the best no worse than step 0's."""
    if record is None:
        return
    from lift3d.evaluation.metrics import DATA_RANGE, METRICS
    from lift3d.training.validation import SELECTION_METRIC

    # Each score is a mean over subjects of a metric of volumes mapped to [0, DATA_RANGE] (lift3d.evaluation.metrics):
    # an MSE of at most DATA_RANGE**2 keeps PSNR >= 0, and 1000 dB is an MSE no float64 volume reaches.
    ranges = {"val_mae": (0.0, DATA_RANGE), "val_psnr": (0.0, 1000.0), "val_ssim": (-1.0, 1.0),
              "val_z_inconsistency": (0.0, math.inf)}

    if record["step"] > step:
        raise CheckpointError(f"{path}: validation.step is {record['step']}, past the checkpoint's own step {step}")
    valid = [f"val_{name}" for name in METRICS]
    for part in ("scores", "first"):
        for key, value in (record.get(part) or {}).items():
            low, high = ranges.get(key, (-math.inf, math.inf))
            if key not in valid:
                raise CheckpointError(f"{path}: validation.{part}.{key} is not a score lift3d records; valid: "
                                      f"{', '.join(valid)}")
            if not (math.isfinite(value) and low <= value <= high):
                bounds = f"from {low:g} to {high:g}" if math.isfinite(high) else f"at least {low:g}"
                raise CheckpointError(f"{path}: validation.{part}.{key} is {_show(value)}; a {key[4:]} score is a "
                                      f"finite number {bounds}")
    key, first = f"val_{SELECTION_METRIC}", record.get("first") or {}
    if key in first and key in record["scores"] and record["scores"][key] < first[key]:
        raise CheckpointError(f"{path}: validation.scores.{key} {record['scores'][key]:g} is below step 0's "
                              f"{first[key]:g}, but the best step is never worse than step 0")


# The files against this run: its options, its schedule


def expected_rates(lr_scheduler, step: int) -> list[float] | None:
    """The learning rates this run's schedule gives at ``step`` (None for a schedule without lambdas)."""
    lambdas, bases = getattr(lr_scheduler, "lr_lambdas", None), getattr(lr_scheduler, "base_lrs", None)
    if not lambdas or bases is None or any(not callable(f) for f in lambdas):
        return None
    return [base * f(step) for f, base in zip(lambdas, bases)]


def check_schedule(saved: dict[str, Any], own: dict[str, Any], rates: list[float] | None, step: int,
                   path: Path) -> None:
    """``lr_scheduler.json`` has this run's base learning rates and, at ``step``, its learning rates."""
    if not _same(saved["base_lrs"], own["base_lrs"]):
        raise CheckpointError(f"{path}: base_lrs is {_show(saved['base_lrs'])}, but this run's optim.learning_rate "
                              f"gives {_show(own['base_lrs'])}; resume with the settings the checkpoint was written with")
    if rates is not None and "_last_lr" in saved and not _same(saved["_last_lr"], rates):
        raise CheckpointError(f"{path}: _last_lr is {_show(saved['_last_lr'])}, but this run's learning-rate schedule "
                              f"(optim.learning_rate, optim.lr_scheduler, optim.warmup_steps, run.max_steps) gives "
                              f"{_show(rates)} at step {step}")


def check_groups(saved: list[dict[str, Any]], own: list[dict[str, Any]], rates: list[float] | None, step: int,
                 path: Path) -> None:
    """Each saved param group has this run's options, and at ``step`` this run's learning rate."""
    for i, (group, mine) in enumerate(zip(saved, own)):
        check_options(group, mine, path, f"param_groups[{i}].", skip={"params", "lr"})
        if rates is not None and not _same(group["lr"], rates[i]):
            raise CheckpointError(f"{path}: param_groups[{i}].lr is {_show(group['lr'])}, but this run's learning-rate "
                                  f"schedule (optim.learning_rate, optim.lr_scheduler, optim.warmup_steps, "
                                  f"run.max_steps) gives {_show(rates[i])} at step {step}")


def _moment_bound(betas: Any) -> float | None:
    """C with ``exp_avg**2 <= C * exp_avg_sq`` for any gradients (Cauchy-Schwarz over Adam's two averages)."""
    b1, b2 = (float(b) for b in betas)
    if not (0 <= b1 < 1 and 0 < b2 < 1) or b1 * b1 >= b2:
        return None
    return (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / b2))


def check_adam_state(state: dict[int, dict[str, torch.Tensor]], groups: list[dict[str, Any]], step: int,
                     path: Path) -> None:
    """AdamW's per-parameter state: the moments it keeps for its ``amsgrad`` setting, a step count no
    larger than the trainer's, no negative second moment, a first moment its second allows."""
    options = {i: g for g in groups for i in g["params"]}
    for index, entries in sorted(state.items()):
        group = options[index]
        needed = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        if set(entries) != needed:
            raise CheckpointError(f"{path}: parameter {index} has state {sorted(entries)}; AdamW with amsgrad "
                                  f"{_show(bool(group.get('amsgrad')))} keeps {sorted(needed)}")
        count = float(entries["step"])
        if count > step:
            raise CheckpointError(f"{path}: {index}.step is {count:g}, past the checkpoint's own step {step}")
        square = entries["exp_avg_sq"].double()
        if (square < 0).any():
            raise CheckpointError(f"{path}: {index}.exp_avg_sq holds negative values; a running mean of squares "
                                  "is never negative")
        if "max_exp_avg_sq" in entries and (entries["max_exp_avg_sq"].double() < square).any():
            raise CheckpointError(f"{path}: {index}.max_exp_avg_sq is below exp_avg_sq somewhere; it is their "
                                  "running maximum")
        bound = _moment_bound(group.get("betas", (0.9, 0.999)))
        if bound is not None and (entries["exp_avg"].double() ** 2 > bound * 1.001 * square + 1e-30).any():
            raise CheckpointError(f"{path}: {index}.exp_avg is larger than its exp_avg_sq allows (|exp_avg| <= "
                                  f"{math.sqrt(bound):.3g} sqrt(exp_avg_sq) for these betas, whatever the gradients)")


def check_ema(saved: dict[str, Any], own: dict[str, Any], path: Path) -> None:
    """``ema.json`` has this run's EMA settings (``optim.ema_decay``, diffusers' defaults for the rest)."""
    check_options(saved, own, path, "", skip={"optimization_step"})


def check_scaler(saved: dict[str, Any], own: dict[str, Any], path: Path) -> None:
    """``scaler.json`` has this run's growth and backoff, a tracker below its interval and a float32 scale."""
    check_options(saved, own, path, "", skip={"scale", "_growth_tracker"})
    if saved["_growth_tracker"] >= saved["growth_interval"]:
        raise CheckpointError(f"{path}: _growth_tracker is {saved['_growth_tracker']}; it counts up to "
                              f"growth_interval {saved['growth_interval']} and then starts again")
    if saved["scale"] > torch.finfo(torch.float32).max:
        raise CheckpointError(f"{path}: scale is {_show(saved['scale'])}; a gradient scale is a finite float32")
