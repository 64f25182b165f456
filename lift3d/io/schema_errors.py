"""A schema's refusal told in lift3d's words: the key, what it must be, and what the file holds.

pydantic describes a failure as ``Input should be greater than or equal to 0``, once per branch of a
union and with the branch's type name in the location. Here each bad key gets one phrase (``step must be
>= 0, got -5``; ``beta_schedule must be one of 'linear', 'scaled_linear', got 'evil'``; ``code is not a key
lift3d reads here; valid keys: ...``), so a user reads what would be valid, not the library's phrasing.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ValidationError

MAX_SHOWN = 3
_KINDS = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
          "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
          "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
          "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
          "none_required": "null", "finite_number": "a finite number"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def shown(value: Any) -> str:
    """A short form of a value read from a file (a list or an object by its kind: it may be long)."""
    if isinstance(value, (dict, list)):
        return f"a {'list' if isinstance(value, list) else 'JSON object'} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _place(loc: tuple, value: Any, kind: str) -> tuple[str, ...]:
    """The keys of ``loc`` that name a place in ``value``; the rest are pydantic's union branch names
    (a missing key, the last of ``loc``, names a place that ``value`` lacks)."""
    keys: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(value, dict) and isinstance(part, str) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif not (kind == "missing" and i == len(loc) - 1):
            continue
        keys.append(str(part))
    return tuple(keys)


def _where(keys: tuple[str, ...]) -> str:
    text = ""
    for key in keys:
        text += f"[{key}]" if key.isdigit() else (f".{key}" if text else key)
    return text or "the file"


def _model_at(schema: type[BaseModel], keys: tuple[str, ...]) -> type[BaseModel] | None:
    """The schema of the object at ``keys`` (for the list of its valid keys), where a plain walk finds it."""
    for key in keys:
        fields = {f.alias or name: f for name, f in schema.model_fields.items()}
        if key not in fields:
            return None
        kinds = [fields[key].annotation, *get_args(fields[key].annotation)]
        found = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if not found:
            return None
        schema = found[0]
    return schema


def _unknown(schema: type[BaseModel], parent: tuple[str, ...], names: list[str]) -> str:
    """Keys of the object at ``parent`` that its schema does not name, and the keys it does."""
    where = f" in {_where(parent)}" if parent else ""
    names = sorted(names)
    listed = ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")
    text = f"{listed} {'is not a key' if len(names) == 1 else 'are not keys'} lift3d reads{where}"
    model = _model_at(schema, parent)
    if model is not None:
        valid = sorted(f.alias or name for name, f in model.model_fields.items())
        text += "; valid keys: " + ", ".join(valid[:24]) + (", ..." if len(valid) > 24 else "")
    return text


def _phrase(error: dict[str, Any], schema: type[BaseModel], keys: tuple[str, ...]) -> str:
    """What one pydantic error asks of the value, in lift3d's words."""
    kind, ctx, got = error["type"], error.get("ctx") or {}, shown(error.get("input"))
    if kind == "missing":
        return "is required but missing"
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}, got {got}"
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        bound = ctx.get(name)
        return f"must be {sign} {format(bound, 'g') if isinstance(bound, float) else bound}, got {got}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got}"
    if kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"must hold {'at least' if kind == 'too_short' else 'at most'} {bound} items, got {ctx.get('actual_length')}"
    if kind in ("string_too_short", "string_too_long"):
        bound = ctx.get("min_length") if kind == "string_too_short" else ctx.get("max_length")
        return f"must be {'at least' if kind == 'string_too_short' else 'at most'} {bound} characters long, got {got}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}, got {got}"
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error") or error["msg"])
        return message if message.startswith(("must", "is ", "holds")) else f"is not valid: {message}"
    return f"is not valid ({error['msg'].rstrip('.').lower()}), got {got}"


def describe(exc: ValidationError, schema: type[BaseModel], value: Any) -> str:
    """One line for every key of ``value`` that ``schema`` refused (the first few), in lift3d's words.

    A key refused by every branch of a union (``int | list[int]``) is told once: by the branch whose
    type matched the value (``must be <= 64, got 100000``), else by the kinds it may be.
    """
    by_place: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    extra: dict[tuple[str, ...], list[str]] = {}
    for error in exc.errors(include_url=False):
        keys = _place(error["loc"], value, error["type"])
        if error["type"] == "extra_forbidden" and keys:  # told once per object, with its valid keys
            extra.setdefault(keys[:-1], []).append(keys[-1])
        else:
            by_place.setdefault(keys, []).append(error)
    parts = [_unknown(schema, parent, names) for parent, names in extra.items()]
    for keys, errors in by_place.items():
        if all(e["type"] in _KINDS for e in errors) and any(k[:len(keys)] == keys and k != keys for k in by_place):
            continue  # the union's branch of another kind: the value's own kind is told at the deeper place
        if not keys and errors[0]["type"] == "value_error":  # a check of the whole file says what it checked
            parts.append(_phrase(errors[0], schema, keys).removeprefix("is not valid: "))
            continue
        specific = [e for e in errors if e["type"] not in _KINDS or e["type"] == "finite_number"]
        if specific:
            phrase = _phrase(specific[0], schema, keys)
        else:
            kinds = list(dict.fromkeys(_KINDS[e["type"]] for e in errors))
            phrase = f"must be {' or '.join(kinds)}, got {shown(errors[0].get('input'))}"
        parts.append(f"{_where(keys)} {phrase}")
    more = f"; and {len(parts) - MAX_SHOWN} more" if len(parts) > MAX_SHOWN else ""
    return "; ".join(parts[:MAX_SHOWN]) + more
