"""``ddim``: DDIM (Song et al., ICLR 2021) with eta = 0, deterministic; the paper's solver, 200 steps
(Make-A-Volume, sec. 3). diffusers' ``DDIMScheduler`` on the exported DDPM schedule."""

from __future__ import annotations

from lift3d.sampling.solvers.diffusers_scheduler import SchedulerSolver
from lift3d.sampling.solvers.registry import SOLVERS


@SOLVERS.register("ddim")
class DDIMSolver(SchedulerSolver):
    inverts = {"ddpm": 200}
    informed_start = True
    clips_x0 = True
    summary = "DDIM, the paper's"

    @classmethod
    def scheduler_type(cls) -> type:
        from diffusers import DDIMScheduler

        return DDIMScheduler
