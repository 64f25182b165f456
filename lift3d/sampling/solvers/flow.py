"""``flow``: the Euler solver on the straight path of a flow-matching model (``x_s = (1 - s) x_0 + s eps``,
the network predicting the velocity), accurate in a few steps. diffusers' ``FlowMatchEulerDiscreteScheduler``
on the exported schedule (its shift included), on the uniform grid ``s = 1, (N - 1) / N, ..., 1 / N``:
diffusers' own grid ends at ``s = 1 / 1000``, which spends the last of N steps on nothing (2 of its steps
sample as 1 does)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lift3d.diffusion.objectives import euler_sigmas
from lift3d.sampling.solvers.diffusers_scheduler import SchedulerSolver
from lift3d.sampling.solvers.registry import SOLVERS


@SOLVERS.register("flow")
class FlowEulerSolver(SchedulerSolver):
    inverts = {"flow": 4}
    informed_start = True
    summary = "Euler on the straight path"
    revision = 1  # 1: the uniform grid (0: diffusers' grid, its last step at s = 1 / 1000)
    init_noise_sigma = 1.0  # the path starts at pure N(0, 1) noise

    @classmethod
    def scheduler_type(cls) -> type:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    @classmethod
    def set_timesteps(cls, scheduler: Any, steps: int, device: torch.device | str | None) -> None:
        scheduler.set_timesteps(sigmas=euler_sigmas(steps), device=device)

    def scale_model_input(self, sample: Tensor, t: Tensor) -> Tensor:
        return sample  # the velocity network sees the path point as it is

    def noised(self, clean: Tensor, noise: Tensor, begin: int) -> Tensor:
        self.scheduler.set_begin_index(begin)
        t = self.timesteps[begin].reshape(1).expand(clean.shape[0])
        return self.scheduler.scale_noise(clean, t, noise)  # (1 - s) clean + s noise
