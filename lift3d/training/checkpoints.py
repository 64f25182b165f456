"""The run folder: checkpoints written atomically and rotated, resume, and the rules that keep a folder
to one run (another run's work is refused unless ``run.overwrite``; never around the pretrained model)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from lift3d.io.errors import Lift3dError, RunFolderError
from lift3d.io.writing import clean_stale_temporaries, disk_full_message, temporary_path
from lift3d.lifting.checkpoint import CheckpointError
from lift3d.training.sections import SharedSections
from lift3d.training.state import TRAINER_STATE, check_training_state, save_training_state

logger = logging.getLogger("lift3d.training.checkpoints")


CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete training-state checkpoints, oldest first (temp folders are never listed)."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if (p / TRAINER_STATE).is_file() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


@dataclass
class TrainingState:
    """Everything a checkpoint restores, as ``lift3d.training.state`` writes it (no pickle)."""

    model: nn.Module
    optimizer: Any
    lr_scheduler: Any
    ema: Any = None
    scaler: Any = None
    validation: Any = None  # a ValidationTracker on the main process when sampled validation runs


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def write_failure(exc: BaseException, path: Path) -> str:
    """One line for a write that failed (a full disk, say): the final path, and what the system said.
    safetensors reports an OS error inside its own message (``IoError(Os { code: 28, ... })``)."""
    if not isinstance(exc, OSError):
        code = re.search(r"code: (\d+)", str(exc))
        exc = OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else OSError(str(exc)[:160])
    return disk_full_message(exc, path)


@contextlib.contextmanager
def removed_on_failure(tmp: Path, final: Path, remove: bool = True):
    """Whatever goes wrong while ``tmp`` is written, it is removed; a failed write (OSError, or
    safetensors' own error) becomes one line naming ``final``."""
    from safetensors import SafetensorError

    try:
        yield
    except BaseException as exc:
        if remove:
            _remove(tmp)
        if isinstance(exc, (OSError, SafetensorError)):
            raise Lift3dError(write_failure(exc, final)) from None
        raise


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename complete folder ``tmp`` onto ``final``; an old ``final`` is moved aside first, then removed."""
    old = None
    if final.exists() or final.is_symlink():
        old = temporary_path(final)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        _remove(old)


def write_folder(final: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a hidden temporary beside ``final``, then rename it onto ``final``. A failure
    (kill -9 aside, which the next run's ``clean_stale_temporaries`` covers) leaves nothing behind."""
    tmp = temporary_path(final)
    with removed_on_failure(tmp, final):
        write(tmp)
        replace_folder(tmp, final)
    return final


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, state: TrainingState,
                    loss: float | None = None) -> Path:
    """Write the training state into a temp folder, then rename: a crash never leaves a half checkpoint."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = temporary_path(final)
    if accelerator.num_processes > 1:  # every process writes its RNG file into the main process's folder
        from accelerate.utils import broadcast_object_list

        tmp = Path(broadcast_object_list([str(tmp)])[0])
    with removed_on_failure(tmp, final, remove=accelerator.is_main_process):
        if accelerator.is_main_process:
            tmp.mkdir()
        accelerator.wait_for_everyone()
        save_training_state(tmp, model=accelerator.unwrap_model(state.model), optimizer=state.optimizer,
                            lr_scheduler=state.lr_scheduler, ema=state.ema, scaler=state.scaler, step=step, loss=loss,
                            validation=None if state.validation is None else state.validation.state(),
                            is_main_process=accelerator.is_main_process, process_index=accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_folder(tmp, final)
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(cfg: SharedSections, output_dir: Path) -> Path | None:
    """The checkpoint to resume from; every file in it is checked before anything is written."""
    if not cfg.run.resume:
        return None
    if cfg.run.resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("run.resume = 'latest' but %s holds no checkpoint; starting from scratch", output_dir)
            return None
        path = found[-1]
    else:
        path = Path(cfg.run.resume)
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"run.resume = {cfg.run.resume!r} is not a complete lift3d checkpoint folder "
                                  f"(no {TRAINER_STATE}); use 'latest' or a checkpoint-<step> folder")
    optim = cfg.optim
    expect = {"optim.learning_rate": optim.learning_rate, "optim.weight_decay": optim.weight_decay,
              **({"optim.ema_decay": optim.ema_decay} if optim.ema else {})}
    # The options a config sets one for one are compared here, before the run folder is touched; the rest
    # (AdamW's own, the schedule at this step, the EMA's) when the state is loaded, before a step is trained.
    check_training_state(path, ema=optim.ema, scaler=optim.mixed_precision == "fp16", max_steps=cfg.run.max_steps,
                         expect=expect)
    return path


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


def previous_work(output_dir: Path, resume_from: Path | None) -> list[Path]:
    """What in ``output_dir`` belongs to another run, and this run would destroy or mix with.

    A fresh run (or one resumed from a checkpoint elsewhere) must not share a folder with other
    checkpoints: rotation would delete its own newest ones first, and ``resume latest`` would pick
    the other run's. Nor would it silently replace an exported model. A run resumed from one of
    the folder's own checkpoints owns that lineage, but not the checkpoints past its step."""
    if not output_dir.is_dir():
        return []
    found = list_checkpoints(output_dir)
    own = resume_from is not None and resume_from.resolve().parent == output_dir.resolve() \
        and resume_from.name.startswith(CHECKPOINT_PREFIX) and resume_from.name[len(CHECKPOINT_PREFIX):].isdigit()
    if own:
        return [c for c in found if _step_of(c) > _step_of(resume_from)]
    model = output_dir / "model"
    return found + ([model] if model.exists() or model.is_symlink() else [])


def claim_run_folder(cfg: SharedSections, output_dir: Path, resume_from: Path | None) -> None:
    """Refuse, or with ``run.overwrite`` delete, another run's work in ``output_dir`` (called with
    the folder's lock held); and remove the temporaries of writers that died."""
    others = previous_work(output_dir, resume_from)
    if others:
        names = ", ".join(p.name for p in others[:6]) + (f", ... ({len(others)} in all)" if len(others) > 6 else "")
        if not getattr(cfg.run, "overwrite", False):
            checkpoints = [p for p in others if p.name != "model"]
            if resume_from is None:
                why = "a fresh run there would " + " and ".join(
                    (["replace its exported model"] if len(checkpoints) < len(others) else [])
                    + (["mix its checkpoints with theirs (rotation would delete this run's own, and resume "
                        "latest would pick theirs)"] if checkpoints else []))
                fix = "resume that run with --run.resume latest, " if checkpoints else ""
            else:
                why = f"resuming from {resume_from} there would mix this run's checkpoints with them"
                fix = "resume from the latest with --run.resume latest, "
            delete = f"delete {'it' if len(others) == 1 else 'them'} and start afresh with --run.overwrite true"
            advice = f"{fix}{delete}, or choose another --run.output_dir"
            raise RunFolderError(f"run.output_dir {output_dir} already holds another run's work ({names}); {why}. "
                                 f"{advice[:1].upper()}{advice[1:]}")
        logger.warning("run.overwrite: deleting %s in %s", names, output_dir)
        for path in others:
            _remove(path)
    clean_stale_temporaries(output_dir)


def check_outside_inputs(cfg: SharedSections, output_dir: Path) -> None:
    """Refuse an ``output_dir`` that holds (or lies inside) a model folder this run reads: writing
    the run there would replace the stage-1 model, its checkpoints and its logs."""
    inputs = [("model.pretrained", cfg.model.pretrained)]
    path = cfg.autoencoder.options.get("path") if isinstance(cfg.autoencoder.options, dict) else None
    if isinstance(path, str):
        inputs.append(("autoencoder.options.path", path))
    out = output_dir.resolve()
    for option, value in inputs:
        if not value:
            continue
        folder = Path(value).resolve()
        if out == folder or out in folder.parents or folder in out.parents:
            where = "is" if out == folder else "contains" if out in folder.parents else "lies inside"
            raise RunFolderError(f"run.output_dir {output_dir} {where} {option} {value}: this run would overwrite "
                                 f"the model it starts from (and that run's checkpoints and logs); choose an "
                                 "output_dir outside it")
