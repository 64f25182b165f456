"""Stage 1 of Make-A-Volume (Zhu et al., MICCAI 2023, sec. 2.2): a 2D U-Net denoises the target latents of
shuffled slices, conditioned on the source latent by channel concatenation, with a timestep per slice."""

from __future__ import annotations

from typing import Any

from lift3d.training.stages.diffusion import DiffusionStage
from lift3d.training.stages.registry import STAGES


@STAGES.register("slices")
class Slices(DiffusionStage):
    """Stage 1: a 2D latent diffusion U-Net trained on single slices (``uniform-slice``: a t per slice)."""

    summary = "stage 1 (2D latent diffusion, t per slice)"
    export_label = "slices"
    timestep_sampler = "uniform-slice"

    def view(self, cfg: Any, dataset) -> Any:
        return dataset.slices(context=cfg.model.source_context)
