"""``flow``: the Euler solver on the straight path of a flow-matching model (``x_s = (1 - s) x_0 + s eps``,
the network predicting the velocity), accurate in a few steps. diffusers' ``FlowMatchEulerDiscreteScheduler``
on the exported schedule (its shift included)."""

from __future__ import annotations

from torch import Tensor

from lift3d.sampling.solvers.diffusers_scheduler import SchedulerSolver
from lift3d.sampling.solvers.registry import SOLVERS


@SOLVERS.register("flow")
class FlowEulerSolver(SchedulerSolver):
    inverts = {"flow": 4}
    informed_start = True
    summary = "Euler on the straight path"
    init_noise_sigma = 1.0  # the path starts at pure N(0, 1) noise

    @classmethod
    def scheduler_type(cls) -> type:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def scale_model_input(self, sample: Tensor, t: Tensor) -> Tensor:
        return sample  # the velocity network sees the path point as it is

    def noised(self, clean: Tensor, noise: Tensor, begin: int) -> Tensor:
        self.scheduler.set_begin_index(begin)
        t = self.timesteps[begin].reshape(1).expand(clean.shape[0])
        return self.scheduler.scale_noise(clean, t, noise)  # (1 - s) clean + s noise
