"""Sampled validation inside training: synthesise held-out volumes with a fast solver and score them.

The fixed-volume loss that training logs does not rank models the way sampled volumes do (a lower
loss can still sample worse), so stages 1 and 2 can score held-out *validation* subjects every
``run.validate_every`` steps: DPM-Solver++ with ``run.validate_steps`` steps and a fixed seed, then
PSNR, SSIM, MAE and z-inconsistency (``lift3d.evaluation.metrics``, inside the subject's mask when the
dataset gives one). The run keeps the weights of the step with the best validation PSNR and exports
those. In stage 2 step 0 is the stage-1 model itself (lifting is the identity at initialisation), so
a stage 2 that never beats its stage-1 model says so (``lift3d.training.stages.volumes``), and exports
the stage-1 weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lift3d.evaluation.metrics import score_pair, summarize

SELECTION_METRIC = "psnr"
VALIDATION_SEED = 4321


@dataclass
class Best:
    """The best validation score so far: its step, scores and the trained weights at that step."""

    step: int
    scores: dict[str, float]
    weights: dict[str, torch.Tensor] = field(repr=False)


class SampledValidation:
    """Scores a U-Net by sampling ``pairs`` (held-out ``VolumePair``)."""

    def __init__(self, pairs: list, autoencoder, settings: dict[str, Any], scheduler_config: dict[str, Any],
                 steps: int, device, solver: tuple[str, int] | None = None) -> None:
        if not pairs:
            raise ValueError("sampled validation needs at least one validation volume; the dataset's 'val' split is "
                             "empty (give the dataset val subjects, or set run.validate_every = 0)")
        self.pairs, self.autoencoder, self.settings = pairs, autoencoder, settings
        self.scheduler_config, self.steps, self.device = scheduler_config, steps, device
        self.solver = solver  # (name, steps) a stage samples its model with, e.g. a distilled student's

    @torch.no_grad()
    def score(self, unet: nn.Module) -> dict[str, float]:
        from lift3d.sampling.synthesis import SynthesisModel, synthesize

        was_training = unet.training
        unet.eval()
        model = SynthesisModel(unet, self.autoencoder, self.settings, self.scheduler_config)
        # A model trained for an N-step solver (objective option train_steps) is validated with that solver.
        matched = (model.settings.objective_options or {}).get("train_steps")
        solver, steps = (model.objective.default_solver, matched) if matched else ("dpm", self.steps)
        if self.solver is not None:
            solver, steps = self.solver
        rows = []
        for pair in self.pairs:
            source = pair.source[None].to(self.device)
            pred = synthesize(model, source, solver=solver, steps=steps, seed=VALIDATION_SEED, progress=False)
            rows.append(score_pair(pred[0, 0].float().cpu().numpy(), pair))
        unet.train(was_training)
        return {f"val_{k}": v["mean"] for k, v in summarize(rows).items()}


def better(scores: dict[str, float], best: Best | None) -> bool:
    key = f"val_{SELECTION_METRIC}"
    return best is None or scores[key] > best.scores[key]


def snapshot(params: list[nn.Parameter], names: list[str]) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in zip(names, params)}


def summary_line(best: Best) -> str:
    """What the run tells the user at the end about its validation (a stage may add to it:
    ``lift3d.training.stages.Stage.validation_summary``)."""
    scores = ", ".join(f"{k[4:]} {v:.4g}" for k, v in best.scores.items())
    return f"best validation {SELECTION_METRIC} at step {best.step} ({scores}); exporting that step's weights"
