"""``dpm``: DPM-Solver++ (Lu et al., 2022), second-order multistep, accurate in a few steps. diffusers'
``DPMSolverMultistepScheduler``: on the exported DDPM schedule for a ``ddpm`` model, on flow sigmas with the
velocity as ``flow_prediction`` for a model trained on a straight path (``flow``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lift3d.sampling.solvers.diffusers_scheduler import SchedulerSolver
from lift3d.sampling.solvers.registry import SOLVERS


@SOLVERS.register("dpm")
class DPMSolver(SchedulerSolver):
    inverts = {"ddpm": 25, "flow": 8}
    informed_start = True
    clips_x0 = True
    summary = "DPM-Solver++, second-order multistep"

    @classmethod
    def scheduler_type(cls) -> type:
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler

    @classmethod
    def scheduler_config(cls, objective: Any, scheduler_config: dict[str, Any]) -> dict[str, Any]:
        if objective.prediction_type != "flow_prediction":
            return scheduler_config
        # the same straight path as the objective's: diffusers' flow sigmas, shifted as it shifts them
        return {"num_train_timesteps": objective.num_train_timesteps, "use_flow_sigmas": True,
                "flow_shift": objective.shift, "prediction_type": "flow_prediction",
                "algorithm_type": "dpmsolver++", "solver_order": 2}

    def noised(self, clean: Tensor, noise: Tensor, begin: int) -> Tensor:
        self.scheduler.set_begin_index(begin)  # a multistep solver starts its history there
        return super().noised(clean, noise, begin)
