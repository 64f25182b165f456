"""Training configuration: dataclasses read from a TOML file (``tomllib``), with CLI overrides.

Every field carries its own help text, so ``lift3d-finetune --help`` explains every option.
Precedence: defaults < ``--config file.toml`` < ``--section.field value`` on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from lift3d.io.errors import Lift3dError
from lift3d.lifting.placement import PRESETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Rule:
    """A constraint on one option's value, checked wherever a config is built (TOML, CLI, Python)."""

    def __init__(self, holds, text: str) -> None:
        self.holds, self.text = holds, text

    def __str__(self) -> str:
        return self.text


def at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda v: v > low, f"> {low}")


def between(low: float, high: float) -> Rule:
    return Rule(lambda v: low <= v < high, f"in [{low}, {high})")


def from_to(low: int, high: int) -> Rule:
    return Rule(lambda v: low <= v <= high, f"from {low} to {high}")


ODD = Rule(lambda v: v >= 1 and v % 2 == 1, "an odd number >= 1")
PATH = Rule(lambda v: bool(v.strip()) and "\0" not in v, "a path (not empty)")
OPTIONAL_PATH = Rule(lambda v: (v == "" or bool(v.strip())) and "\0" not in v, "a path, or empty for none")
NAME = Rule(lambda v: bool(v.strip()), "a name (not empty)")

# diffusers' UNet2DModel gives its mid-block attention width // 8 heads: a last width under 8 has none.
ATTENTION_HEAD_DIM = 8
MAX_LEVELS, MAX_LAYERS_PER_BLOCK = 16, 64
# The noise schedules lift3d reads back (lift3d.io.schemas) hold at most this many steps.
MAX_TRAIN_TIMESTEPS = 100_000
# Every sampler lift3d builds from the exported schedule (DDPM, DDIM, DPM-Solver++) implements these.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def widths(rule_text: str = "") -> Rule:
    return Rule(lambda v: 1 <= len(v) <= MAX_LEVELS and all(c >= 1 for c in v),
                f"a list of 1 to {MAX_LEVELS} positive widths{rule_text}")


def opt(default: Any, help: str, choices: tuple | None = None, rule: Rule | None = None, **kwargs: Any) -> Any:
    metadata = {"help": help, "choices": choices, "rule": rule}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=metadata)
    return field(default=default, metadata=metadata, **kwargs)


STAGES = ("autoencoder", "slices", "volumes", "segmenter")


@dataclass
class RunConfig:
    stage: str = opt("volumes", "'autoencoder' = train the KL autoencoder the latent stages run in ([vae]); "
                     "'slices' = stage 1 (2D latent diffusion, t per slice); "
                     "'volumes' = stage 2 (inflate, then fine-tune on volumes, t per volume); "
                     "'segmenter' = the tissue segmenter that scores synthesis ([segmenter])", STAGES)
    output_dir: str = opt("runs/lift3d", "folder for checkpoints, logs and the exported model", rule=PATH)
    seed: int = opt(0, "seed for weights, data order, noise and timesteps", rule=between(0, 2**32))
    max_steps: int = opt(200, "optimizer steps to train", rule=at_least(1))
    checkpoint_every: int = opt(100, "save the full training state every K optimizer steps (0 = never)",
                               rule=at_least(0))
    checkpoints_keep: int = opt(2, "keep the last M training-state checkpoints", rule=at_least(1))
    resume: str = opt("", "'latest' to continue from the newest checkpoint in output_dir, or a checkpoint folder",
                      rule=OPTIONAL_PATH)
    overwrite: bool = opt(False, "delete another run's checkpoints and exported model found in output_dir and start "
                          "afresh (without it such a folder is refused)")
    log_every: int = opt(10, "log loss, learning rate and steps/s every K steps", rule=at_least(1))
    validate_every: int = opt(0, "stages 1 and 2: every K steps, sample the dataset's validation volumes with "
                              "DPM-Solver++ and log PSNR/SSIM/MAE/z-inconsistency; the step with the best "
                              "validation PSNR is exported (0 = off: the last step is exported)", rule=at_least(0))
    validate_steps: int = opt(10, "DPM-Solver++ steps of the sampled validation", rule=at_least(1))
    threads: int = opt(0, "torch CPU threads (0 = torch's default); 1 on a busy shared CPU, where more threads "
                       "than free cores make every step many times slower", rule=from_to(0, 1024))
    tracker: str = opt("csv", "Accelerate tracker for the logs", ("csv", "tensorboard", "none"))


@dataclass
class DataConfig:
    dataset: str = opt("phantom", "dataset plugin name (see `lift3d plugins`)", rule=NAME)
    options: dict = opt({}, "options passed to the dataset plugin, e.g. {root = 'data', size = 64}")
    batch_size: int = opt(4, "per process: slices per batch in stage 1, volumes (or windows) per batch in stage 2",
                         rule=at_least(1))
    window: int = opt(0, "stage 2: train on windows of this many consecutive slices (0 = whole volumes)",
                      rule=at_least(0))
    num_workers: int = opt(0, "DataLoader worker processes", rule=from_to(0, 1024))
    val_volumes: int = opt(2, "sampled validation (run.validate_every): the first N volumes of the dataset's "
                           "'val' split", rule=at_least(1))


@dataclass
class ModelConfig:
    pretrained: str = opt("", "local folder to start from: a diffusers 2D U-Net folder (stage 1 or 2) or a "
                          "stage-1 output (stage 2); empty = a new UNet2DModel from the fields below", rule=OPTIONAL_PATH)
    block_out_channels: list[int] = opt([32, 64], "UNet2DModel widths, when built from config; each a multiple of "
                                        "norm_num_groups, the last >= 8", rule=widths())
    layers_per_block: int = opt(1, "UNet2DModel resnets per block, when built from config",
                                rule=from_to(1, MAX_LAYERS_PER_BLOCK))
    attention: bool = opt(False, "use attention blocks at the lowest resolution, when built from config")
    norm_num_groups: int = opt(8, "GroupNorm groups, when built from config", rule=at_least(1))
    conditioning: str = opt("concat", "'concat': the source latent is concatenated on channels (cross-modality); "
                            "'none': plain volume generation", ("concat", "none"))
    prediction_type: str = opt("epsilon", "what the U-Net predicts (the paper: epsilon, eq. 4)",
                               ("epsilon", "v_prediction"))
    source_context: int = opt(0, "2.5D source context: the U-Net also sees the source's N neighbouring slices on "
                              "each side as channels (1 = slices k-1, k, k+1; the edge slice repeats at the borders). "
                              "Set it in stage 1; stage 2 inherits it from model.pretrained", rule=at_least(0))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")


@dataclass
class LiftConfig:
    kind: str = opt("", "kind of volumetric layer (lift3d.layers.registry; e.g. full, low-rank, depthwise, "
                    "slice-attention); empty = lift3d.lifting.inflate's default")
    options: dict = opt({}, "options of the layer kind, e.g. {rank = 16} for low-rank or {heads = 4}")
    kernel_size: int = opt(3, "odd kernel size of the volumetric 1D convs", rule=ODD)
    where: str = opt("auto", "placement of the volumetric layers: auto = resnet where the model has residual "
                     "blocks, else every spatial conv (lift3d.lifting.placement.PRESETS)", tuple(PRESETS))
    recompute: bool = opt(False, "recompute the volumetric layers' inputs in backward instead of keeping them "
                          "(less training memory)")
    padding_mode: str = opt("zeros", "border handling along the slice axis", ("zeros", "replicate"))
    trainable: str = opt("volumetric", "stage 2: train the volumetric layers only, or everything",
                         ("volumetric", "all"))


@dataclass
class AutoencoderConfig:
    name: str = opt("identity", "autoencoder plugin: 'kl' (latent diffusion, paper f=4) or 'identity' (pixel space)",
                    rule=NAME)
    options: dict = opt({}, "options for the autoencoder plugin, e.g. {path = 'vae-folder'}")
    cache_latents: bool = opt(False, "encode each item once and keep its latents in memory")


@dataclass
class VaeConfig:
    block_out_channels: list[int] = opt([64, 128, 128], "autoencoder stage: AutoencoderKL widths of a new autoencoder; "
                                   "f = 2 ** (levels - 1), so three levels give the paper's f = 4", rule=widths())
    latent_channels: int = opt(4, "autoencoder stage: latent channels", rule=at_least(1))
    layers_per_block: int = opt(1, "autoencoder stage: resnets per level", rule=from_to(1, MAX_LAYERS_PER_BLOCK))
    norm_num_groups: int = opt(32, "autoencoder stage: GroupNorm groups (must divide every width)", rule=at_least(1))
    kl_weight: float = opt(1e-6, "autoencoder stage: weight of the KL term (per pixel)", rule=at_least(0))
    ssim_weight: float = opt(0.2, "autoencoder stage: weight of the structural term 1 - SSIM", rule=at_least(0))
    adversarial_weight: float = opt(0.0, "autoencoder stage: weight of the patch-discriminator term, scaled by the "
                                    "adaptive gradient-norm ratio (0 = no discriminator)", rule=at_least(0))
    adversarial_start: int = opt(0, "autoencoder stage: step at which the discriminator switches on",
                                 rule=at_least(0))
    discriminator_width: int = opt(32, "autoencoder stage: channels of the discriminator's first layer",
                                   rule=at_least(8))
    scale_batches: int = opt(32, "autoencoder stage: training batches whose latents set scaling_factor and "
                             "shift_factor at export", rule=at_least(1))


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = opt(1000, "diffusion steps T", rule=from_to(1, MAX_TRAIN_TIMESTEPS))
    beta_schedule: str = opt("scaled_linear", "diffusers beta schedule (LDM: scaled_linear 0.0015..0.0195)",
                             BETA_SCHEDULES)
    beta_start: float = opt(0.0015, "first beta (LDM)", rule=between(0, 1))
    beta_end: float = opt(0.0195, "last beta (LDM)", rule=between(0, 1))
    objective: str = opt("", "training objective plugin: 'ddpm' (the paper's; model.prediction_type says epsilon or v) "
                         "or 'flow' (flow matching: few-step sampling); empty = 'ddpm', or in stage 2 the "
                         "objective of model.pretrained, which stage 2 inherits")
    objective_options: dict = opt({}, "options of the objective, e.g. {train_steps = 4}: train only on the timesteps "
                                  "a 4-step sampler visits (step-count-matched training, as in Fast-DDPM); "
                                  "{shift = 3.0} for flow")
    timestep_sampler: str = opt("", "timestep sampler plugin; empty = 'uniform-slice' in stage 1, "
                                "'make-a-volume' (weight 2T - t, one t per volume) in stage 2")


@dataclass
class SegmenterConfig:
    block_out_channels: list[int] = opt([16, 32, 64], "segmenter stage: widths of the tissue U-Net, one level each "
                                        "(the slice is halved between levels)",
                                        rule=Rule(lambda v: 1 <= len(v) <= 6 and all(1 <= c <= 1024 for c in v),
                                                  "a list of 1 to 6 widths from 1 to 1024"))
    context: int = opt(1, "segmenter stage: the U-Net also sees this many neighbouring slices on each side",
                       rule=from_to(0, 16))
    dice_weight: float = opt(1.0, "segmenter stage: weight of the soft Dice term added to the cross-entropy with the "
                             "tissue probabilities", rule=at_least(0))


@dataclass
class OptimConfig:
    learning_rate: float = opt(1e-4, "AdamW learning rate", rule=above(0))
    weight_decay: float = opt(0.0, "AdamW weight decay", rule=at_least(0))
    lr_scheduler: str = opt("constant_with_warmup", "diffusers learning-rate schedule",
                            ("constant", "constant_with_warmup", "linear", "cosine"))
    warmup_steps: int = opt(0, "learning-rate warm-up steps", rule=at_least(0))
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", rule=at_least(1))
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", rule=at_least(0))
    mixed_precision: str = opt("no", "Accelerate mixed precision", ("no", "fp16", "bf16"))
    ema: bool = opt(False, "keep an exponential moving average of the trained weights (exported if on)")
    ema_decay: float = opt(0.999, "EMA decay", rule=between(0, 1))


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lift: LiftConfig = field(default_factory=LiftConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(Lift3dError):
    """A config file or override names an unknown option or a bad value."""


def _sections(cfg: TrainConfig):
    for sec in dataclasses.fields(cfg):
        yield sec.name, getattr(cfg, sec.name)


def show_value(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _parse_inline(text: str) -> Any:
    """A dict or list from the command line, as JSON or as a TOML inline table/array."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return tomllib.loads(f"v = {text}")["v"]


# Only a str is a str, and a bool is not a number (though Python's bool is an int).
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _kind_name(kind: Any) -> str:
    if get_origin(kind) is list:
        return f"list of {get_args(kind)[0].__name__}s"
    return kind.__name__


def _of_kind(value: Any, kind: Any) -> bool:
    origin = get_origin(kind) or kind
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return _is_int(value)
    if origin is float:
        return _is_number(value)
    if origin is str:
        return isinstance(value, str)
    if origin is list:
        item = get_args(kind)[0] if get_args(kind) else None
        return isinstance(value, (list, tuple)) and (item is None or all(_of_kind(v, item) for v in value))
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return isinstance(value, origin)  # pragma: no cover - every option has one of the kinds above


MAX_NESTING = 32


def _not_finite(where: str, value: Any, depth: int = 0) -> str | None:
    """Where in ``value`` a NaN or an infinity is (``where`` itself, or ``where['key'][0]``...), or None."""
    if depth > MAX_NESTING:
        raise ConfigError(f"{where} is nested more than {MAX_NESTING} levels deep")
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):  # numpy's too; bool is Integral
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _not_finite(f"{where}[{key!r}]", item, depth + 1)
        if found is not None:
            return found
    return None


def _check(where: str, value: Any, choices: tuple | None, rule: Rule | None, kind: Any = None) -> Any:
    """Refuse a value of the wrong kind, a NaN or infinity anywhere in it, or one outside its choices or rule."""
    if kind is not None and not _of_kind(value, kind):
        raise ConfigError(f"{where} = {show_value(value)} is not a valid {_kind_name(kind)}")
    bad = _not_finite(where, value)
    if bad is not None:
        raise ConfigError(f"{where} = {show_value(value)} is not allowed; {bad} must be a finite number")
    if choices and value not in choices:
        raise ConfigError(f"{where} = {show_value(value)} is not allowed; choose one of: {', '.join(map(str, choices))}")
    if rule is not None and not rule.holds(value):
        raise ConfigError(f"{where} = {show_value(value)} is not allowed; it must be {rule}")
    return value


def _convert(value: Any, kind: Any) -> Any:
    """A command-line string (or a TOML int given for a float) as ``kind``; anything else is left to :func:`_check`."""
    origin = get_origin(kind) or kind
    if isinstance(value, str) and origin is not str:
        if origin is bool:
            if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.strip().lower() in ("true", "1", "yes")
        if origin in (dict, list):
            return _parse_inline(value)
        return origin(value.strip())  # int("1.5") and float("x") raise ValueError
    if origin is float and _is_number(value):
        return float(value)  # a huge int raises OverflowError
    if origin is int and _is_int(value):
        return int(value)
    if origin is list and isinstance(value, tuple):
        return list(value)
    return value


def _coerce(section: str, name: str, value: Any, kind: Any, metadata) -> Any:
    where = f"{section}.{name}"
    try:
        value = _convert(value, kind)
    except (ValueError, TypeError, OverflowError, RecursionError, tomllib.TOMLDecodeError):
        raise ConfigError(f"{where} = {show_value(value)} is not a valid {_kind_name(kind)}") from None
    return _check(where, value, metadata.get("choices"), metadata.get("rule"), kind)


def apply(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """Set ``{section: {field: value}}`` on ``cfg``, rejecting unknown names with the valid ones."""
    sections = dict(_sections(cfg))
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: must be a table of [section] tables, got {type(values).__name__}")
    for section, entries in values.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section [{section}]; available: {', '.join(sections)}")
        if not isinstance(entries, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of options")
        obj = sections[section]
        hints = get_type_hints(type(obj))
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for name, value in entries.items():
            if name not in fields:
                raise ConfigError(f"{source}: unknown option {section}.{name}; available: {', '.join(fields)}")
            setattr(obj, name, _coerce(section, name, value, hints[name], fields[name].metadata))
    return cfg


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every option of a config built in Python (``apply`` checks what it sets) and how the options
    fit together. The memory the configured models need is :func:`lift3d.training.memory.check_memory`."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"a training config must be a lift3d.training.config.TrainConfig, got {type(cfg).__name__}")
    for section, obj in _sections(cfg):
        hints = get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            _check(f"{section}.{f.name}", getattr(obj, f.name), f.metadata.get("choices"), f.metadata.get("rule"),
                   hints[f.name])
    if cfg.diffusion.beta_start >= cfg.diffusion.beta_end:
        raise ConfigError(f"diffusion.beta_start = {cfg.diffusion.beta_start} must be below diffusion.beta_end = "
                          f"{cfg.diffusion.beta_end}")
    if cfg.run.validate_every and cfg.run.validate_steps > cfg.diffusion.num_train_timesteps:
        raise ConfigError(f"run.validate_steps = {cfg.run.validate_steps} is more than diffusion.num_train_timesteps "
                          f"= {cfg.diffusion.num_train_timesteps}; a sampler takes at most one step per training step")
    if cfg.run.stage == "autoencoder":
        _check_groups("vae", cfg.vae.block_out_channels, cfg.vae.norm_num_groups)
    elif not cfg.model.pretrained and cfg.run.stage != "segmenter":
        _check_groups("model", cfg.model.block_out_channels, cfg.model.norm_num_groups)
        if cfg.model.block_out_channels[-1] < ATTENTION_HEAD_DIM:
            raise ConfigError(f"model.block_out_channels = {show_value(cfg.model.block_out_channels)} is not allowed; the "
                              f"last width must be >= {ATTENTION_HEAD_DIM} (diffusers' UNet2DModel gives its mid-block "
                              f"attention width // {ATTENTION_HEAD_DIM} heads)")
    return cfg


def _check_groups(section: str, widths_: list[int], groups: int) -> None:
    bad = [c for c in widths_ if c % groups]
    if bad:
        raise ConfigError(f"{section}.block_out_channels = {show_value(widths_)} is not allowed with {section}.norm_num_groups "
                          f"= {groups}: GroupNorm needs every width to be a multiple of it, and "
                          f"{', '.join(map(str, bad[:5]))} {'is' if len(bad) == 1 else 'are'} not")


def unet2d_arguments(model: ModelConfig, in_channels: int, out_channels: int, sample_size: int | None = None) -> dict:
    """The ``UNet2DModel`` keyword arguments of a U-Net built from ``[model]`` (not from ``pretrained``)."""
    levels = len(model.block_out_channels)
    down, up = ["DownBlock2D"] * levels, ["UpBlock2D"] * levels
    if model.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return dict(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                block_out_channels=tuple(int(c) for c in model.block_out_channels),
                layers_per_block=model.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                norm_num_groups=model.norm_num_groups)


def load_toml(path: str | Path) -> dict[str, Any]:
    if not str(path).strip():
        raise ConfigError("--config is empty; give a TOML file")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {size} bytes; a lift3d config is at most {MAX_CONFIG_BYTES}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); a config is a TOML file") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


MAX_CONFIG_BYTES = 2**20


class _ReadOnce(argparse.Action):
    """``--config`` given twice is refused: the second file would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        previous = getattr(namespace, self.dest, None)
        if previous is not None:
            raise ConfigError(f"--config is given twice ({previous} and {values}); lift3d reads one config file: "
                              "merge them, or override single options with --section.field")
        setattr(namespace, self.dest, values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--section.field`` option per config field, grouped by section, with its help text."""
    parser.add_argument("--config", metavar="FILE.toml", action=_ReadOnce,
                        help="TOML file with [run], [data], [model], [lift], [autoencoder], [vae], [diffusion], "
                             "[segmenter] and [optim] tables; command-line options override it (give it once)")
    for section, obj in _sections(TrainConfig()):
        group = parser.add_argument_group(f"[{section}]")
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            choices, rule = f.metadata.get("choices"), f.metadata.get("rule")
            shown = json.dumps(default) if isinstance(default, (dict, list)) else repr(default)
            allowed = f"; one of {', '.join(map(str, choices))}" if choices else (f"; {rule}" if rule else "")
            help_text = f.metadata["help"] + f" (default: {shown}{allowed})"
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", metavar="VALUE",
                               default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))


def from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    cfg = base or TrainConfig()
    if getattr(args, "config", None) is not None:
        apply(cfg, load_toml(args.config), str(args.config))
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    return apply(cfg, overrides, "command line")
