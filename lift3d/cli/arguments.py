"""argparse types of the command-line tools: each parses one option and says what it expected."""

from __future__ import annotations

import argparse
import json
import re

import torch

NATIVE = "native"
DEVICE_TYPES = ("cpu", "cuda", "mps")


# The largest count torch sizes and indexes with a 32-bit int: a count past it cannot run anyway, and a bound
# keeps a 400-digit number from reaching code that overflows on it.
MAX_COUNT = 2**31 - 1
# torch.Generator.manual_seed takes seeds from 0 to 2**64 - 1; a larger one overflowed inside torch.
MAX_SEED = 2**64 - 1
# The training config's run.seed (lift3d.training.config) is below 2**32; the demo passes its seed there.
MAX_TRAINING_SEED = 2**32 - 1
SHOWN_CHARACTERS = 40


def shown(text: str) -> str:
    """``text`` quoted for an error message, cut short if it is long (a 400-digit number)."""
    return repr(text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS - 3] + "...")


def _whole_number(text: str) -> int | float | None:
    """``text`` as an int; +-inf for more digits than Python converts (past any bound); None if not a number."""
    try:
        return int(text, 10)
    except ValueError:
        digits = re.fullmatch(r"\s*([+-]?)[0-9]+\s*", text)
        return None if digits is None else float(f"{digits.group(1)}inf")


def integer_in(low: int, high: int, words: str):
    """An argparse type: an int from ``low`` to ``high``; ``words`` name what is expected
    (``a positive integer``), and the upper bound is added to the error when it is what was broken."""

    def parse(text: str) -> int:
        value = _whole_number(text)
        if value is None:
            raise argparse.ArgumentTypeError(f"expected {words}, got {shown(text)}")
        if value < low:
            got = value if len(text) <= SHOWN_CHARACTERS else shown(text)
            raise argparse.ArgumentTypeError(f"expected {words}, got {got}")
        if value > high:
            bound = "" if str(high) in words else f" no larger than {high}"
            raise argparse.ArgumentTypeError(f"expected {words}{bound}, got {shown(text)}")
        return value

    return parse


non_negative = integer_in(0, MAX_COUNT, "a non-negative integer")
positive = integer_in(1, MAX_COUNT, "a positive integer")
seed = integer_in(0, MAX_SEED, f"a seed from 0 to {MAX_SEED}")
training_seed = integer_in(0, MAX_TRAINING_SEED, f"a seed from 0 to {MAX_TRAINING_SEED}")


def threads(text: str) -> int | str:
    """``auto`` or a positive number of torch CPU threads."""
    value = None if text == "auto" else _whole_number(text)
    if text != "auto" and (value is None or not 1 <= value <= MAX_COUNT):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number from 1 to {MAX_COUNT}, got {shown(text)}")
    return text if value is None else int(value)


def strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {shown(text)}")
    return value


def correlation(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 (independent slices) to 1 (the same noise in "
                                         f"every slice), got {shown(text)}")
    return value


def window(text: str) -> int:
    value = _whole_number(text)
    if value is None or value < 0 or value == 1 or value > MAX_COUNT:
        bound = f" (at most {MAX_COUNT})" if value is not None and value > MAX_COUNT else ""
        raise argparse.ArgumentTypeError(f"expected 0 (always the whole volume) or a window of at least 2 slices"
                                         f"{bound}, got {shown(text)}")
    return value


def device(text: str) -> str:
    try:
        kind = torch.device(text).type
    except (RuntimeError, TypeError, ValueError):
        kind = None
    if kind not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"expected a device that can run synthesis: cpu, cuda, cuda:N or mps; "
                                         f"got {shown(text)}")
    return text


def slice_count(text: str) -> int | str:
    return NATIVE if text == NATIVE else positive(text)


def in_plane_size(text: str) -> tuple[int, int] | str:
    if text == NATIVE:
        return NATIVE
    parts = text.lower().split("x")
    try:
        if len(parts) > 2:
            raise argparse.ArgumentTypeError(text)
        h, w = positive(parts[0]), positive(parts[-1])
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected N, HxW (positive integers up to {MAX_COUNT}) or 'native', "
                                         f"got {shown(text)}") from None
    return h, w


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE``, VALUE read as JSON where it is JSON (numbers, true/false, lists), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid option {shown(text)}; give KEY=VALUE, e.g. rank=16")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
