"""One training loop for every stage (``lift3d.training.stages``), wired with Accelerate.

Make-A-Volume (Zhu et al., MICCAI 2023) trains in two stages through it: stage 1 (``run.stage = "slices"``,
sec. 2.2) a 2D U-Net with a timestep per slice, stage 2 (``run.stage = "volumes"``, sec. 2.3) the U-Net lifted
with ``lift3d.lifting.inflate`` and fine-tuned on whole volumes with one timestep per volume. The stage
gives the loop its model, trained parameters, data, loss, validation and export (a
``Task``); the loop gives every stage the same optimizer, schedule, EMA,
mixed precision, logs, checkpoints and resume.

Noise and timesteps are drawn per item from a generator seeded by (seed, step, dataset index), and
the data order per epoch from (seed, epoch). So a resumed run repeats an uninterrupted one, and
two processes with half the batch each see exactly what one process with the whole batch sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lift3d.data.dataset import stack_items
from lift3d.io.errors import Lift3dError
from lift3d.io.writing import RunLock
from lift3d.plugins import create
from lift3d.training.checkpoints import (
    TrainingState,
    check_outside_inputs,
    claim_run_folder,
    list_checkpoints,
    previous_work,
    resolve_resume,
    save_checkpoint,
)
from lift3d.training.config import TrainConfig, refuse_ignored, stage_of, validate
from lift3d.training.data_order import BatchPlan, PlannedBatches
from lift3d.training.memory import check_memory
from lift3d.training.sections import DataConfig, OptimConfig, RunConfig
from lift3d.training.selection import ValidationTracker, exported_weights
from lift3d.training.stages import Stage
from lift3d.training.state import load_training_state, read_trainer_state
from lift3d.training.task import Task
from lift3d.training.tracking import check_tracker, drop_rows_after

logger = logging.getLogger("lift3d.training.loop")


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or inf; training stopped, the checkpoints already written were kept."""


def check_weights_finite(params: list[nn.Parameter], step: int) -> None:
    bad = sum(int(not torch.isfinite(p).all()) for p in params)
    if bad:
        raise NonFiniteLossError(f"{bad} trained weight tensor(s) hold NaN or inf at step {step}; stopped without "
                                 "saving them (lower optim.learning_rate, or try mixed_precision = 'no')")


def check_run_options(cfg: TrainConfig) -> None:
    """What the config layer cannot know: whether this machine can do what the options ask."""
    check_tracker(cfg.run.tracker)
    if cfg.optim.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise Lift3dError("optim.mixed_precision = 'fp16' needs a CUDA GPU; on the CPU Accelerate would silently "
                          "train in fp32. Use 'bf16' (CPU mixed precision) or 'no'")


def check_config(cfg: TrainConfig) -> Stage:
    """Every check of ``cfg`` that reads no file: each option, how they fit the stage (which refuses the
    options it ignores), the memory its models need, and what this machine can do. Returns the stage."""
    validate(cfg)
    refuse_ignored(cfg)
    stage = stage_of(cfg)
    check_memory(cfg)
    check_run_options(cfg)
    return stage


def make_accelerator(run: RunConfig, optim: OptimConfig):
    """The Accelerator of ``[optim]``'s mixed precision and accumulation, logging into ``run.output_dir``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    from lift3d.training.tracking import CSVTracker

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Accelerate's state is a process-wide singleton; a second run in one process (the demo's
        # stage 2 after stage 1, or a notebook) may use other settings.
        AcceleratorState._reset_state(reset_partial_state=True)
    output_dir = Path(run.output_dir)
    trackers: Any = None
    if run.tracker == "csv":
        trackers = [CSVTracker("logs", output_dir)]
    elif run.tracker == "tensorboard":
        trackers = "tensorboard"
    # Without a GPU, cpu=True lets a torchrun-style launch (accelerate launch --multi_gpu) use gloo.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=optim.mixed_precision,
                       gradient_accumulation_steps=optim.gradient_accumulation_steps, log_with=trackers,
                       project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)))


def train(cfg: TrainConfig) -> Path:
    """Run one stage as configured; returns the exported model folder.

    Every input (options, data, autoencoder, pretrained U-Net, sampler, every file of the resume
    checkpoint) is checked before ``output_dir`` is touched, and so is the folder itself: it must
    not hold the pretrained model, nor another run's checkpoints or model (unless ``run.overwrite``).
    The run then holds the folder's lock to its end, so a second run into it is refused. If the run
    fails before its first checkpoint, a folder it created is removed again, so a refused run leaves
    nothing behind.
    """
    from accelerate.utils import set_seed

    stage = check_config(cfg)
    output_dir = Path(cfg.run.output_dir)
    check_outside_inputs(cfg, output_dir)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    set_seed(cfg.run.seed)
    dataset = create("datasets", cfg.data.dataset, split="train", **cfg.data.options)
    make_task = stage.prepare(cfg, dataset, output_dir)
    resume_from = resolve_resume(cfg, output_dir)
    if not cfg.run.overwrite and previous_work(output_dir, resume_from):
        claim_run_folder(cfg, output_dir, resume_from)  # refused before the folder is touched

    created = not output_dir.exists()
    # The run holds its folder from here to the end: a second run into it is refused, naming this one's PID.
    # Of a multi-process run, the main process holds it (the others meet it when Accelerate starts).
    main_process = os.environ.get("RANK", "0") == "0"
    with RunLock(output_dir) if main_process else contextlib.nullcontext():
        try:
            if main_process:
                claim_run_folder(cfg, output_dir, resume_from)  # again, now that no other run can write there
            return _train(cfg, stage, make_task, output_dir, resume_from)
        except Exception as exc:
            if created and not isinstance(exc, NonFiniteLossError) and not list_checkpoints(output_dir):
                shutil.rmtree(output_dir, ignore_errors=True)
            raise


@dataclass
class Run:
    """What the loop holds while it trains one stage: ``state`` is what a checkpoint saves."""

    accelerator: Any
    stage: Stage
    task: Task
    state: TrainingState
    output_dir: Path

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.state.model)


def _train(cfg: TrainConfig, stage: Stage, make_task: Callable[[Any], Task], output_dir: Path,
           resume_from: Path | None) -> Path:
    accelerator = make_accelerator(cfg.run, cfg.optim)
    run = start_run(accelerator, stage, make_task(accelerator), cfg.optim, cfg.run.max_steps, output_dir)
    step = 0 if resume_from is None else resume(run, resume_from, cfg.run.max_steps)
    loader = planned_loader(run, cfg.data, cfg.run.seed, step, cfg.optim.gradient_accumulation_steps,
                            cfg.run.max_steps)
    start_logs(run, step, resume_from, cfg.to_dict())
    run.state.validation = start_validation(run, step, resume_from, cfg.run.validate_every)
    step = train_steps(run, loader, step, cfg.run, cfg.optim)
    return finish(run, step)


def start_run(accelerator, stage: Stage, task: Task, optim: OptimConfig, max_steps: int, output_dir: Path) -> Run:
    """The task's model on the device, with AdamW, the learning-rate schedule and the EMA of ``[optim]``."""
    from diffusers.optimization import get_scheduler

    task.model.to(accelerator.device)
    optimizer = torch.optim.AdamW(task.params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    lr_scheduler = get_scheduler(optim.lr_scheduler, optimizer, num_warmup_steps=optim.warmup_steps,
                                 num_training_steps=max_steps)
    ema = None
    if optim.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(task.params, decay=optim.ema_decay)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    return Run(accelerator, stage, task, TrainingState(model, optimizer, lr_scheduler, ema, accelerator.scaler),
               output_dir)


def resume(run: Run, folder: Path, max_steps: int) -> int:
    """Restore the training state of checkpoint ``folder``; returns its step."""
    accelerator, state = run.accelerator, run.state
    step = load_training_state(folder, model=run.unwrapped, optimizer=state.optimizer, lr_scheduler=state.lr_scheduler,
                               ema=state.ema, scaler=accelerator.scaler, process_index=accelerator.process_index,
                               max_steps=max_steps)
    accelerator.print(f"lift3d: resumed from {folder} at step {step}")
    return step


def planned_loader(run: Run, data: DataConfig, seed: int, step: int, accumulation: int, max_steps: int):
    """The batches of the remaining steps, in the order an uninterrupted run reads them (``BatchPlan``)."""
    accelerator, view = run.accelerator, run.task.view
    plan = BatchPlan(len(view), data.batch_size, accelerator.num_processes, accelerator.process_index, seed)
    remaining = max(max_steps - step, 0) * accumulation
    # Its own generator: a DataLoader's iterator otherwise draws its base seed from the global RNG,
    # which a resumed run restores before the iterator exists and an uninterrupted one after.
    return torch.utils.data.DataLoader(view, batch_sampler=PlannedBatches(plan, step * accumulation, remaining),
                                       collate_fn=stack_items, num_workers=data.num_workers,
                                       generator=torch.Generator().manual_seed(seed))


def start_logs(run: Run, step: int, resume_from: Path | None, config: dict[str, Any]) -> None:
    """Start the trackers with the run's options; a fresh run scores the model it starts from."""
    accelerator = run.accelerator
    log_file = run.output_dir / "logs" / "metrics.csv"
    if accelerator.is_main_process and log_file.is_file():
        # A fresh run in an old folder starts a fresh log; a resumed run drops the rows logged after
        # its checkpoint (they are logged again), then appends.
        drop_rows_after(log_file, step if resume_from is not None else -1)
    accelerator.init_trackers("logs", config={k: json.dumps(v) for k, v in config.items()})
    if step == 0:
        scores = run.task.score(run.unwrapped)
        accelerator.log(scores, step=0)
        accelerator.print(f"lift3d: stage {run.stage.name!r} on {accelerator.num_processes} process(es), "
                          f"{accelerator.device}; initial {_scores(scores)}")


def start_validation(run: Run, step: int, resume_from: Path | None, every: int) -> ValidationTracker | None:
    """Sampled validation (when the task has it), restored on resume or scored at the first step.
    It runs on the main process only; the others wait at the next all-reduce."""
    if run.task.sampled is None or not run.accelerator.is_main_process:
        return None
    tracker = ValidationTracker(run.task.sampled, run.unwrapped, run.task.params, run.state.ema, every)
    if resume_from is not None:
        tracker.restore(resume_from)
    else:
        run.accelerator.log(tracker.score(step), step=step)
    return tracker


def train_steps(run: Run, loader, step: int, options: RunConfig, optim: OptimConfig) -> int:
    """Train from ``step`` to ``options.max_steps``: log, validate and checkpoint on the way; returns the last step."""
    accelerator, state, params = run.accelerator, run.state, run.task.params
    accumulation, tracker = optim.gradient_accumulation_steps, state.validation
    progress = tqdm(total=options.max_steps, initial=step, desc=f"stage {run.stage.name}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    state.model.train()
    window: dict[str, list[float]] = {}
    last_logged: float | None = None
    tic = time.perf_counter()
    micro = step * accumulation
    for batch in loader:
        with accelerator.accumulate(state.model):
            loss, extra = run.task.loss(state.model, batch, micro)
            check_finite(accelerator, loss, step, run.output_dir)
            accelerator.backward(loss)
            if accelerator.sync_gradients and optim.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, optim.max_grad_norm)
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        micro += 1
        for key, value in {"loss": loss, **extra}.items():
            window.setdefault(key, []).append(float(accelerator.gather(value.detach().float()[None]).mean()))
        if not accelerator.sync_gradients:
            continue
        state.lr_scheduler.step()
        if state.ema is not None:
            state.ema.step(params)
        step += 1
        progress.update(1)
        if step % options.log_every == 0 or step == options.max_steps:
            last_logged = log_window(run, window, step, time.perf_counter() - tic, accumulation)
            progress.set_postfix(loss=f"{last_logged:.4f}")
            window, tic = {}, time.perf_counter()
        if tracker is not None and tracker.due(step, options.max_steps):
            accelerator.log(tracker.score(step), step=step)
        if options.checkpoint_every and step % options.checkpoint_every == 0:
            check_weights_finite(params, step)
            save_checkpoint(accelerator, run.output_dir, step, options.checkpoints_keep, state, last_logged)
    progress.close()
    return step


def log_window(run: Run, window: dict[str, list[float]], step: int, seconds: float, accumulation: int) -> float:
    """Log the means of the values gathered since the last log, the learning rate and steps/s; returns the loss."""
    logs = {key: sum(values) / len(values) for key, values in window.items()}
    logs.update(lr=run.state.lr_scheduler.get_last_lr()[0],
                steps_per_s=(len(window["loss"]) / accumulation) / max(seconds, 1e-9))
    run.accelerator.log(logs, step=step)
    return logs["loss"]


def finish(run: Run, step: int) -> Path:
    """Score and export the weights the run chose (``exported_weights``) on the main process."""
    accelerator, tracker = run.accelerator, run.state.validation
    accelerator.wait_for_everyone()
    final = run.output_dir / "model"
    if accelerator.is_main_process:
        unwrapped = run.unwrapped
        with exported_weights(run.state.ema, run.task.params, tracker):  # the EMA, or the best validation step's
            scores = run.task.score(unwrapped)
            accelerator.log(scores, step=step)
            accelerator.print(f"lift3d: final {_scores(scores)}")
            if tracker is not None:
                accelerator.print(f"lift3d: {run.stage.validation_summary(tracker.best, tracker.first)}")
            final = run.task.export(unwrapped)
        accelerator.print(f"lift3d: exported {final}")
    accelerator.end_training()
    return final


def _scores(scores: dict[str, float]) -> str:
    names = {"val_loss": "fixed-volume loss", "val_l1": "fixed-slice L1", "val_psnr": "fixed-slice PSNR (dB)"}
    return ", ".join(f"{names.get(k, k)} {v:.6f}" for k, v in scores.items())


def check_finite(accelerator, loss: Tensor, step: int, output_dir: Path) -> None:
    values = accelerator.gather(loss.detach()[None])
    if not torch.isfinite(values).all():
        found = list_checkpoints(output_dir)
        if found:
            saved = read_trainer_state(found[-1])
            last = saved.last_logged_loss
            kept = (f"the newest checkpoint is {found[-1]} (step {saved.step}, last logged loss "
                    f"{'unknown' if last is None else f'{last:.6g}'}; if that loss was already climbing, resume "
                    "from an older run or restart)")
        else:
            kept = "no checkpoint had been saved yet"
        raise NonFiniteLossError(f"training loss became {values.tolist()} at step {step + 1}; stopped. {kept}. "
                                 "Lower optim.learning_rate, check the data for NaN, or try mixed_precision = 'no'")
