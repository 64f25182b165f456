"""How one training option is declared and checked: ``opt`` gives a dataclass field its help text, its
choices and its ``Rule``; ``coerce`` turns a TOML or command-line value into a checked one.

The sections built from these fields are ``lift3d.training.sections`` (shared by every stage) and each
stage's own (``lift3d.training.stages``); ``lift3d.training.config`` puts them together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
from dataclasses import field
from typing import Any, get_args, get_origin, get_type_hints

from lift3d.io.errors import Lift3dError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(Lift3dError):
    """A config file or override names an unknown option or a bad value."""


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

MAX_LEVELS, MAX_LAYERS_PER_BLOCK = 16, 64


def widths(rule_text: str = "") -> Rule:
    return Rule(lambda v: 1 <= len(v) <= MAX_LEVELS and all(c >= 1 for c in v),
                f"a list of 1 to {MAX_LEVELS} positive widths{rule_text}")


def opt(default: Any, help: str, choices: tuple | None = None, rule: Rule | None = None, **kwargs: Any) -> Any:
    """A dataclass field that carries its help text, and the choices or rule its value must meet."""
    metadata = {"help": help, "choices": choices, "rule": rule}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=metadata)
    return field(default=default, metadata=metadata, **kwargs)


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


def check_value(where: str, value: Any, choices: tuple | None, rule: Rule | None, kind: Any = None) -> Any:
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
    """A command-line string (or a TOML int given for a float) as ``kind``; anything else is left to
    ``check_value``."""
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


def coerce(section: str, name: str, value: Any, kind: Any, metadata) -> Any:
    """``value`` for the option ``section.name`` of type ``kind``, converted from text if need be, and checked."""
    where = f"{section}.{name}"
    try:
        value = _convert(value, kind)
    except (ValueError, TypeError, OverflowError, RecursionError, tomllib.TOMLDecodeError):
        raise ConfigError(f"{where} = {show_value(value)} is not a valid {_kind_name(kind)}") from None
    return check_value(where, value, metadata.get("choices"), metadata.get("rule"), kind)


def check_section(section: str, obj: Any) -> None:
    """Check every option of one section (a dataclass of ``opt`` fields), e.g. one built in Python."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        check_value(f"{section}.{f.name}", getattr(obj, f.name), f.metadata.get("choices"), f.metadata.get("rule"),
                    hints[f.name])


def check_groups(section: str, widths_: list[int], groups: int) -> None:
    """GroupNorm needs every width of ``section.block_out_channels`` to be a multiple of ``section.norm_num_groups``."""
    bad = [c for c in widths_ if c % groups]
    if bad:
        raise ConfigError(f"{section}.block_out_channels = {show_value(widths_)} is not allowed with "
                          f"{section}.norm_num_groups = {groups}: GroupNorm needs every width to be a multiple of it, "
                          f"and {', '.join(map(str, bad[:5]))} {'is' if len(bad) == 1 else 'are'} not")
