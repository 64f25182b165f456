"""Exporting a trained stage: the model folder that synthesis and the next stage read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

import lift3d
from lift3d.diffusion.export import export_settings, write_export_settings
from lift3d.lifting.checkpoint import save_diffusers_folder, save_lifted, save_volumetric
from lift3d.training.card import write_model_card
from lift3d.training.checkpoints import write_folder
from lift3d.training.sections import SharedSections

logger = logging.getLogger("lift3d.training.export")


def training_settings(cfg: SharedSections, autoencoder, dataset, exported_autoencoder: bool,
                      objective=None, label: str | None = None) -> dict[str, Any]:
    """What synthesis needs to prepare inputs exactly as in training and to rebuild the sampler.

    :param label: the export label of the stage that trains the model
        (``lift3d.training.stages.Stage.export_label``); by default ``run.stage``.
    """
    ae_options = {"path": "autoencoder"} if exported_autoencoder else dict(cfg.autoencoder.options)
    unet_multiple = 2 ** (len(cfg.model.block_out_channels) - 1)
    return export_settings(
        stage=label or cfg.run.stage, conditioning=cfg.model.conditioning, source_context=cfg.model.source_context,
        prediction_type=objective.prediction_type if objective is not None else cfg.model.prediction_type,
        objective=objective.name if objective is not None else (cfg.diffusion.objective or "ddpm"),
        objective_options=objective.options if objective is not None else dict(cfg.diffusion.objective_options),
        autoencoder={"name": cfg.autoencoder.name, "options": ae_options},
        image_channels=autoencoder.image_channels, latent_channels=autoencoder.latent_channels,
        size_multiple=unet_multiple * autoencoder.downsampling_factor,
        data={"dataset": cfg.data.dataset, "options": dict(cfg.data.options),
              "num_slices": getattr(dataset, "num_slices", None), "window": cfg.data.window},
        config=cfg.to_dict())


def export_model(cfg: SharedSections, unet: nn.Module, autoencoder, objective, dataset, output_dir: Path,
                 label: str | None = None) -> Path:
    """Write ``output_dir/model``: the (lifted) U-Net in safetensors, its settings (``label``: the stage's
    export label), the autoencoder (if it has weights) and the objective's noise-scheduler config; plus
    ``volumetric.safetensors`` for a lifted U-Net. With ``optim.ema`` the loop calls this with the EMA weights
    copied into ``unet``."""
    state = unet.state_dict()
    has_weights = any(True for _ in autoencoder.parameters()) if isinstance(autoencoder, nn.Module) else False
    settings = training_settings(cfg, autoencoder, dataset, exported_autoencoder=has_weights, objective=objective,
                                 label=label)

    def write(tmp: Path) -> None:
        if lift3d.is_lifted(unet):
            save_lifted(unet, tmp, state_dict=state, extra={"training": settings})
            save_volumetric(unet, tmp / "volumetric.safetensors", state_dict=state)
        else:
            save_diffusers_folder(unet, tmp, state)
        write_export_settings(tmp, settings)
        if has_weights:
            autoencoder.save(tmp / "autoencoder")
        objective.scheduler.save_pretrained(tmp / "scheduler")
        write_model_card(tmp, settings, lift3d.is_lifted(unet), shown=output_dir / "model")

    return write_folder(output_dir / "model", write)
