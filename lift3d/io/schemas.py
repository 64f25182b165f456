"""The one trusted reader: every JSON file lift3d reads has a schema, checked before anything is built.

A schema gives each field's type, range and allowed values (pydantic, strict: a JSON ``true`` is not
an int, ``1.5`` is not a step, ``NaN`` is not a learning rate). Unknown keys are kept (diffusers'
configs grow between versions) but never trusted. :func:`read_json` turns every way a file can be bad
(missing, a link out of its folder, too large, not JSON, the wrong shape) into one
:class:`~lift3d.io.errors.Lift3dError` line naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lift3d.io.errors import Lift3dError
from lift3d.io.paths import check_contained

MAX_JSON_BYTES = 16 * 2**20
Schema = TypeVar("Schema", bound=BaseModel)

# What a model folder may name, and so what lift3d may build from it: classes it supports, never a
# loader (``DiffusionPipeline``) or anything a string could turn into a hub lookup.
MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
AUTOENCODER_CLASSES = ("AutoencoderKL",)
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                     "FlowMatchEulerDiscreteScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what DDPM, DDIM and DPM-Solver++ all implement
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
PositiveInt = Field(ge=1)


class Checked(BaseModel):
    """Strict types, finite floats; unknown keys kept for the libraries that own them."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, populate_by_name=True)


# --------------------------------------------------------------------------------------------
# Model folders


class LiftSettings(Checked):
    kind: str = "full"
    kernel_size: int = Field(ge=1, le=1023)
    where: str | list[str]
    padding_mode: Literal["zeros", "replicate"]
    options: dict[str, Any] | None = None
    groups: int | None = Field(default=None, ge=1)

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd, got {value}")
        return value


class LiftedModelSettings(Checked):
    """``lift3d.json`` of a lifted-model folder."""

    class_: str = Field(alias="class")
    diffusers_class: Literal[MODEL_CLASSES] | None = None  # type: ignore[valid-type]
    weights: str
    lift: LiftSettings
    training: dict[str, Any] | None = None


class ModelConfig(Checked):
    """A diffusers model's ``config.json``: the class and the sizes that set its memory."""

    class_name: str = Field(alias="_class_name")
    in_channels: int | None = Field(default=None, ge=1, le=4096)
    out_channels: int | None = Field(default=None, ge=1, le=4096)
    block_out_channels: list[int] | None = Field(default=None, min_length=1, max_length=16)
    layers_per_block: int | list[int] | None = None
    norm_num_groups: int | None = Field(default=None, ge=1)
    latent_channels: int | None = Field(default=None, ge=1, le=1024)
    sample_size: int | list[int] | None = None

    @field_validator("block_out_channels")
    @classmethod
    def _widths(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(w < 1 for w in value):
            raise ValueError(f"every width must be >= 1, got {value}")
        return value

    @field_validator("layers_per_block", "sample_size")
    @classmethod
    def _positive(cls, value):
        values = value if isinstance(value, list) else [value]
        if value is not None and any(v < 1 for v in values):
            raise ValueError(f"must be >= 1, got {value}")
        return value

    def checked_class(self, allowed: tuple[str, ...], path: Path) -> str:
        if self.class_name not in allowed:
            raise Lift3dError(f"{path}: _class_name {self.class_name!r} is not a class lift3d builds; "
                              f"valid: {', '.join(allowed)}")
        return self.class_name


class SchedulerConfig(Checked):
    """``scheduler/scheduler_config.json``: the training noise schedule."""

    class_name: Literal[SCHEDULER_CLASSES] | None = Field(default=None, alias="_class_name")  # type: ignore[valid-type]
    num_train_timesteps: int = Field(default=1000, ge=1, le=100_000)
    beta_schedule: Literal[BETA_SCHEDULES] = "linear"  # type: ignore[valid-type]
    beta_start: float = Field(default=0.0001, gt=0, lt=1)
    beta_end: float = Field(default=0.02, gt=0, lt=1)
    prediction_type: Literal[PREDICTION_TYPES] = "epsilon"  # type: ignore[valid-type]
    trained_betas: list[float] | None = None
    shift: float | None = Field(default=None, gt=0, le=100)  # FlowMatchEulerDiscreteScheduler

    @field_validator("beta_end")
    @classmethod
    def _order(cls, value: float, info) -> float:
        start = info.data.get("beta_start")
        if start is not None and value < start:
            raise ValueError(f"must be >= beta_start ({start}), got {value}")
        return value


# --------------------------------------------------------------------------------------------
# Segmenter folders (lift3d.evaluation.segmentation)


SEGMENTER_FORMAT = "lift3d-segmenter"
PLUGIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class Exact(Checked):
    """A file lift3d writes and reads itself: an unknown key is an error, not a newer library's field."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, populate_by_name=True)


class SegmenterGrid(Exact):
    """The grid a segmenter was trained on, which image files are brought onto (:class:`lift3d.data.volume.TrainingGrid`)."""

    size: list[int] = Field(min_length=2, max_length=2)
    num_slices: int = Field(ge=1, le=4096)
    slice_axis: Literal["axial", "coronal", "sagittal"]
    percentiles: list[float] = Field(min_length=2, max_length=2)
    spacing_mm: list[float] | None = Field(default=None, min_length=3, max_length=3)

    @field_validator("size")
    @classmethod
    def _size(cls, value: list[int]) -> list[int]:
        if any(not 1 <= s <= 4096 for s in value):
            raise ValueError(f"each side must be from 1 to 4096, got {value}")
        return value

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, value: list[float]) -> list[float]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError(f"must be [low, high] with 0 <= low < high <= 100, got {value}")
        return value


class TissueNetworkSettings(Exact):
    """The built-in ``tissue-unet``'s network: a 2.5D U-Net (:mod:`lift3d.evaluation.tissue_unet`)."""

    block_out_channels: list[int] = Field(min_length=1, max_length=6)
    context: int = Field(ge=0, le=16)

    @field_validator("block_out_channels")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        if any(not 1 <= w <= 1024 for w in value):
            raise ValueError(f"every width must be from 1 to 1024, got {value}")
        return value


class SegmenterSettings(Exact):
    """``segmenter.json`` of a segmenter folder: which plugin loads it, its classes, its network and grid."""

    format: Literal["lift3d-segmenter"]
    version: Literal[1]
    plugin: str = Field(pattern=PLUGIN_NAME)
    classes: list[str] = Field(min_length=1, max_length=32)
    network: TissueNetworkSettings | None = None
    input_grid: SegmenterGrid | None = None
    options: dict[str, Any] | None = None  # a third-party plugin's own settings, its to check
    training: dict[str, Any] | None = None  # provenance only: nothing is built from it

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        bad = [c for c in value if not (c.isidentifier() and len(c) <= 64)]
        if bad or len(set(value)) != len(value):
            raise ValueError(f"must be distinct names of letters, digits and _ (at most 64 each), got {value}")
        return value


# --------------------------------------------------------------------------------------------
# The reader


def _one_line(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) if isinstance(p, int) or str(p).isidentifier() else repr(p)
                         for p in error["loc"]) or "the file"
        got = error.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        parts.append(f"{where}: {error['msg'].rstrip('.')} (got {shown[:80]})")
    more = f"; and {exc.error_count() - 3} more" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


def read_json(path: str | os.PathLike, schema: type[Schema] | None = None, *, folder: str | os.PathLike | None = None,
              what: str = "file") -> Any:
    """Read ``path`` and check it against ``schema`` (a JSON object of any shape when None).

    ``folder``, when given, is the folder the file must stay in (symlinks resolved). Every failure
    is one :class:`Lift3dError` naming the file.
    """
    path = Path(path)
    if folder is not None:
        check_contained(folder, path, what)
    if not path.is_file():
        raise Lift3dError(f"{what} not found: {path}" if not path.exists() else f"{path}: {what} is not a regular file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise Lift3dError(f"{path}: {what} is {size} bytes; lift3d reads JSON settings of at most {MAX_JSON_BYTES}")
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise Lift3dError(f"{path}: {what} is not valid JSON ({str(exc)[:120]})") from None
    except ValueError as exc:  # an integer of more digits than Python parses
        raise Lift3dError(f"{path}: {what} is not usable JSON ({str(exc)[:120]})") from None
    if schema is None:
        if not isinstance(value, dict):
            raise Lift3dError(f"{path}: {what} must be a JSON object, got a {type(value).__name__}")
        return value
    return validate(value, schema, path, what)


def validate(value: Any, schema: type[Schema], path: str | os.PathLike, what: str = "file") -> Schema:
    """``value`` (already parsed) checked against ``schema``; errors name ``path``."""
    if not isinstance(value, dict):
        raise Lift3dError(f"{path}: {what} must be a JSON object, got a {type(value).__name__}")
    try:
        return schema.model_validate_json(json.dumps(value))
    except ValidationError as exc:
        raise Lift3dError(f"{path}: {what} is not valid: {_one_line(exc)}") from None
    except (ValueError, RecursionError) as exc:
        raise Lift3dError(f"{path}: {what} is not usable ({str(exc)[:120]})") from None
