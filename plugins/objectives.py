"""Built-in training objectives, registered as any plugin's would be (:mod:`lift3d.diffusion.objectives`):
``ddpm`` (epsilon or v, Make-A-Volume's eq. 4) and ``flow`` (flow matching / rectified flow)."""

from __future__ import annotations

from lift3d.diffusion.objectives import DDPMObjective, FlowMatchingObjective
from lift3d.plugins import hookimpl


@hookimpl
def lift3d_register_objectives(registry):
    registry.add("ddpm", DDPMObjective)
    registry.add("flow", FlowMatchingObjective)
