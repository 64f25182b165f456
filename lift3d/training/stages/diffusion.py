"""What the two diffusion stages of Make-A-Volume (Zhu et al., MICCAI 2023) share: the loss of eq. 4 on
target latents given the source latents, under one objective and noise schedule. ``DiffusionStage`` is
not registered itself; stage 1 (``slices``) and stage 2
(``volumes``) are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from lift3d.diffusion.conditioning import unet_channels
from lift3d.plugins import create
from lift3d.training.data_order import IndexedView, LatentEncoder, draw_noise
from lift3d.training.export import export_model, training_settings
from lift3d.training.losses import diffusion_loss, fixed_volume_loss
from lift3d.training.options import ConfigError, check_groups, show_value
from lift3d.training.sections import ATTENTION_HEAD_DIM, unet2d_arguments
from lift3d.training.sizing import (
    check_schedule_bytes,
    check_training_bytes,
    on_meta,
    parameter_bytes,
    resnet_lower_bound,
)
from lift3d.training.stages.registry import Stage
from lift3d.training.task import Task, check_grid, validation_pairs
from lift3d.training.unets import build_autoencoder, build_objective, build_unet

logger = logging.getLogger("lift3d.training.stages.diffusion")


class DiffusionStage(Stage):
    """A diffusion stage: a U-Net denoises target latents given the source latents (eq. 4), under the
    objective and noise schedule of ``[diffusion]``, in the latents of the frozen autoencoder of ``[autoencoder]``.
    A subclass gives its data view, its default timestep sampler, and how it lifts and trains the U-Net."""

    #: The timestep sampler plugin used when ``diffusion.timestep_sampler`` is empty.
    timestep_sampler: ClassVar[str] = ""

    def check(self, cfg: Any) -> None:
        model, run = cfg.model, cfg.run
        if not model.pretrained:
            check_groups("model", model.block_out_channels, model.norm_num_groups)
            if model.block_out_channels[-1] < ATTENTION_HEAD_DIM:
                raise ConfigError(f"model.block_out_channels = {show_value(model.block_out_channels)} is not allowed; "
                                  f"the last width must be >= {ATTENTION_HEAD_DIM} (diffusers' UNet2DModel gives its "
                                  f"mid-block attention width // {ATTENTION_HEAD_DIM} heads)")
        if run.validate_every and run.validate_steps > cfg.diffusion.num_train_timesteps:
            raise ConfigError(f"run.validate_steps = {run.validate_steps} is more than diffusion.num_train_timesteps "
                              f"= {cfg.diffusion.num_train_timesteps}; a solver takes at most one step per training "
                              "step")

    # The hooks below receive the stage's own section of the config (None for a stage without one).

    def lift(self, own: Any) -> Callable[[nn.Module], None] | None:
        """How the stage lifts a 2D U-Net before training it, or None to train it as it is."""
        return None

    def trained_parameters(self, own: Any, unet: nn.Module) -> list[nn.Parameter]:
        """The U-Net's parameters this stage trains (all of them, unless a subclass says otherwise)."""
        unet.requires_grad_(True)
        return list(unet.parameters())

    def trains_2d_weights(self, own: Any) -> bool:
        """Whether the U-Net's 2D weights train (they get gradients and AdamW moments), for the memory check."""
        return True

    def lifted_memory(self, own: Any, unet: nn.Module, weights: int, what: str) -> tuple[int, int, str]:
        """``(weights, trained, what)`` of the 2D ``unet`` (on the meta device) as this stage trains it."""
        return weights, weights, what

    def memory(self, cfg: Any) -> tuple[int, int, str] | None:
        check_schedule_bytes(cfg.diffusion.num_train_timesteps)
        model = cfg.model
        if model.pretrained:
            return None
        in_channels, _ = unet_channels(1, model.conditioning, model.source_context)
        what = (f"the U-Net of model.block_out_channels = {show_value(model.block_out_channels)}, layers_per_block = "
                f"{model.layers_per_block}" + (f", source_context = {model.source_context}" if model.source_context
                                               else ""))
        bound = 4 * (resnet_lower_bound(model.block_out_channels, model.layers_per_block)
                     + 9 * (in_channels + 1) * model.block_out_channels[0])  # and conv_in, conv_out
        own = self.own(cfg)
        check_training_bytes(bound, bound if self.trains_2d_weights(own) else 0, what + " (at least)", cfg.optim.ema)

        from diffusers import UNet2DModel

        unet = on_meta(lambda: UNet2DModel(**unet2d_arguments(model, in_channels, 1)), what)
        return self.lifted_memory(own, unet, parameter_bytes(unet), what)

    def prepare(self, cfg: Any, dataset, output_dir: Path) -> Callable[[Any], Task]:
        """Build and check everything before the run folder is touched; the loop then calls the returned
        ``make_task(accelerator)``."""
        autoencoder = build_autoencoder(cfg)
        sample_size = dataset[0].source.shape[-1] // autoencoder.downsampling_factor
        unet = build_unet(cfg, autoencoder, sample_size, lift=self.lift(self.own(cfg)))
        levels = len(getattr(getattr(unet, "config", None), "block_out_channels", cfg.model.block_out_channels))
        check_grid(dataset, autoencoder.downsampling_factor * 2 ** (levels - 1),
                   f"autoencoder f = {autoencoder.downsampling_factor} x U-Net downsampling 2^{levels - 1}")
        sampler = create("timestep_samplers", cfg.diffusion.timestep_sampler or self.timestep_sampler)
        val_pairs = validation_pairs(cfg.data, cfg.run.validate_every) if cfg.run.validate_every else None

        def make_task(accelerator) -> Task:
            autoencoder.to(accelerator.device)
            if accelerator.mixed_precision != "no":  # the frozen autoencoder runs in the compute dtype
                autoencoder.to(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
            return self.task(cfg, dataset, autoencoder, unet, sampler, output_dir, accelerator.device, val_pairs)

        return make_task

    def validation_solver(self, cfg: Any) -> tuple[str, int] | None:
        """The solver and steps the sampled validation uses; None: DPM-Solver++ with ``run.validate_steps``."""
        return None

    def step_loss(self, cfg: Any, objective: Any, unet: nn.Module, device) -> Callable[..., torch.Tensor]:
        """The loss of one batch, ``(model, latents, source_latents, noise, timesteps)``: eq. 4 here; another
        diffusion stage (distillation) gives its own."""
        def loss(model, latents, source, noise, timesteps):
            return diffusion_loss(model, objective, latents, source, noise, objective.training_timesteps(timesteps))

        return loss

    def task(self, cfg: Any, dataset, autoencoder, unet: nn.Module, sampler, output_dir: Path, device,
             val_pairs: list | None = None) -> Task:
        """Eq. 4: denoise target latents given the source latents, a timestep per item from ``sampler``."""
        objective = build_objective(cfg)
        model = cfg.model
        encoder = LatentEncoder(autoencoder, cache=cfg.autoencoder.cache_latents, context=model.source_context)
        conditioned = model.conditioning == "concat"
        seed, num_train_timesteps = cfg.run.seed, cfg.diffusion.num_train_timesteps
        step_loss = self.step_loss(cfg, objective, unet, device)

        def loss(model, batch: dict, micro: int):
            latents, source = encoder(batch, device)
            noise, timesteps = draw_noise(latents, batch["index"], micro, seed, sampler, num_train_timesteps)
            return step_loss(model, latents, source if conditioned else None, noise, timesteps), {}

        sampled = None
        if val_pairs:
            from lift3d.training.validation import SampledValidation

            settings = training_settings(cfg, autoencoder, dataset, False, objective, label=self.export_label)
            sampled = SampledValidation(val_pairs, autoencoder, settings, dict(objective.scheduler.config),
                                        cfg.run.validate_steps, device, self.validation_solver(cfg))
        fixed = dataset.volumes(window=cfg.data.window or None, context=model.source_context)
        return Task(unet, self.trained_parameters(self.own(cfg), unet), IndexedView(self.view(cfg, dataset)), loss,
                    lambda unet: {"val_loss": fixed_volume_loss(unet, objective, encoder, fixed, num_train_timesteps,
                                                                conditioned, device)},
                    lambda unet: export_model(cfg, unet, autoencoder, objective, dataset, output_dir,
                                              label=self.export_label), sampled)
