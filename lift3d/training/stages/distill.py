"""Distillation: a lifted flow model's few-step sampler distilled into a student of the same lifted
architecture that samples a volume in one or two network passes, in the same loop as every stage.

The teacher is the exported lifted model (``model.pretrained``), frozen; its ODE map ``T`` takes noise ``z``
to ``T(z)`` in ``distill.teacher_steps`` Euler steps; with ``distill.teacher_samples`` K > 1 the target is the
teacher's K-sample mean, ``T(z)`` averaged with K - 1 solves from fresh noise. The student starts as a copy of it. Two families
(``distill.family``):

- ``reflow`` (rectified flow, Liu et al., ICLR 2023): the flow-matching loss on the straight path between
  ``z`` and ``T(z)``, a coupled pair, so that the student's paths become straight and one or two Euler steps
  follow them;
- ``direct`` (knowledge distillation of the sampler, Luhman & Luhman, 2021): the student's own
  ``distill.student_steps``-step Euler solve from ``z`` is regressed onto ``T(z)``.

Either way the student still samples: another ``z`` gives another volume, so ``--samples K`` still gives a
mean and a std map.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lift3d
from lift3d.training.losses import diffusion_loss
from lift3d.training.options import ConfigError, Rule, opt
from lift3d.training.stages.diffusion import DiffusionStage
from lift3d.training.stages.volumes import Volumes
from lift3d.training.stages.registry import STAGES

STEPS = Rule(lambda v: 1 <= v <= 64, "an integer from 1 to 64")
SOLVER = "flow"  # Euler on the straight path: the solver a flow student is sampled with


@dataclass
class DistillConfig:
    """``[distill]``: which family distils the teacher, and how many steps each side takes."""

    family: str = opt("reflow", "reflow: flow matching on the teacher's (noise, volume) pairs; direct: the "
                      "student's own few-step solve regressed onto the teacher's", ("reflow", "direct"))
    teacher_steps: int = opt(4, "Euler steps of the teacher's ODE map", rule=STEPS)
    student_steps: int = opt(1, "direct: the Euler steps the student is trained to sample with", rule=STEPS)
    teacher_samples: int = opt(1, "K: the teacher's target is the mean of K solves, the first from the student's "
                               "noise and the others from fresh noise (the teacher's K-sample mean)",
                               rule=Rule(lambda v: 1 <= v <= 16, "an integer from 1 to 16"))
    trainable: str = opt("all", "train every weight of the student, or its volumetric layers only",
                         ("all", "volumetric"))


def solve(unet: nn.Module, objective: Any, scheduler_config: dict, noise: Tensor, source: Tensor | None,
          steps: int) -> Tensor:
    """The Euler solve of ``unet`` from ``noise`` (``(b, c, n, h, w)`` latents) in ``steps`` steps, with gradients
    wherever ``unet`` has them."""
    from lift3d.diffusion.conditioning import predict
    from lift3d.sampling.noise import StepNoise
    from lift3d.sampling.solvers import build_solver
    from lift3d.sampling.synthesis import run_steps

    solver = build_solver(SOLVER, objective, scheduler_config, steps, device=noise.device)

    def net(x: Tensor, t: Tensor) -> Tensor:
        return predict(unet, solver.scale_model_input(x, t), source, t)

    return run_steps(solver, net, noise * solver.init_noise_sigma, 0, StepNoise([], 0.0))


@STAGES.register("distill")
class Distill(DiffusionStage):
    """A lifted flow model (``model.pretrained``) distilled into a one- or two-step student (``[distill]``)."""

    summary = "distillation of a lifted flow model into a 1-2 step student ([distill]; model.pretrained)"
    section, options = "distill", DistillConfig
    export_label = "distill"
    timestep_sampler = "make-a-volume"

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if not cfg.model.pretrained:
            raise ConfigError("run.stage = 'distill' needs model.pretrained: the lifted flow model to distil")

    view = Volumes.view  # whole volumes, or windows of them, as stage 2
    trained_parameters = Volumes.trained_parameters  # every weight, or the volumetric layers only

    trains_2d_weights = Volumes.trains_2d_weights

    def validation_solver(self, cfg: Any) -> tuple[str, int]:
        """The student is validated as it samples: Euler in ``distill.student_steps`` steps."""
        return SOLVER, self.own(cfg).student_steps

    def step_loss(self, cfg: Any, objective: Any, unet: nn.Module, device) -> Callable:
        """The loss of the chosen family, given latents, source latents, noise and timesteps; the teacher is a
        frozen copy of ``unet`` as loaded."""
        if objective.name != "flow" or not lift3d.is_lifted(unet):
            raise ConfigError(f"run.stage = 'distill' distils a lifted flow model; {cfg.model.pretrained} is "
                              f"{'a lifted' if lift3d.is_lifted(unet) else 'a 2D'} {objective.name!r} model")
        own, config = self.own(cfg), dict(objective.scheduler.config)
        teacher = copy.deepcopy(unet).eval().requires_grad_(False).to(device)

        def loss(student: nn.Module, latents: Tensor, source: Tensor | None, noise: Tensor, t: Tensor) -> Tensor:
            with torch.no_grad():  # the first solve starts from the student's own noise: the pair stays coupled
                noises = [noise] + [torch.randn_like(noise) for _ in range(own.teacher_samples - 1)]
                target = torch.stack([solve(teacher, objective, config, z, source, own.teacher_steps)
                                      for z in noises]).mean(dim=0)
            if own.family == "reflow":  # the straight path from this noise to the teacher's volume
                return diffusion_loss(student, objective, target, source, noise, objective.training_timesteps(t))
            return F.mse_loss(solve(student, objective, config, noise, source, own.student_steps).float(),
                              target.float())

        return loss
