"""Noise schedules: the training forward process, and the diffusers samplers built on it."""

from __future__ import annotations

from typing import Any

import torch

from lift3d.io.errors import Lift3dError

SCHEDULERS: dict[str, tuple[str, int]] = {
    "ddpm": ("DDPMScheduler", 1000),
    "ddim": ("DDIMScheduler", 200),
    "dpm": ("DPMSolverMultistepScheduler", 25),
}
"""Sampler name -> (diffusers class, default number of steps). DDIM-200 is the paper's setting."""


def training_scheduler(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float,
                       prediction_type: str):
    """The forward process as LDM configures it (1000 steps, scaled-linear 0.0015..0.0195)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                         beta_end=beta_end, prediction_type=prediction_type, clip_sample=False)


def make_scheduler(name: str, scheduler_config: dict[str, Any], steps: int | None = None, *,
                   device: torch.device | str | None = None, clip_x0: bool = False):
    """The diffusers sampler ``name`` (see :data:`SCHEDULERS`) on the training noise schedule,
    with ``steps`` inference steps (the sampler's default when None). ``clip_x0`` clamps the
    sampler's x0 estimate to [-1, 1] at every step (diffusers' ``thresholding`` at 1.0)."""
    if name not in SCHEDULERS:
        raise Lift3dError(f"Unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
    class_name, default_steps = SCHEDULERS[name]
    steps = default_steps if steps is None else steps
    train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= train_steps:
        raise Lift3dError(f"steps must be an integer from 1 to the {train_steps} training timesteps, got {steps!r}")
    import diffusers

    if clip_x0:  # dynamic thresholding with its ceiling at 1.0 is a plain clamp to [-1, 1]
        scheduler_config = {**scheduler_config, "thresholding": True, "sample_max_value": 1.0}
    scheduler = getattr(diffusers, class_name).from_config(scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    return scheduler
