"""Stage 2 of Make-A-Volume (Zhu et al., MICCAI 2023, sec. 2.3): the stage-1 U-Net is lifted with
``lift3d.inflate`` (volumetric layers, the identity at initialisation) and fine-tuned on whole volumes,
or windows of them, with one timestep per volume drawn with weight 2T - t (``make-a-volume``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

import lift3d
from lift3d.lifting.placement import PRESETS
from lift3d.training.options import ODD, opt, show_value
from lift3d.training.sizing import on_meta, parameter_bytes
from lift3d.training.stages.diffusion import DiffusionStage
from lift3d.training.stages.registry import STAGES


@dataclass
class LiftConfig:
    """``[lift]``: how stage 2 lifts the U-Net, and what of it trains."""

    kind: str = opt("", "kind of volumetric layer (lift3d.layers.registry; e.g. full, low-rank, depthwise, "
                    "slice-attention); empty = lift3d.lifting.inflate's default")
    options: dict = opt({}, "options of the layer kind, e.g. {rank = 16} for low-rank or {heads = 4}")
    kernel_size: int = opt(3, "odd kernel size of the volumetric 1D convs", rule=ODD)
    where: str = opt("auto", "placement of the volumetric layers: auto = resnet where the model has residual "
                     "blocks, else every spatial conv (lift3d.lifting.placement.PRESETS)", tuple(PRESETS))
    recompute: bool = opt(False, "recompute the volumetric layers' inputs in backward instead of keeping them "
                          "(less training memory)")
    padding_mode: str = opt("zeros", "border handling along the slice axis", ("zeros", "replicate"))
    trainable: str = opt("volumetric", "stage 2: train the volumetric layers only, or everything",
                         ("volumetric", "all"))


@STAGES.register("volumes")
class Volumes(DiffusionStage):
    """Stage 2: inflate the U-Net, then fine-tune it on volumes (``make-a-volume``: a t per volume)."""

    summary = "stage 2 (inflate, then fine-tune on volumes, t per volume; [lift])"
    section, options = "lift", LiftConfig
    export_label = "volumes"
    timestep_sampler = "make-a-volume"

    def view(self, cfg: Any, dataset) -> Any:
        return dataset.volumes(window=cfg.data.window or None, context=cfg.model.source_context)

    def lift(self, options: LiftConfig) -> Callable[[nn.Module], None]:
        return lambda unet: lift3d.inflate(unet, options.kind or None, kernel_size=options.kernel_size,
                                           where=options.where, padding_mode=options.padding_mode,
                                           recompute=options.recompute, **options.options)

    def trained_parameters(self, options: LiftConfig, unet: nn.Module) -> list[nn.Parameter]:
        lift3d.set_trainable(unet, options.trainable)
        return [p for p in unet.parameters() if p.requires_grad]

    def trains_2d_weights(self, options: LiftConfig) -> bool:
        return options.trainable == "all"

    def lifted_memory(self, options: LiftConfig, unet: nn.Module, weights: int, what: str) -> tuple[int, int, str]:
        what += (f", lifted with lift.kind = {options.kind or 'default'!r}, lift.kernel_size = {options.kernel_size}"
                 + (f", lift.options = {show_value(options.options)}" if options.options else ""))
        on_meta(lambda: self.lift(options)(unet), what)
        lifted = parameter_bytes(unet) - weights
        return weights + lifted, weights + lifted if self.trains_2d_weights(options) else lifted, what

    def validation_summary(self, best: Any, first: dict[str, float] | None) -> str:
        """Step 0 is the stage-1 model itself (lifting is the identity at initialisation): say whether
        stage 2 beat it."""
        from lift3d.training.validation import SELECTION_METRIC

        line = super().validation_summary(best, first)
        if first is None:
            return line
        key = f"val_{SELECTION_METRIC}"
        if best.step == 0:
            return (f"no stage-2 step beat the stage-1 model on validation (stage 1: {SELECTION_METRIC} "
                    f"{first[key]:.4g}); exporting the stage-1 weights, lifted at identity")
        return line + f" (stage 1: {SELECTION_METRIC} {first[key]:.4g})"
