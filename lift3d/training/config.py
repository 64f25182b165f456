"""A run's training configuration: the sections every stage shares (``lift3d.training.sections``) plus each
registered stage's own (``lift3d.training.stages``), read from a TOML file (``tomllib``) with CLI overrides.

Every field carries its own help text, so ``lift3d-finetune --help`` explains every option.
Precedence: defaults < ``--config file.toml`` < ``--section.field value`` on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from lift3d.plugins.registry import PluginError
from lift3d.training.options import ConfigError, check_section, coerce, show_value
from lift3d.training.sections import SHARED, SharedSections, unet2d_arguments
from lift3d.training.stages import STAGES, Stage, get_stage, stages

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigError", "TrainConfig", "add_arguments", "apply", "from_args", "load_toml", "refuse_ignored",
           "show_value", "stage_of", "unet2d_arguments", "validate"]


def stage_sections() -> dict[str, type]:
    """Each registered stage's own section, name -> dataclass. Two stages may share a section (the same
    dataclass); any other clash of names is refused."""
    found: dict[str, type] = {}
    for stage in stages():
        if stage.section is None:
            continue
        if stage.options is None or stage.section in SHARED or found.get(stage.section, stage.options) is not stage.options:
            raise PluginError(f"stage {stage.name!r} declares section [{stage.section}] with options "
                              f"{stage.options!r}; a stage's section needs a dataclass of its own options and a name "
                              f"that no shared section ({', '.join(SHARED)}) or other stage's section has")
        found[stage.section] = stage.options
    return found


@dataclass(eq=False)
class TrainConfig(SharedSections):
    """A run's options: the shared sections (``cfg.run``, ``cfg.model``...) and, as attributes of their own
    name, the section of every registered stage (``cfg.vae``, ``cfg.lift``, ``cfg.segmenter``...)."""

    def __post_init__(self) -> None:
        for name, options in stage_sections().items():
            setattr(self, name, options())

    def __getattr__(self, name: str) -> Any:  # only reached for a name that is no attribute
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"a TrainConfig has no section {name!r}; sections: {', '.join(self.sections())}")

    def sections(self) -> dict[str, Any]:
        """Section name -> its options: the shared ones, then the stages' own."""
        return {**{name: getattr(self, name) for name in SHARED},
                **{name: vars(self)[name] for name in stage_sections() if name in vars(self)}}

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(obj) for name, obj in self.sections().items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainConfig) and self.to_dict() == other.to_dict()


def stage_of(cfg: TrainConfig) -> Stage:
    """The stage ``run.stage`` names; an unregistered name is refused with the registered ones."""
    name = cfg.run.stage
    if name not in STAGES:
        raise ConfigError(f"run.stage = {show_value(name)} is not allowed; choose one of: {', '.join(STAGES.names())}")
    return get_stage(name)


def apply(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """Set ``{section: {field: value}}`` on ``cfg``, rejecting unknown names with the valid ones."""
    sections = cfg.sections()
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
            setattr(obj, name, coerce(section, name, value, hints[name], fields[name].metadata))
    stage_of(cfg)
    return cfg


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every option of a config built in Python (``apply`` checks what it sets) and how the options
    fit together, the stage's own checks included. The memory the configured models need is
    ``lift3d.training.memory.check_memory``; options the stage ignores are ``refuse_ignored``."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"a training config must be a lift3d.training.config.TrainConfig, got {type(cfg).__name__}")
    for section, obj in cfg.sections().items():
        check_section(section, obj)
    if cfg.diffusion.beta_start >= cfg.diffusion.beta_end:
        raise ConfigError(f"diffusion.beta_start = {cfg.diffusion.beta_start} must be below diffusion.beta_end = "
                          f"{cfg.diffusion.beta_end}")
    stage_of(cfg).check(cfg)
    return cfg


def refuse_ignored(cfg: TrainConfig) -> None:
    """Refuse an option that the run's stage does not use, set to a value other than its default: one line
    naming the option and the stage. An option silently ignored looks as if it had worked."""
    stage = stage_of(cfg)
    owners = {name: [s.name for s in stages() if s.section == name] for name in stage_sections()}
    for section, obj in cfg.sections().items():
        unread = section not in stage.reads and section != stage.section
        default = type(obj)()
        for f in dataclasses.fields(obj):
            where, value = f"{section}.{f.name}", getattr(obj, f.name)
            if (unread or where in stage.ignores) and value != getattr(default, f.name):
                whose = f" (an option of stage {', '.join(map(repr, owners[section]))})" if owners.get(section) else ""
                raise ConfigError(f"{where} = {show_value(value)} is not used by stage {stage.name!r}{whose}; "
                                  f"leave it at its default ({show_value(getattr(default, f.name))}) in this stage")


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
    sections = TrainConfig().sections()
    parser.add_argument("--config", metavar="FILE.toml", action=_ReadOnce,
                        help=f"TOML file with {', '.join(f'[{s}]' for s in sections)} tables; command-line options "
                             "override it (give it once)")
    for section, obj in sections.items():
        group = parser.add_argument_group(f"[{section}]")
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            choices, rule = f.metadata.get("choices"), f.metadata.get("rule")
            if (section, f.name) == ("run", "stage"):  # the one option whose choices are a registry
                choices, rule = None, "; ".join(f"{s.name!r} = {s.summary}" for s in stages())
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
