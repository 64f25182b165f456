"""The one trusted reader: every JSON file lift3d reads has a schema, checked before anything is built.

A schema gives each field's type, range and allowed values (pydantic, strict: a JSON ``true`` is not
an int, ``1.5`` is not a step, ``NaN`` is not a learning rate), and every number a bound. Unknown keys
of a model's ``config.json`` are kept (diffusers ignores what its classes do not take) but never trusted;
files lift3d writes itself, and noise scheduler configs, may hold only the keys their schema names.
``read_json`` turns every way a file can be bad (missing, a link out of its folder, too large, not
JSON, the wrong shape) into one ``Lift3dError`` line naming the file and the key
(``lift3d.io.schema_errors`` words it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lift3d.io.errors import Lift3dError
from lift3d.io.paths import check_contained
from lift3d.io.schema_errors import describe, shown

MAX_JSON_BYTES = 16 * 2**20
Schema = TypeVar("Schema", bound=BaseModel)

# What a model folder may name, and so what lift3d may build from it: classes it supports, never a
# loader (``DiffusionPipeline``) or anything a string could turn into a hub lookup.
MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
AUTOENCODER_CLASSES = ("AutoencoderKL",)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # what DDPM, DDIM and DPM-Solver++ all implement
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
# A flow schedule's shift: at 0.001 a 4-step DPM-Solver++ already visits training timestep 0 twice, and far below
# it the Euler sampler's sigmas underflow to NaN (1e-12); SD3 uses 3.
MIN_SHIFT = 0.01
PositiveInt = Field(ge=1)


# The most a model folder's config.json may ask for. Building a U-Net, even on the meta device, takes time
# in proportion to its blocks: 16 levels of 64 resnets (lift3d-finetune's own limits) take seconds; more is
# refused before diffusers sees it. Widths and channels are bounded here only loosely: their memory is
# checked against the budget (lift3d.io.budget) once the model is sized.
MAX_LEVELS, MAX_LAYERS_PER_BLOCK, MAX_WIDTH = 16, 64, 65536
Count = Annotated[int, Field(ge=1, le=MAX_LAYERS_PER_BLOCK)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Heads = Annotated[int, Field(ge=1, le=4096)]
Name = Annotated[str, Field(max_length=64)]


def _levels() -> Any:
    return Field(default=None, min_length=1, max_length=MAX_LEVELS)


def _scale() -> Any:
    return Field(default=None, gt=0, le=1000)


class Checked(BaseModel):
    """Strict types, finite floats; unknown keys kept for the libraries that own them."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, populate_by_name=True)


class Exact(Checked):
    """A file lift3d writes and reads itself: an unknown key is an error, not a newer library's field."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, populate_by_name=True)


# Model folders


class LiftSettings(Checked):
    kind: str = "full"
    kernel_size: int = Field(ge=1, le=1023)
    where: Annotated[str, Field(max_length=256)] | list[Annotated[str, Field(max_length=256)]] = Field(max_length=4096)
    padding_mode: Literal["zeros", "replicate"]
    options: dict[str, Any] | None = None  # the layer kind's own, checked by lift3d.inflate (sized on meta first)
    groups: int | None = Field(default=None, ge=1, le=MAX_WIDTH)

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
    """A diffusers model's ``config.json`` (``UNet2DModel``, ``UNet2DConditionModel``, ``AutoencoderKL``):
    every argument of those classes typed and bounded. Other keys are kept: diffusers ignores what its
    classes do not take."""

    class_name: str = Field(alias="_class_name")
    in_channels: int | None = Field(default=None, ge=1, le=4096)
    out_channels: int | None = Field(default=None, ge=1, le=4096)
    latent_channels: int | None = Field(default=None, ge=1, le=1024)
    sample_size: Annotated[int, Field(ge=1, le=MAX_WIDTH)] | list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] | None = \
        Field(default=None)
    block_out_channels: list[Width] | None = _levels()
    down_block_types: list[Name] | None = _levels()
    up_block_types: list[Name] | None = _levels()
    mid_block_type: Name | None = None
    layers_per_block: Count | list[Count] | None = None
    transformer_layers_per_block: Count | list[Count] | list[list[Count]] | None = None
    reverse_transformer_layers_per_block: list[list[Count]] | None = Field(default=None, max_length=MAX_LEVELS)
    norm_num_groups: int | None = Field(default=None, ge=1, le=MAX_WIDTH)
    attn_norm_num_groups: int | None = Field(default=None, ge=1, le=MAX_WIDTH)
    norm_eps: float | None = Field(default=None, gt=0, le=1)
    attention_head_dim: Heads | list[Heads] | None = None
    num_attention_heads: Heads | list[Heads] | None = None
    cross_attention_dim: Width | list[Width] | None = None
    only_cross_attention: bool | list[bool] | None = None
    encoder_hid_dim: Width | None = None
    time_embedding_dim: Width | None = None
    addition_time_embed_dim: Width | None = None
    time_cond_proj_dim: Width | None = None
    projection_class_embeddings_input_dim: Width | None = None
    addition_embed_type_num_heads: Heads | None = None
    num_class_embeds: int | None = Field(default=None, ge=1, le=1_000_000)
    num_train_timesteps: int | None = Field(default=None, ge=1, le=100_000)
    freq_shift: int | None = Field(default=None, ge=-1024, le=1024)
    downsample_padding: int | None = Field(default=None, ge=0, le=8)
    conv_in_kernel: int | None = Field(default=None, ge=1, le=15)
    conv_out_kernel: int | None = Field(default=None, ge=1, le=15)
    dropout: float | None = Field(default=None, ge=0, le=1)
    mid_block_scale_factor: float | None = _scale()
    resnet_out_scale_factor: float | None = _scale()
    scaling_factor: float | None = _scale()
    shift_factor: float | None = Field(default=None, ge=-1000, le=1000)
    latents_mean: list[float] | None = Field(default=None, max_length=1024)
    latents_std: list[float] | None = Field(default=None, max_length=1024)
    # Names diffusers looks up (block kinds, activations, embeddings): short strings, checked by diffusers itself
    act_fn: Name | None = None
    time_embedding_type: Name | None = None
    downsample_type: Name | None = None
    upsample_type: Name | None = None
    resnet_time_scale_shift: Name | None = None
    class_embed_type: Name | None = None
    addition_embed_type: Name | None = None
    encoder_hid_dim_type: Name | None = None
    time_embedding_act_fn: Name | None = None
    timestep_post_act: Name | None = None
    cross_attention_norm: Name | None = None
    attention_type: Name | None = None
    # Flags: real booleans (a JSON "yes" is not true)
    center_input_sample: bool | None = None
    flip_sin_to_cos: bool | None = None
    add_attention: bool | None = None
    dual_cross_attention: bool | None = None
    use_linear_projection: bool | None = None
    upcast_attention: bool | None = None
    resnet_skip_time_act: bool | None = None
    class_embeddings_concat: bool | None = None
    mid_block_only_cross_attention: bool | None = None
    force_upcast: bool | None = None
    use_quant_conv: bool | None = None
    use_post_quant_conv: bool | None = None
    mid_block_add_attention: bool | None = None

    @field_validator("conv_in_kernel", "conv_out_kernel")
    @classmethod
    def _odd(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError(f"must be odd (the convolution keeps the size), got {value}")
        return value

    @model_validator(mode="after")
    def _blocks(self) -> "ModelConfig":
        """One block type per width, widths that GroupNorm can split, and resnets times transformer layers per
        level (the count of blocks diffusers would build) within bounds."""
        widths = self.block_out_channels or []
        for name in ("down_block_types", "up_block_types"):
            types = getattr(self, name)
            if widths and types is not None and len(types) != len(widths):
                raise ValueError(f"{name} must name one block per width of block_out_channels ({len(widths)}), "
                                 f"got {len(types)}")
        groups = self.norm_num_groups
        uneven = [w for w in widths if groups and w % groups]
        if uneven:
            raise ValueError(f"every width of block_out_channels must be a multiple of norm_num_groups ({groups}), "
                             f"got {widths}")
        levels = len(self.block_out_channels or [0])
        per_level = lambda value: value if isinstance(value, list) else [value or 1] * levels  # noqa: E731
        layers = per_level(self.layers_per_block)
        transformers = [max(t) if isinstance(t, list) else t for t in per_level(self.transformer_layers_per_block)]
        if any((l or 1) * (t or 1) > MAX_LAYERS_PER_BLOCK for l, t in zip(layers, transformers)):
            raise ValueError(f"layers_per_block x transformer_layers_per_block must be at most {MAX_LAYERS_PER_BLOCK} "
                             f"at each level, got {self.layers_per_block} x {self.transformer_layers_per_block}")
        return self

    def checked_class(self, allowed: tuple[str, ...], path: Path) -> str:
        if self.class_name not in allowed:
            raise Lift3dError(f"{path}: _class_name {self.class_name!r} is not a class lift3d builds; "
                              f"valid: {', '.join(allowed)}")
        return self.class_name


# Noise schedules: scheduler/scheduler_config.json of an exported model


DIFFUSERS_VERSION = r"^[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}[A-Za-z0-9.+-]{0,24}$"


class SchedulerSettings(Exact):
    """What every noise scheduler config holds: its class and the training timesteps. Only the keys the
    class's schema names are read (an unknown key is an error, not something passed on to diffusers)."""

    class_name: str = Field(alias="_class_name")
    diffusers_version: str | None = Field(default=None, alias="_diffusers_version", pattern=DIFFUSERS_VERSION)
    num_train_timesteps: int = Field(default=1000, ge=1, le=100_000)


class DDPMSchedulerConfig(SchedulerSettings):
    """A ``DDPMScheduler``'s config, as the ``ddpm`` objective exports it."""

    class_name: Literal["DDPMScheduler"] = Field(alias="_class_name")
    beta_schedule: Literal[BETA_SCHEDULES] = "linear"  # type: ignore[valid-type]
    beta_start: float = Field(default=0.0001, gt=0, lt=1)
    beta_end: float = Field(default=0.02, gt=0, lt=1)
    trained_betas: None = None
    variance_type: Literal[VARIANCE_TYPES] = "fixed_small"  # type: ignore[valid-type]
    clip_sample: bool = True
    clip_sample_range: float = Field(default=1.0, gt=0, le=1000)
    prediction_type: Literal[PREDICTION_TYPES[:3]] = "epsilon"  # type: ignore[valid-type]
    thresholding: bool = False
    dynamic_thresholding_ratio: float = Field(default=0.995, gt=0, le=1)
    sample_max_value: float = Field(default=1.0, gt=0, le=1000)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = Field(default=0, ge=0, le=1)
    rescale_betas_zero_snr: bool = False

    @field_validator("beta_end")
    @classmethod
    def _order(cls, value: float, info) -> float:
        start = info.data.get("beta_start")
        if start is not None and value < start:
            raise ValueError(f"must be >= beta_start ({start}), got {value}")
        return value


class FlowSchedulerConfig(SchedulerSettings):
    """A ``FlowMatchEulerDiscreteScheduler``'s config, as the ``flow`` objective exports it."""

    class_name: Literal["FlowMatchEulerDiscreteScheduler"] = Field(alias="_class_name")
    shift: float = Field(default=1.0, ge=MIN_SHIFT, le=100)
    use_dynamic_shifting: bool = False
    base_shift: float | None = Field(default=0.5, ge=MIN_SHIFT, le=100)
    max_shift: float | None = Field(default=1.15, ge=MIN_SHIFT, le=100)
    base_image_seq_len: int = Field(default=256, ge=1, le=2**24)
    max_image_seq_len: int = Field(default=4096, ge=1, le=2**24)
    invert_sigmas: bool = False
    shift_terminal: float | None = Field(default=None, gt=0, lt=1)
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: Literal["exponential", "linear"] = "exponential"
    stochastic_sampling: bool = False


SCHEDULER_SCHEMAS: dict[str, type[SchedulerSettings]] = {
    "DDPMScheduler": DDPMSchedulerConfig, "FlowMatchEulerDiscreteScheduler": FlowSchedulerConfig}
"""The noise schedulers an export may hold (those lift3d's objectives write), each with the keys it may hold."""


def scheduler_schema(value: Any, path: str | os.PathLike) -> type[SchedulerSettings]:
    """The schema of the scheduler config ``value`` (parsed JSON) by its ``_class_name``."""
    name = value.get("_class_name") if isinstance(value, dict) else None
    if not isinstance(name, str) or name not in SCHEDULER_SCHEMAS:
        raise Lift3dError(f"{path}: _class_name {shown(name)} is not a noise scheduler lift3d exports; valid: "
                          f"{', '.join(SCHEDULER_SCHEMAS)}")
    return SCHEDULER_SCHEMAS[name]


# Segmenter folders (lift3d.evaluation.segmentation)


SEGMENTER_FORMAT = "lift3d-segmenter"
PLUGIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class SegmenterGrid(Exact):
    """The grid a segmenter was trained on, which image files are brought onto (``lift3d.data.volume.TrainingGrid``)."""

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
    """The built-in ``tissue-unet``'s network: a 2.5D U-Net (``lift3d.evaluation.tissue_unet``)."""

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


# The reader


def read_json(path: str | os.PathLike, schema: type[Schema] | None = None, *, folder: str | os.PathLike | None = None,
              what: str = "file") -> Any:
    """Read ``path`` and check it against ``schema`` (a JSON object of any shape when None).

    ``folder``, when given, is the folder the file must stay in (symlinks resolved). Every failure
    is one ``Lift3dError`` naming the file.
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
        raise Lift3dError(f"{path}: {what} is not valid: {describe(exc, schema, value)}") from None
    except (ValueError, RecursionError) as exc:
        raise Lift3dError(f"{path}: {what} is not usable ({str(exc)[:120]})") from None
