"""The networks a diffusion stage trains, built from the config: the noise schedule, the frozen autoencoder,
a new or pretrained 2D U-Net (lifted in stage 2), and which of its parameters train."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

import lift3d
from lift3d.diffusion.conditioning import unet_channels as conditioned_channels
from lift3d.diffusion.export import TRAINING_SETTINGS, read_training_settings
from lift3d.diffusion.objectives import build_objective as _objective_plugin, objective_name
from lift3d.lifting.checkpoint import SETTINGS_FILE, load_lifted, load_unet2d
from lift3d.plugins import create
from lift3d.training.config import TrainConfig

logger = logging.getLogger("lift3d.training.unets")


def build_objective(cfg: TrainConfig):
    """The training objective of ``cfg`` (an ``objectives`` plugin, :mod:`lift3d.diffusion.objectives`) on its
    noise schedule; ``ddpm`` unless ``diffusion.objective`` (or, in stage 2, the pretrained export) says otherwise."""
    d = cfg.diffusion
    schedule = {"num_train_timesteps": d.num_train_timesteps, "beta_schedule": d.beta_schedule,
                "beta_start": d.beta_start, "beta_end": d.beta_end, "prediction_type": cfg.model.prediction_type}
    return _objective_plugin(d.objective or "ddpm", schedule, d.objective_options)


def build_autoencoder(cfg: TrainConfig) -> nn.Module:
    autoencoder = create("autoencoders", cfg.autoencoder.name, **cfg.autoencoder.options)
    autoencoder.requires_grad_(False)
    return autoencoder.eval()


def unet_channels(cfg: TrainConfig, autoencoder) -> tuple[int, int]:
    """U-Net ``(in, out)`` channels under ``cfg``'s conditioning (:mod:`lift3d.diffusion.conditioning`)."""
    return conditioned_channels(autoencoder.latent_channels, cfg.model.conditioning, cfg.model.source_context)


def new_unet2d(cfg: TrainConfig, in_channels: int, out_channels: int, sample_size: int) -> nn.Module:
    from diffusers import UNet2DModel

    widths = tuple(int(c) for c in cfg.model.block_out_channels)
    down = ["DownBlock2D"] * len(widths)
    up = ["UpBlock2D"] * len(widths)
    if cfg.model.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                       block_out_channels=widths, layers_per_block=cfg.model.layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=cfg.model.norm_num_groups)


def check_pretrained_settings(cfg: TrainConfig, folder: Path) -> None:
    """Refuse to fine-tune a lift3d export towards a different target than it was trained on
    (say a v-prediction stage 1 under an epsilon stage 2): training would run, and silently ruin it.
    The 2.5D source context is inherited: left at 0, ``cfg.model.source_context`` takes the export's."""
    if not (folder / TRAINING_SETTINGS).is_file() and not (folder / SETTINGS_FILE).is_file():
        return  # a plain diffusers folder: nothing recorded to compare with
    settings = read_training_settings(folder)
    theirs = settings.source_context
    if cfg.model.source_context == 0:
        cfg.model.source_context = theirs
    elif cfg.model.source_context != theirs:
        raise ValueError(f"pretrained model {folder} was trained with source_context {theirs}, but this run says "
                         f"{cfg.model.source_context}; leave --model.source_context unset (stage 2 inherits it)")
    theirs = objective_name(settings.objective)
    if not cfg.diffusion.objective:
        cfg.diffusion.objective = theirs
    elif cfg.diffusion.objective != theirs:
        raise ValueError(f"pretrained model {folder} was trained with objective {theirs!r}, but this run says "
                         f"{cfg.diffusion.objective!r}; leave --diffusion.objective unset (stage 2 inherits it)")
    checked = [("conditioning", cfg.model.conditioning)]
    if theirs == "ddpm":
        checked.append(("prediction_type", cfg.model.prediction_type))
    for key, ours in checked:
        theirs = getattr(settings, key)
        if theirs is not None and theirs != ours:
            raise ValueError(f"pretrained model {folder} was trained with {key} {theirs!r}, but this run says "
                             f"{ours!r}; set --model.{key} {theirs} (or [model] {key} = \"{theirs}\")")


def build_unet(cfg: TrainConfig, autoencoder, sample_size: int) -> nn.Module:
    if cfg.model.pretrained:
        check_pretrained_settings(cfg, Path(cfg.model.pretrained))
    in_channels, out_channels = unet_channels(cfg, autoencoder)
    if cfg.model.pretrained:
        folder = Path(cfg.model.pretrained)
        unet = load_lifted(folder) if (folder / SETTINGS_FILE).is_file() else load_unet2d(folder)
        got_in, got_out = unet.config.in_channels, unet.config.out_channels
        if (got_in, got_out) != (in_channels, out_channels):
            raise ValueError(f"pretrained U-Net {folder} takes {got_in} -> {got_out} channels, but autoencoder "
                             f"{cfg.autoencoder.name!r} with conditioning {cfg.model.conditioning!r}"
                             + (f" and source_context {cfg.model.source_context}" if cfg.model.source_context else "")
                             + f" needs {in_channels} -> {out_channels}")
    else:
        unet = new_unet2d(cfg, in_channels, out_channels, sample_size)
    if cfg.run.stage == "volumes" and not lift3d.is_lifted(unet):
        lift3d.inflate(unet, cfg.lift.kind or None, kernel_size=cfg.lift.kernel_size, where=cfg.lift.where,
                       padding_mode=cfg.lift.padding_mode, recompute=cfg.lift.recompute, **cfg.lift.options)
    if cfg.model.gradient_checkpointing:
        if not hasattr(unet, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(unet).__name__} does not support gradient checkpointing")
        unet.enable_gradient_checkpointing()
    return unet


def trainable_parameters(cfg: TrainConfig, unet: nn.Module) -> list[nn.Parameter]:
    if lift3d.is_lifted(unet):
        lift3d.set_trainable(unet, cfg.lift.trainable)
    else:
        unet.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]
