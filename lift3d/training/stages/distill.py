"""Distillation: a lifted flow model's few-step sampler distilled into a student of the same lifted
architecture that samples a volume in one or two network passes, in the same loop as every stage.

The teacher is the exported lifted model (``model.pretrained``), frozen; its ODE map ``T`` takes noise ``z``
to ``T(z)`` in ``distill.teacher_steps`` Euler steps. The student starts as a copy of it. Two families
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
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lift3d
from lift3d.training.data_order import IndexedView, LatentEncoder, draw_noise
from lift3d.training.export import export_model, training_settings
from lift3d.training.losses import diffusion_loss, fixed_volume_loss
from lift3d.training.options import ConfigError, Rule, opt
from lift3d.training.stages.diffusion import DiffusionStage
from lift3d.training.stages.registry import STAGES
from lift3d.training.task import Task
from lift3d.training.unets import build_objective

STEPS = Rule(lambda v: 1 <= v <= 64, "an integer from 1 to 64")
SOLVER = "flow"  # Euler on the straight path: the solver a flow student is sampled with


@dataclass
class DistillConfig:
    """``[distill]``: which family distils the teacher, and how many steps each side takes."""

    family: str = opt("reflow", "reflow: flow matching on the teacher's (noise, volume) pairs; direct: the "
                      "student's own few-step solve regressed onto the teacher's", ("reflow", "direct"))
    teacher_steps: int = opt(4, "Euler steps of the teacher's ODE map", rule=STEPS)
    student_steps: int = opt(1, "direct: the Euler steps the student is trained to sample with", rule=STEPS)
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

    def view(self, cfg: Any, dataset) -> Any:
        return dataset.volumes(window=cfg.data.window or None, context=cfg.model.source_context)

    def trained_parameters(self, own: DistillConfig, unet: nn.Module) -> list[nn.Parameter]:
        lift3d.set_trainable(unet, own.trainable)
        return [p for p in unet.parameters() if p.requires_grad]

    def trains_2d_weights(self, own: DistillConfig) -> bool:
        return own.trainable == "all"

    def distill_loss(self, own: DistillConfig, objective: Any, teacher: nn.Module) -> Callable:
        """The loss of the chosen family, given latents, source latents, noise and timesteps."""
        config = dict(objective.scheduler.config)

        def loss(student: nn.Module, latents: Tensor, source: Tensor | None, noise: Tensor, t: Tensor) -> Tensor:
            with torch.no_grad():
                target = solve(teacher, objective, config, noise, source, own.teacher_steps)
            if own.family == "reflow":  # the straight path from this noise to the teacher's volume
                return diffusion_loss(student, objective, target, source, noise, objective.training_timesteps(t))
            return F.mse_loss(solve(student, objective, config, noise, source, own.student_steps).float(),
                              target.float())

        return loss

    def task(self, cfg: Any, dataset, autoencoder, unet: nn.Module, sampler, output_dir: Path, device,
             val_pairs: list | None = None) -> Task:
        objective = build_objective(cfg)
        if objective.name != "flow" or not lift3d.is_lifted(unet):
            raise ConfigError(f"run.stage = 'distill' distils a lifted flow model; {cfg.model.pretrained} is "
                              f"{'a lifted' if lift3d.is_lifted(unet) else 'a 2D'} {objective.name!r} model")
        own, model = self.own(cfg), cfg.model
        teacher = copy.deepcopy(unet).eval().requires_grad_(False).to(device)
        encoder = LatentEncoder(autoencoder, cache=cfg.autoencoder.cache_latents, context=model.source_context)
        conditioned = model.conditioning == "concat"
        distill = self.distill_loss(own, objective, teacher)

        def loss(student, batch: dict, micro: int):
            latents, source = encoder(batch, device)
            noise, t = draw_noise(latents, batch["index"], micro, cfg.run.seed, sampler,
                                  cfg.diffusion.num_train_timesteps)
            return distill(student, latents, source if conditioned else None, noise, t), {}

        sampled = None
        if val_pairs:
            from lift3d.training.validation import SampledValidation

            settings = training_settings(cfg, autoencoder, dataset, False, objective, label=self.export_label)
            sampled = SampledValidation(val_pairs, autoencoder, settings, dict(objective.scheduler.config),
                                        cfg.run.validate_steps, device)
        fixed = dataset.volumes(window=cfg.data.window or None, context=model.source_context)
        return Task(unet, self.trained_parameters(own, unet), IndexedView(self.view(cfg, dataset)), loss,
                    lambda net: {"val_loss": fixed_volume_loss(net, objective, encoder, fixed,
                                                               cfg.diffusion.num_train_timesteps, conditioned, device)},
                    lambda net: export_model(cfg, net, autoencoder, objective, dataset, output_dir,
                                             label=self.export_label), sampled)
