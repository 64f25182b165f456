"""The export settings: the one typed, versioned record of how a model was trained, written by
training and read by sampling and by stage 2 (``lift3d_training.json`` in an exported model folder,
or the ``training`` entry of ``lift3d.json`` in older lifted exports)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lift3d.io.errors import Lift3dError
from lift3d.io.schemas import PREDICTION_TYPES, Checked, read_json, scheduler_schema, validate
from lift3d.io.budget import check_bytes
from lift3d.io.writing import write_text_atomic
from lift3d.lifting.checkpoint import SETTINGS_FILE, CheckpointError, model_folder, read_settings

TRAINING_SETTINGS = "lift3d_training.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
EXPORT_FORMAT = 2
"""Format 2 added ``objective``; a ``ddpm`` export is still written as format 1, which older lift3d reads."""
STAGE_LABEL = r"^[a-z0-9][a-z0-9-]{0,31}$"
"""A stage's name as an export records it (``slices``, ``volumes``, or a registered stage's)."""


MAX_SLICES = 4096  # as a segmenter's grid (lift3d.io.schemas.SegmenterGrid): windows and volumes of at most this many


class AutoencoderSpec(Checked):
    name: str = Field(min_length=1, max_length=100)
    options: dict[str, Any] | None = None  # the plugin's own, checked by the plugin when it is built


class DataSettings(Checked):
    dataset: str | None = Field(default=None, max_length=100)
    options: dict[str, Any] | None = None  # provenance: synthesis builds no dataset
    num_slices: int | None = Field(default=None, ge=1, le=MAX_SLICES)
    window: int | None = Field(default=None, ge=0, le=MAX_SLICES)


class ExportSettings(Checked):
    """``lift3d_training.json``: what synthesis needs to prepare inputs as in training, and to rebuild
    the sampler. ``format`` is absent from exports written before it existed; they read as format 1.
    ``objective`` (format 2) is absent from exports written before objectives existed: they are ``ddpm``."""

    format: int = Field(default=1, ge=1)
    stage: str | None = Field(default=None, pattern=STAGE_LABEL)
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

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value > EXPORT_FORMAT:
            raise ValueError(f"must be from 1 to {EXPORT_FORMAT} (the newest this lift3d reads), got {value}: the "
                             "export was written by a newer lift3d; read it with that version")
        return value

    @model_validator(mode="after")
    def _objective_needs_format_2(self) -> "ExportSettings":
        if self.format < 2 and self.objective not in (None, "ddpm"):
            raise ValueError(f"format {self.format} exports are ddpm exports, but objective is {self.objective!r}; "
                             "an export of another objective is format 2")
        return self




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


def _read_settings(folder: Path) -> tuple[ExportSettings, Path]:
    """The schema-checked training settings and the file they were read from."""
    path = folder / TRAINING_SETTINGS
    if path.is_file() or path.is_symlink():
        return read_json(path, ExportSettings, folder=folder, what=TRAINING_SETTINGS), path
    if (folder / SETTINGS_FILE).is_file():
        raw = read_settings(folder).get("training")
        if raw is None:
            raise CheckpointError(f"{folder} has a {SETTINGS_FILE} but no training settings ({TRAINING_SETTINGS}): "
                                  "the autoencoder and conditioning it was trained with are unknown; synthesise "
                                  "from a folder exported by lift3d-finetune")
        path = folder / SETTINGS_FILE
        return validate(raw, ExportSettings, path, f"{SETTINGS_FILE}'s training settings"), path
    raise CheckpointError(f"{folder} has no lift3d settings (neither {TRAINING_SETTINGS} nor {SETTINGS_FILE}): "
                          "it is not a model exported by lift3d-finetune, so its autoencoder, conditioning and "
                          "data preparation are unknown")


def _read_scheduler(folder: Path) -> dict[str, Any]:
    """The schema-checked ``scheduler/scheduler_config.json``: its class's keys only, each in range."""
    path = folder / SCHEDULER_CONFIG
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{folder} has no {SCHEDULER_CONFIG} (the training noise schedule); re-export the model")
    raw = read_json(path, folder=folder, what="scheduler config")
    schema = scheduler_schema(raw, path)
    config = validate(raw, schema, path, f"scheduler config of a {raw['_class_name']}")
    # diffusers keeps several float64 arrays of length T per scheduler
    check_bytes(config.num_train_timesteps * 8 * 16, f"{path}: num_train_timesteps {config.num_train_timesteps}")
    return config.model_dump(by_alias=True, exclude_unset=True)


def read_training_settings(folder: str | os.PathLike) -> ExportSettings:
    """The checked training settings of an exported model folder (``lift3d_training.json``, or the
    ``training`` entry of ``lift3d.json``), or a ``CheckpointError`` saying why not. Where the folder
    holds its noise schedule, the two are checked against each other (``check_agreement``)."""
    folder = model_folder(folder)
    settings, path = _read_settings(folder)
    if (folder / SCHEDULER_CONFIG).exists() or (folder / SCHEDULER_CONFIG).is_symlink():
        check_agreement(settings, path, _read_scheduler(folder), folder / SCHEDULER_CONFIG)
    return settings


def read_scheduler_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked training noise schedule of an exported model folder (``scheduler/scheduler_config.json``),
    checked against the folder's training settings where it has them (``check_agreement``)."""
    folder = model_folder(folder)
    config = _read_scheduler(folder)
    if any((folder / name).is_file() for name in (TRAINING_SETTINGS, SETTINGS_FILE)):
        check_agreement(*_read_settings(folder), config, folder / SCHEDULER_CONFIG)
    return config


def check_agreement(settings: ExportSettings, settings_path: Path, config: dict[str, Any], config_path: Path) -> None:
    """An export agrees with itself: the objective its settings name, built on the noise schedule of
    ``config``, writes a scheduler of ``config``'s class, predicts the settings' prediction type, and
    takes every setting of ``config`` as the schedule training used. A flow export relabelled ``ddpm``
    (or the reverse) would otherwise sample with the wrong rule."""
    from lift3d.diffusion.objectives import create_objective, objective_name

    name = objective_name(settings.objective)
    where = f"{settings_path.name} objective {name!r}"
    try:
        objective = create_objective(name, config, settings.objective_options)
    except (Lift3dError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path} does not fit the {where}: {str(exc)[:200]}") from None
    written = type(objective.scheduler).__name__
    if config["_class_name"] != written:
        raise CheckpointError(f"{config_path}: _class_name is {config['_class_name']!r}, but the {where} trains with a "
                              f"{written}; the export contradicts itself (re-export the model)")
    if settings.prediction_type is not None and settings.prediction_type != objective.prediction_type:
        raise CheckpointError(f"{settings_path}: prediction_type is {settings.prediction_type!r}, but its objective "
                              f"{name!r} on the schedule of {config_path} predicts {objective.prediction_type!r}; the "
                              "export contradicts itself (re-export the model)")
    if (settings.objective_options or {}) != objective.options:
        raise CheckpointError(f"{settings_path}: objective_options {_json(settings.objective_options)} are not what "
                              f"the {name!r} objective takes from them ({_json(objective.options)}); the export "
                              "contradicts itself (re-export the model)")
    # diffusers' reading of the file (a missing key at its default) against the schedule training used
    read = type(objective.scheduler).from_config(config).config
    for key, value in objective.scheduler.config.items():
        if not key.startswith("_") and _plain(read.get(key)) != _plain(value):
            held = f"is {_json(read.get(key))}" if key in config else f"is missing (diffusers reads {_json(read.get(key))})"
            raise CheckpointError(f"{config_path}: {key} {held}, but the {where} trains with {_json(value)}; the "
                                  "export contradicts itself (re-export the model)")


def _plain(value: Any) -> Any:
    """A config value as JSON holds it (a tuple or an array is a list)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _json(value: Any) -> str:
    """``value`` as the file would hold it (``true``, ``null``, ``[0.1, 0.2]``), cut short."""
    try:
        text = json.dumps(_plain(value), default=str)
    except ValueError:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_export_settings(settings: ExportSettings | dict[str, Any], where: object = "export settings") -> ExportSettings:
    """``settings`` as the typed record (a dict, as training builds one, is checked against the schema)."""
    if isinstance(settings, ExportSettings):
        return settings
    return validate(settings, ExportSettings, str(where), "export settings")
