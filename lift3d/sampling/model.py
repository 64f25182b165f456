"""A trained model loaded for synthesis: the U-Net (fused when lifted), its autoencoder, the training
settings and noise schedule, on the device and dtype asked for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lift3d
from lift3d.diffusion.conditioning import check_channels
from lift3d.diffusion.export import (TRAINING_SETTINGS, ExportSettings, as_export_settings, read_scheduler_config,
                                     read_training_settings)
from lift3d.io.paths import inside
from lift3d.lifting.checkpoint import SETTINGS_FILE, CheckpointError, load_lifted, load_unet2d
from lift3d.plugins import create


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SynthesisModel:
    """Everything ``synthesize`` needs, as loaded from an exported model folder.

    :param unet: the denoising U-Net, lifted (stage 2) or plain 2D (stage 1), in eval mode.
    :param autoencoder: the autoencoder plugin the model was trained with.
    :param settings: the training settings (``lift3d_training.json``).
    :param scheduler_config: the training noise scheduler's config (a diffusers config dict).
    :param max_slices: volumes with more slices are denoised in windows of this many slices
        (by default the slice count a lifted model was fine-tuned on; None = never).
    """

    unet: nn.Module
    autoencoder: Any
    settings: ExportSettings  # a dict (as training builds one) is checked into the typed record
    scheduler_config: dict[str, Any]
    folder: Path | None = None
    max_slices: int | None = None

    def __post_init__(self) -> None:
        self.settings = as_export_settings(self.settings, self.folder or "the model's export settings")

    @property
    def objective(self):
        """The training objective (``lift3d.diffusion.objectives.OBJECTIVES``) on the exported noise schedule;
        ``ddpm`` for exports written before objectives existed."""
        if getattr(self, "_objective", None) is None:
            from lift3d.diffusion.objectives import create_objective, objective_name

            self._objective = create_objective(objective_name(self.settings.objective), self.scheduler_config)
        return self._objective

    @property
    def lifted(self) -> bool:
        return lift3d.is_lifted(self.unet)

    @property
    def conditioning(self) -> str:
        return self.settings.conditioning

    @property
    def source_context(self) -> int:
        """2.5D: source slices on each side the U-Net sees (``lift3d.data.context``); 0 for older exports."""
        return self.settings.source_context

    @property
    def image_channels(self) -> int:
        return int(self.autoencoder.image_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.latent_channels)

    @property
    def size_multiple(self) -> int:
        """What the in-plane size must divide by: autoencoder factor x U-Net downsampling."""
        multiple = self.settings.size_multiple
        if not multiple:
            widths = getattr(getattr(self.unet, "config", None), "block_out_channels", None) or (0,)
            multiple = self.autoencoder.downsampling_factor * 2 ** (len(widths) - 1)
        return int(multiple)

    @property
    def autoencoder_dtype(self) -> torch.dtype:
        """The dtype the autoencoder runs in (an autoencoder without parameters: the U-Net's)."""
        return getattr(self.autoencoder, "dtype", None) or self.dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def _build_autoencoder(folder: Path, settings: ExportSettings):
    spec = settings.autoencoder
    options = dict(spec.options or {})
    if "path" in options:  # an exported autoencoder lives inside the model folder, and only there
        options["path"] = str(inside(folder, options["path"], f"{folder / TRAINING_SETTINGS}'s autoencoder path"))
    try:
        autoencoder = create("autoencoders", spec.name, **options)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise CheckpointError(f"{folder}: cannot build its autoencoder {spec.name!r}: {exc}") from None
    if isinstance(autoencoder, nn.Module):
        autoencoder.requires_grad_(False).eval()
    return autoencoder


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} cannot run synthesis; valid: cpu, cuda, cuda:N, mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here; use cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _move(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    module.to(device)
    current = next(module.parameters(), None)
    if current is not None and current.dtype != dtype:  # diffusers warns on any .to(dtype), even a no-op
        module.to(dtype=dtype)


def load_synthesis_model(folder: str | os.PathLike, *, device: str | torch.device | None = None,
                         dtype: str | torch.dtype | None = None) -> SynthesisModel:
    """Load ``folder`` (``<output_dir>/model`` of a training run) for ``synthesize``.

    The U-Net is lifted when the folder has ``lift3d.json`` (stage 2), plain 2D otherwise (stage 1).
    ``device`` defaults to CUDA when available; ``dtype`` (``float32`` by default) applies to the
    U-Net and autoencoder, while the solver state stays float32.
    """
    folder = Path(folder)
    settings = read_training_settings(folder)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    autoencoder = _build_autoencoder(folder, settings)
    unet = load_lifted(folder) if (folder / SETTINGS_FILE).is_file() else load_unet2d(folder)
    check_channels(unet, autoencoder.latent_channels, settings.conditioning, folder, settings.source_context,
                   f"autoencoder {type(autoencoder).__name__}")
    scheduler_config = read_scheduler_config(folder)
    _move(unet.requires_grad_(False).eval(), device, dtype)
    if lift3d.is_lifted(unet):
        lift3d.fuse(unet)  # inference fast path: each volumetric layer folded into its host conv
    if isinstance(autoencoder, nn.Module):
        _move(autoencoder, device, dtype)
    data = settings.data
    max_slices = (data.window or data.num_slices) if data is not None and lift3d.is_lifted(unet) else None
    return SynthesisModel(unet, autoencoder, settings, scheduler_config, folder, int(max_slices) if max_slices else None)
