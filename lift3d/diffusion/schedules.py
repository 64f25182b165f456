"""Samplers: the diffusers scheduler that inverts a model's training objective, on its exported noise schedule."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from lift3d.io.errors import Lift3dError

SCHEDULERS: dict[str, tuple[str, int]] = {
    "ddpm": ("DDPMScheduler", 1000),
    "ddim": ("DDIMScheduler", 200),
    "dpm": ("DPMSolverMultistepScheduler", 25),
    "flow": ("FlowMatchEulerDiscreteScheduler", 4),
}
"""Every built-in sampler name -> (diffusers class, default number of steps). DDIM-200 is the paper's setting;
``flow`` (Euler on the straight path) is for ``flow`` models, ``dpm`` serves both objectives. Which names a model
takes, and their defaults for it, are its objective's ``samplers``."""


def make_scheduler(name: str, scheduler_config: dict[str, Any], steps: int | None = None, *,
                   device: torch.device | str | None = None, clip_x0: bool = False, objective=None):
    """The diffusers sampler ``name`` for a model trained with ``objective`` (an ``objectives`` plugin; None:
    ``ddpm`` on ``scheduler_config``), with ``steps`` inference steps (the sampler's default when None).
    ``clip_x0`` clamps the sampler's x0 estimate to [-1, 1] at every step (diffusers' ``thresholding``
    at 1.0; DDPM-family samplers only)."""
    if objective is None:
        from lift3d.diffusion.objectives import build_objective

        objective = build_objective("ddpm", scheduler_config)
    if name not in objective.samplers:
        raise Lift3dError(f"scheduler {name!r} does not sample a model trained with the {objective.name!r} objective; "
                          f"valid: {', '.join(objective.samplers)}")
    class_name, config = objective.sampler_config(name, scheduler_config)
    default_steps = objective.samplers[name][1]
    steps = default_steps if steps is None else steps
    train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= train_steps:
        raise Lift3dError(f"steps must be an integer from 1 to the {train_steps} training timesteps, got {steps!r}")
    import diffusers

    if clip_x0:
        if "thresholding" not in inspect.signature(getattr(diffusers, class_name)).parameters:
            raise Lift3dError(f"clip_x0 (--clip-x0) is for the DDPM-family samplers (ddpm, ddim, dpm on a ddpm "
                              f"model); scheduler {name!r} of the {objective.name!r} objective has no x0 clipping")
        # dynamic thresholding with its ceiling at 1.0 is a plain clamp to [-1, 1]
        config = {**config, "thresholding": True, "sample_max_value": 1.0}
    scheduler = getattr(diffusers, class_name).from_config(config)
    scheduler.set_timesteps(steps, device=device)
    return scheduler
