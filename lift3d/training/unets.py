"""The networks a diffusion stage trains, built from the shared sections of the config: the noise schedule,
the frozen autoencoder and a new or pretrained 2D U-Net (the stage lifts it where it trains volumes)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from torch import nn

import lift3d
from lift3d.diffusion.conditioning import unet_channels
from lift3d.diffusion.export import TRAINING_SETTINGS, read_training_settings
from lift3d.diffusion.objectives import create_objective, objective_name
from lift3d.lifting.checkpoint import SETTINGS_FILE, load_lifted, load_unet2d
from lift3d.plugins import create
from lift3d.training.sections import DiffusionConfig, ModelConfig, SharedSections, unet2d_arguments

logger = logging.getLogger("lift3d.training.unets")


def build_objective(cfg: SharedSections):
    """The training objective of ``cfg`` (an ``objectives`` plugin, ``lift3d.diffusion.objectives``) on its
    noise schedule; ``ddpm`` unless ``diffusion.objective`` (or, in stage 2, the pretrained export) says otherwise."""
    d = cfg.diffusion
    schedule = {"num_train_timesteps": d.num_train_timesteps, "beta_schedule": d.beta_schedule,
                "beta_start": d.beta_start, "beta_end": d.beta_end, "prediction_type": cfg.model.prediction_type}
    return create_objective(d.objective or "ddpm", schedule, d.objective_options)


def build_autoencoder(cfg: SharedSections) -> nn.Module:
    autoencoder = create("autoencoders", cfg.autoencoder.name, **cfg.autoencoder.options)
    autoencoder.requires_grad_(False)
    return autoencoder.eval()


def new_unet2d(cfg: SharedSections, in_channels: int, out_channels: int, sample_size: int) -> nn.Module:
    """A new ``UNet2DModel`` of ``[model]``'s widths."""
    from diffusers import UNet2DModel

    return UNet2DModel(**unet2d_arguments(cfg.model, in_channels, out_channels, sample_size))


def check_pretrained_settings(model: ModelConfig, diffusion: DiffusionConfig, folder: Path) -> None:
    """Refuse to fine-tune a lift3d export towards a different target than it was trained on
    (say a v-prediction stage 1 under an epsilon stage 2): training would run, and silently ruin it.
    The 2.5D source context is inherited: left at 0, ``model.source_context`` takes the export's;
    so is the objective, left empty."""
    if not (folder / TRAINING_SETTINGS).is_file() and not (folder / SETTINGS_FILE).is_file():
        return  # a plain diffusers folder: nothing recorded to compare with
    settings = read_training_settings(folder)
    theirs = settings.source_context
    if model.source_context == 0:
        model.source_context = theirs
    elif model.source_context != theirs:
        raise ValueError(f"pretrained model {folder} was trained with source_context {theirs}, but this run says "
                         f"{model.source_context}; leave --model.source_context unset (stage 2 inherits it)")
    theirs = objective_name(settings.objective)
    if not diffusion.objective:
        diffusion.objective = theirs
    elif diffusion.objective != theirs:
        raise ValueError(f"pretrained model {folder} was trained with objective {theirs!r}, but this run says "
                         f"{diffusion.objective!r}; leave --diffusion.objective unset (stage 2 inherits it)")
    checked = [("conditioning", model.conditioning)]
    if theirs == "ddpm":
        checked.append(("prediction_type", model.prediction_type))
    for key, ours in checked:
        theirs = getattr(settings, key)
        if theirs is not None and theirs != ours:
            raise ValueError(f"pretrained model {folder} was trained with {key} {theirs!r}, but this run says "
                             f"{ours!r}; set --model.{key} {theirs} (or [model] {key} = \"{theirs}\")")


def build_unet(cfg: SharedSections, autoencoder, sample_size: int,
               lift: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The U-Net of ``[model]``: read from ``model.pretrained`` (a 2D or lifted folder) or new, its channels
    checked against the autoencoder and the conditioning. ``lift(unet)`` lifts a 2D U-Net in place (a stage
    that trains volumes passes it); gradient checkpointing, if asked for, is switched on last."""
    model = cfg.model
    if model.pretrained:
        check_pretrained_settings(model, cfg.diffusion, Path(model.pretrained))
    in_channels, out_channels = unet_channels(autoencoder.latent_channels, model.conditioning, model.source_context)
    if model.pretrained:
        folder = Path(model.pretrained)
        unet = load_lifted(folder) if (folder / SETTINGS_FILE).is_file() else load_unet2d(folder)
        got_in, got_out = unet.config.in_channels, unet.config.out_channels
        if (got_in, got_out) != (in_channels, out_channels):
            raise ValueError(f"pretrained U-Net {folder} takes {got_in} -> {got_out} channels, but autoencoder "
                             f"{cfg.autoencoder.name!r} with conditioning {model.conditioning!r}"
                             + (f" and source_context {model.source_context}" if model.source_context else "")
                             + f" needs {in_channels} -> {out_channels}")
    else:
        unet = new_unet2d(cfg, in_channels, out_channels, sample_size)
    if lift is not None and not lift3d.is_lifted(unet):
        lift(unet)
    if model.gradient_checkpointing:
        if not hasattr(unet, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(unet).__name__} does not support gradient checkpointing")
        unet.enable_gradient_checkpointing()
    return unet
