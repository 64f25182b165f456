"""One training loop for both stages of Make-A-Volume (Zhu et al., MICCAI 2023), wired with Accelerate.

Stage 1 (``run.stage = "slices"``, sec. 2.2): a 2D U-Net denoises target latents of shuffled slices,
conditioned on the source latent by channel concatenation, with a timestep per slice.
Stage 2 (``run.stage = "volumes"``, sec. 2.3): the U-Net is lifted with :func:`lift3d.lifting.inflate` and
fine-tuned on whole volumes (or windows) with one timestep per volume (``make-a-volume``: 2T - t).
The loss is eq. 4 (MSE on epsilon; v-prediction optional) under a diffusers ``DDPMScheduler``.

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
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lift3d.data.dataset import stack_items
from lift3d.io.errors import Lift3dError
from lift3d.io.writing import RunLock
from lift3d.lifting.checkpoint import CheckpointError
from lift3d.plugins import create
from lift3d.training.checkpoints import TrainingState, check_outside_inputs, claim_run_folder, list_checkpoints, previous_work, resolve_resume, save_checkpoint
from lift3d.training.config import TrainConfig, validate
from lift3d.training.data_order import BatchPlan, PlannedBatches
from lift3d.training.memory import check_memory
from lift3d.training.stages import STAGES
from lift3d.training.state import TRAINER_STATE, load_training_state, load_validation_state, read_trainer_state
from lift3d.training.task import Task
from lift3d.training.tracking import check_tracker, drop_rows_after

logger = logging.getLogger("lift3d.training.loop")



class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or inf; training stopped, the checkpoints already written were kept."""


# --------------------------------------------------------------------------------------------
# Building the pieces


# --------------------------------------------------------------------------------------------
# Data order and per-item randomness


# --------------------------------------------------------------------------------------------
# The loss (eq. 4)


# --------------------------------------------------------------------------------------------
# Checkpoints


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


# --------------------------------------------------------------------------------------------
# Export


# --------------------------------------------------------------------------------------------
# Validation loss on fixed volumes (the same noise for every model, so stages compare exactly)


# --------------------------------------------------------------------------------------------
# The loop


def make_accelerator(cfg: TrainConfig, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from accelerate.state import AcceleratorState

    from lift3d.training.tracking import CSVTracker

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Accelerate's state is a process-wide singleton; a second run in one process (the demo's
        # stage 2 after stage 1, or a notebook) may use other settings.
        AcceleratorState._reset_state(reset_partial_state=True)
    trackers: Any = None
    if cfg.run.tracker == "csv":
        trackers = [CSVTracker("logs", output_dir)]
    elif cfg.run.tracker == "tensorboard":
        trackers = "tensorboard"
    # Without a GPU, cpu=True lets a torchrun-style launch (accelerate launch --multi_gpu) use gloo.
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.optim.mixed_precision,
                       gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps, log_with=trackers,
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

    validate(cfg)
    check_memory(cfg)
    check_run_options(cfg)
    output_dir = Path(cfg.run.output_dir)
    check_outside_inputs(cfg, output_dir)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    set_seed(cfg.run.seed)
    dataset = create("datasets", cfg.data.dataset, split="train", **cfg.data.options)
    make_task = STAGES[cfg.run.stage](cfg, dataset, output_dir)
    resume_from = resolve_resume(cfg, output_dir)
    if not getattr(cfg.run, "overwrite", False) and previous_work(output_dir, resume_from):
        claim_run_folder(cfg, output_dir, resume_from)  # refused before the folder is touched

    created = not output_dir.exists()
    # The run holds its folder from here to the end: a second run into it is refused, naming this one's PID.
    # Of a multi-process run, the main process holds it (the others meet it when Accelerate starts).
    main_process = os.environ.get("RANK", "0") == "0"
    with RunLock(output_dir) if main_process else contextlib.nullcontext():
        try:
            if main_process:
                claim_run_folder(cfg, output_dir, resume_from)  # again, now that no other run can write there
            return _train(cfg, make_task, output_dir, resume_from)
        except Exception as exc:
            if created and not isinstance(exc, NonFiniteLossError) and not list_checkpoints(output_dir):
                shutil.rmtree(output_dir, ignore_errors=True)
            raise


def _train(cfg: TrainConfig, make_task: Callable[[Any], Task], output_dir: Path,
           resume_from: Path | None) -> Path:
    from diffusers.optimization import get_scheduler

    accelerator = make_accelerator(cfg, output_dir)
    device = accelerator.device
    task = make_task(accelerator)
    task.model.to(device)
    params = task.params
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay)
    lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=cfg.run.max_steps)
    ema = None
    if cfg.optim.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.optim.ema_decay)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    state = TrainingState(model, optimizer, lr_scheduler, ema, accelerator.scaler)

    step = 0
    if resume_from is not None:
        step = load_training_state(resume_from, model=accelerator.unwrap_model(model), optimizer=optimizer,
                                   lr_scheduler=lr_scheduler, ema=ema, scaler=accelerator.scaler,
                                   process_index=accelerator.process_index, max_steps=cfg.run.max_steps)
        accelerator.print(f"lift3d: resumed from {resume_from} at step {step}")

    plan = BatchPlan(len(task.view), cfg.data.batch_size, accelerator.num_processes, accelerator.process_index,
                     cfg.run.seed)
    accum = cfg.optim.gradient_accumulation_steps
    remaining = max(cfg.run.max_steps - step, 0) * accum
    # Its own generator: a DataLoader's iterator otherwise draws its base seed from the global RNG,
    # which a resumed run restores before the iterator exists and an uninterrupted one after.
    loader = torch.utils.data.DataLoader(task.view, batch_sampler=PlannedBatches(plan, step * accum, remaining),
                                         collate_fn=stack_items, num_workers=cfg.data.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.run.seed))

    log_file = output_dir / "logs" / "metrics.csv"
    if accelerator.is_main_process and log_file.is_file():
        # A fresh run in an old folder starts a fresh log; a resumed run drops the rows logged after
        # its checkpoint (they are logged again), then appends.
        drop_rows_after(log_file, step if resume_from is not None else -1)
    accelerator.init_trackers("logs", config={k: json.dumps(v) for k, v in cfg.to_dict().items()})
    if step == 0:
        scores = task.validate(accelerator.unwrap_model(model))
        accelerator.log(scores, step=0)
        accelerator.print(f"lift3d: stage {cfg.run.stage!r} on {accelerator.num_processes} process(es), "
                          f"{accelerator.device}; initial {_scores(scores)}")
    # Sampled validation runs on the main process only; the others wait at the next all-reduce.
    tracker = ValidationTracker(task.sampled, accelerator.unwrap_model(model), params, ema, cfg.run.validate_every) \
        if task.sampled is not None and accelerator.is_main_process else None
    state.validation = tracker
    if tracker is not None:
        if resume_from is not None:
            tracker.restore(resume_from)
        else:
            accelerator.log(tracker.score(step), step=step)
    progress = tqdm(total=cfg.run.max_steps, initial=step, desc=f"stage {cfg.run.stage}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    model.train()
    window: dict[str, list[float]] = {}
    last_logged: float | None = None
    tic = time.perf_counter()
    micro = step * accum
    for batch in loader:
        with accelerator.accumulate(model):
            loss, extra = task.loss(model, batch, micro)
            check_finite(accelerator, loss, step, output_dir)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        for key, value in {"loss": loss, **extra}.items():
            window.setdefault(key, []).append(float(accelerator.gather(value.detach().float()[None]).mean()))
        if not accelerator.sync_gradients:
            continue
        lr_scheduler.step()
        if ema is not None:
            ema.step(params)
        step += 1
        progress.update(1)
        if step % cfg.run.log_every == 0 or step == cfg.run.max_steps:
            elapsed = time.perf_counter() - tic
            logs = {key: sum(values) / len(values) for key, values in window.items()}
            last_logged = logs["loss"]
            logs.update(lr=lr_scheduler.get_last_lr()[0],
                        steps_per_s=(len(window["loss"]) / accum) / max(elapsed, 1e-9))
            accelerator.log(logs, step=step)
            progress.set_postfix(loss=f"{last_logged:.4f}")
            window, tic = {}, time.perf_counter()
        if tracker is not None and (step % cfg.run.validate_every == 0 or step == cfg.run.max_steps):
            accelerator.log(tracker.score(step), step=step)
        if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
            check_weights_finite(params, step)
            save_checkpoint(accelerator, output_dir, step, cfg.run.checkpoints_keep, state, last_logged)
    progress.close()

    accelerator.wait_for_everyone()
    final = output_dir / "model"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with exported_weights(ema, params, tracker):  # the EMA, or the best validation step's weights
            scores = task.validate(unwrapped)
            accelerator.log(scores, step=step)
            accelerator.print(f"lift3d: final {_scores(scores)}")
            if tracker is not None:
                accelerator.print(f"lift3d: {tracker.summary(cfg.run.stage)}")
            final = task.export(unwrapped)
        accelerator.print(f"lift3d: exported {final}")
    accelerator.end_training()
    return final


class ValidationTracker:
    """Sampled validation during the loop (:mod:`lift3d.training.validation`): scores, and the best step kept."""

    def __init__(self, sampled, unet: nn.Module, params: list[nn.Parameter], ema, every: int) -> None:
        self.sampled, self.unet, self.params, self.ema, self.every = sampled, unet, params, ema, every
        self.names = [n for n, p in unet.named_parameters() if p.requires_grad]
        self.best = None
        self.first: dict[str, float] | None = None

    def score(self, step: int) -> dict[str, float]:
        from lift3d.training.validation import Best, better, snapshot

        with exported_weights(self.ema, self.params):
            scores = self.sampled.score(self.unet)
            if better(scores, self.best):
                self.best = Best(step, scores, snapshot(self.params, self.names))
        if step == 0:
            self.first = scores
        return scores

    def summary(self, stage: str) -> str:
        from lift3d.training.validation import summary_line

        return summary_line(self.best, self.first, stage)

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.best.weights, {"step": self.best.step, "scores": self.best.scores, "first": self.first}

    def restore(self, folder: Path) -> None:
        from lift3d.training.validation import SELECTION_METRIC, Best

        weights, info = load_validation_state(folder, dict(zip(self.names, self.params)))
        if info is None:
            raise CheckpointError(f"checkpoint {folder} holds no validation state, but this run has "
                                  f"run.validate_every = {self.every}; resume with the setting it was saved with")
        key = f"val_{SELECTION_METRIC}"
        if key not in info["scores"] or (info["first"] is not None and key not in info["first"]):
            raise CheckpointError(f"{folder / TRAINER_STATE}: its validation scores hold no {key}")
        self.best, self.first = Best(info["step"], info["scores"], weights), info["first"]


@contextlib.contextmanager
def exported_weights(ema, params: list[nn.Parameter], tracker: ValidationTracker | None = None):
    """Within: the weights that are scored and exported (EMA if on; the best validation step's if
    sampled validation ran). Afterwards the live training weights are back."""
    stored = [p.detach().clone() for p in params] if (ema is not None or tracker is not None) else None
    if ema is not None:
        ema.copy_to(params)
    if tracker is not None and tracker.best is not None:
        with torch.no_grad():
            for p, name in zip(params, tracker.names):
                p.copy_(tracker.best.weights[name].to(p.device, p.dtype))
    try:
        yield
    finally:
        if stored is not None:
            with torch.no_grad():
                for p, value in zip(params, stored):
                    p.copy_(value)


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
