"""The export settings: the one typed, versioned record of how a model was trained, written by
training and read by sampling and by stage 2 (``lift3d_training.json`` in an exported model folder,
or the ``training`` entry of ``lift3d.json`` in older lifted exports)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lift3d.io.schemas import PREDICTION_TYPES, Checked, SchedulerConfig, read_json, validate
from lift3d.io.budget import check_bytes
from lift3d.io.writing import write_text_atomic
from lift3d.lifting.checkpoint import SETTINGS_FILE, CheckpointError, model_folder, read_settings

TRAINING_SETTINGS = "lift3d_training.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
EXPORT_FORMAT = 2
"""Format 2 added ``objective``; a ``ddpm`` export is still written as format 1, which older lift3d reads."""


class AutoencoderSpec(Checked):
    name: str = Field(min_length=1)
    options: dict[str, Any] | None = None


class DataSettings(Checked):
    dataset: str | None = None
    options: dict[str, Any] | None = None
    num_slices: int | None = Field(default=None, ge=1)
    window: int | None = Field(default=None, ge=0)


class ExportSettings(Checked):
    """``lift3d_training.json``: what synthesis needs to prepare inputs as in training, and to rebuild
    the sampler. ``format`` is absent from exports written before it existed; they read as format 1.
    ``objective`` (format 2) is absent from exports written before objectives existed: they are ``ddpm``."""

    format: int = Field(default=1, ge=1, le=EXPORT_FORMAT)
    stage: Literal["slices", "volumes"] | None = None
    conditioning: Literal["concat", "none"]
    source_context: int = Field(default=0, ge=0, le=64)
    prediction_type: Literal[PREDICTION_TYPES] | None = None  # type: ignore[valid-type]
    objective: str | None = Field(default=None, min_length=1, max_length=64)
    objective_options: dict[str, Any] | None = None
    autoencoder: AutoencoderSpec
    image_channels: int | None = Field(default=None, ge=1, le=64)
    latent_channels: int | None = Field(default=None, ge=1, le=1024)
    size_multiple: int | None = Field(default=None, ge=1, le=4096)
    data: DataSettings | None = None
    config: dict[str, Any] | None = None




def export_settings(*, stage: str, conditioning: str, source_context: int, prediction_type: str,
                    autoencoder: dict[str, Any], objective: str = "ddpm", objective_options: dict | None = None, image_channels: int, latent_channels: int, size_multiple: int,
                    data: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The export settings, checked against their own schema before they are written."""
    settings = {"format": 1 if objective == "ddpm" else EXPORT_FORMAT, "stage": stage, "conditioning": conditioning,
                "source_context": source_context, "prediction_type": prediction_type, "autoencoder": autoencoder,
                "image_channels": image_channels, "latent_channels": latent_channels,
                "size_multiple": size_multiple, "data": data, "config": config}
    if objective != "ddpm" or objective_options:
        settings.update(objective=objective, objective_options=dict(objective_options or {}))
    validate(settings, ExportSettings, TRAINING_SETTINGS, "export settings")
    return settings


def write_export_settings(folder: str | os.PathLike, settings: dict[str, Any]) -> Path:
    return write_text_atomic(Path(folder) / TRAINING_SETTINGS, json.dumps(settings, indent=2))


def read_training_settings(folder: str | os.PathLike) -> ExportSettings:
    """The checked training settings of an exported model folder (``lift3d_training.json``, or the
    ``training`` entry of ``lift3d.json``), or a :class:`CheckpointError` saying why not."""
    folder = model_folder(folder)
    path = folder / TRAINING_SETTINGS
    if path.is_file() or path.is_symlink():
        settings = read_json(path, ExportSettings, folder=folder, what=TRAINING_SETTINGS)
    elif (folder / SETTINGS_FILE).is_file():
        raw = read_settings(folder).get("training")
        if raw is None:
            raise CheckpointError(f"{folder} has a {SETTINGS_FILE} but no training settings ({TRAINING_SETTINGS}): "
                                  "the autoencoder and conditioning it was trained with are unknown; synthesise "
                                  "from a folder exported by lift3d-finetune")
        settings = validate(raw, ExportSettings, folder / SETTINGS_FILE, f"{SETTINGS_FILE}'s training settings")
    else:
        raise CheckpointError(f"{folder} has no lift3d settings (neither {TRAINING_SETTINGS} nor {SETTINGS_FILE}): "
                              "it is not a model exported by lift3d-finetune, so its autoencoder, conditioning and "
                              "data preparation are unknown")
    return settings


def read_scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked training noise schedule of an exported model folder (``scheduler/scheduler_config.json``)."""
    folder = model_folder(folder)
    path = folder / SCHEDULER_CONFIG
    if not path.exists():
        raise CheckpointError(f"{folder} has no {SCHEDULER_CONFIG} (the training noise schedule); re-export the model")
    config = read_json(path, SchedulerConfig, folder=folder, what="scheduler config")
    # diffusers keeps several float64 arrays of length T per scheduler
    check_bytes(config.num_train_timesteps * 8 * 16, f"{path}: num_train_timesteps {config.num_train_timesteps}")
    return config.model_dump(by_alias=True, exclude_unset=True)


def as_export_settings(settings: ExportSettings | dict[str, Any], where: object = "export settings") -> ExportSettings:
    """``settings`` as the typed record (a dict, as training builds one, is checked against the schema)."""
    if isinstance(settings, ExportSettings):
        return settings
    return validate(settings, ExportSettings, str(where), "export settings")
