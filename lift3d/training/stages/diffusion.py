"""The diffusion stages of Make-A-Volume (Zhu et al., MICCAI 2023).

Stage 1 (``slices``, sec. 2.2): a 2D U-Net denoises target latents of shuffled slices, conditioned on the
source latent by channel concatenation, with a timestep per slice. Stage 2 (``volumes``, sec. 2.3): the
U-Net is lifted with :func:`lift3d.inflate` and fine-tuned on whole volumes (or windows) with one timestep
per volume (``make-a-volume``: 2T - t).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch


from lift3d.plugins import create
from lift3d.training.config import TrainConfig
from lift3d.training.data_order import IndexedView, LatentEncoder, build_view, draw_noise
from lift3d.training.export import export_model, training_settings
from lift3d.training.losses import diffusion_loss, fixed_volume_loss
from lift3d.training.task import Task, check_grid, validation_pairs
from lift3d.training.unets import build_autoencoder, build_objective, build_unet, trainable_parameters

logger = logging.getLogger("lift3d.training.stages.diffusion")


def diffusion_task(cfg: TrainConfig, dataset, autoencoder, unet, sampler, output_dir: Path, device,
                   val_pairs: list | None = None) -> Task:
    """Stages 1 and 2 (eq. 4): denoise target latents given the source latents."""
    objective = build_objective(cfg)
    encoder = LatentEncoder(autoencoder, cache=cfg.autoencoder.cache_latents, context=cfg.model.source_context)
    conditioning = cfg.model.conditioning == "concat"

    def loss(model, batch: dict, micro: int):
        latents, source = encoder(batch, device)
        noise, timesteps = draw_noise(latents, batch["index"], micro, cfg.run.seed, sampler,
                                      cfg.diffusion.num_train_timesteps)
        timesteps = objective.training_timesteps(timesteps)
        return diffusion_loss(model, objective, latents, source if conditioning else None, noise, timesteps), {}

    sampled = None
    if val_pairs:
        from lift3d.training.validation import SampledValidation

        sampled = SampledValidation(val_pairs, autoencoder, training_settings(cfg, autoencoder, dataset, False, objective),
                                    dict(objective.scheduler.config), cfg.run.validate_steps, device)
    return Task(unet, trainable_parameters(cfg, unet), IndexedView(build_view(cfg, dataset)), loss,
                lambda model: {"val_loss": fixed_volume_loss(model, objective, encoder, dataset, cfg, device)},
                lambda model: export_model(cfg, model, autoencoder, objective, dataset, output_dir), sampled)


def prepare(cfg: TrainConfig, dataset, output_dir: Path) -> Callable[[Any], Task]:
    """Build and check everything of a diffusion stage before the run folder is touched; the loop then
    calls the returned ``make_task(accelerator)``."""
    autoencoder = build_autoencoder(cfg)
    sample_size = dataset[0].source.shape[-1] // autoencoder.downsampling_factor
    unet = build_unet(cfg, autoencoder, sample_size)
    levels = len(getattr(getattr(unet, "config", None), "block_out_channels", cfg.model.block_out_channels))
    check_grid(dataset, autoencoder.downsampling_factor * 2 ** (levels - 1),
               f"autoencoder f = {autoencoder.downsampling_factor} x U-Net downsampling 2^{levels - 1}")
    sampler_name = cfg.diffusion.timestep_sampler or ("uniform-slice" if cfg.run.stage == "slices" else "make-a-volume")
    sampler = create("timestep_samplers", sampler_name)
    val_pairs = validation_pairs(cfg) if cfg.run.validate_every else None

    def make_task(accelerator) -> Task:
        autoencoder.to(accelerator.device)
        if accelerator.mixed_precision != "no":  # the frozen autoencoder runs in the compute dtype
            autoencoder.to(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
        return diffusion_task(cfg, dataset, autoencoder, unet, sampler, output_dir, accelerator.device, val_pairs)

    return make_task
