"""``ddpm``: ancestral DDPM sampling (Ho et al., NeurIPS 2020), stochastic, 1000 steps by default.
diffusers' ``DDPMScheduler`` on the exported schedule, its step noise drawn from each sample's own generator
and correlated across slices as the run asks."""

from __future__ import annotations

import torch
from torch import Tensor

from lift3d.sampling.noise import StepNoise, correlate_slices
from lift3d.sampling.solvers.diffusers_scheduler import SchedulerSolver
from lift3d.sampling.solvers.registry import SOLVERS


@SOLVERS.register("ddpm")
class DDPMSolver(SchedulerSolver):
    inverts = {"ddpm": 1000}
    stochastic = True
    informed_start = True
    clips_x0 = True
    summary = "ancestral DDPM"

    @classmethod
    def scheduler_type(cls) -> type:
        from diffusers import DDPMScheduler

        return DDPMScheduler

    def step(self, output: Tensor, t: Tensor, sample: Tensor, *, noise: StepNoise) -> Tensor:
        """One DDPM step with sample ``k``'s added noise drawn from ``noise.generators[k]`` (rows
        ``k*b:(k+1)*b`` of the batch), correlated across slices by ``noise.rho``.

        diffusers' ``DDPMScheduler.step`` (0.42) draws its noise inside, from ``generator``, and takes
        no ``variance_noise``. The step is ``mean(x_t, eps) + sigma_t z``, linear in ``z``, and a zero
        input has a zero mean (x0 clipping leaves 0 alone), so the same step on zeros with a copy of
        the generator returns exactly the noise it added, ``sigma_t z``, which is then swapped for
        ``sigma_t correlate_slices(z)``. The step keeps no state, so it may run per sample.
        """
        b = sample.shape[0] // len(noise.generators)
        out = []
        for k, generator in enumerate(noise.generators):
            rows = slice(k * b, (k + 1) * b)
            probe = torch.Generator().set_state(generator.get_state()) if noise.rho else None
            prev = self.scheduler.step(output[rows], t, sample[rows], generator=generator).prev_sample
            if probe is not None:
                added = self.scheduler.step(torch.zeros_like(output[rows]), t, torch.zeros_like(sample[rows]),
                                            generator=probe).prev_sample
                prev = prev - added + correlate_slices(added, noise.rho)
            out.append(prev)
        return out[0] if len(out) == 1 else torch.cat(out)
