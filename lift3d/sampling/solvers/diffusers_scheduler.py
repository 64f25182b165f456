"""A solver implemented by a diffusers scheduler: the scheduler built from the model's exported noise schedule,
stepped through the one ``Solver`` contract. Registers nothing itself."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lift3d.sampling.solvers.registry import Solver


class SchedulerSolver(Solver):
    """Wraps one diffusers scheduler instance. A subclass names its class (``scheduler_type``, imported
    there so that listing solvers does not import diffusers) and, if it needs to, the config it is built from
    (``scheduler_config``)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps

    @classmethod
    def scheduler_type(cls) -> type:
        raise NotImplementedError

    @classmethod
    def scheduler_config(cls, objective: Any, scheduler_config: dict[str, Any]) -> dict[str, Any]:
        """The config the scheduler is built from: by default the exported noise schedule itself."""
        return scheduler_config

    @classmethod
    def build(cls, objective: Any, scheduler_config: dict[str, Any], steps: int, *,
              device: torch.device | str | None = None, clip_x0: bool = False) -> "SchedulerSolver":
        config = cls.scheduler_config(objective, scheduler_config)
        if clip_x0:  # dynamic thresholding with its ceiling at 1.0 is a plain clamp to [-1, 1]
            config = {**config, "thresholding": True, "sample_max_value": 1.0}
        scheduler = cls.scheduler_type().from_config(config)
        cls.set_timesteps(scheduler, steps, device)
        return cls(scheduler)

    @classmethod
    def set_timesteps(cls, scheduler: Any, steps: int, device: torch.device | str | None) -> None:
        """The scheduler's grid of ``steps`` steps: by default its own."""
        scheduler.set_timesteps(steps, device=device)

    @property
    def init_noise_sigma(self) -> float:
        return self.scheduler.init_noise_sigma

    def scale_model_input(self, sample: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.scale_model_input(sample, t)

    def step(self, output: Tensor, t: Tensor, sample: Tensor) -> Tensor:
        return self.scheduler.step(output, t, sample).prev_sample

    def noised(self, clean: Tensor, noise: Tensor, begin: int) -> Tensor:
        return self.scheduler.add_noise(clean, noise, self.timesteps[begin].reshape(1).expand(clean.shape[0]))
