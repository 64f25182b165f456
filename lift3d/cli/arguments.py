"""argparse types of the command-line tools: each parses one option and says what it expected."""

from __future__ import annotations

import argparse

import torch

NATIVE = "native"
DEVICE_TYPES = ("cpu", "cuda", "mps")


def integer_at_least(low: int, words: str):
    """An argparse type: an int >= ``low``, with an error that calls the bound what it is."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {words} integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a {words} integer, got {value}")
        return value

    return parse


non_negative = integer_at_least(0, "non-negative")
positive = integer_at_least(1, "positive")


def strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def correlation(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 (independent slices) to 1 (the same noise in "
                                         f"every slice), got {text!r}")
    return value


def window(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"expected 0 (always the whole volume) or a window of at least 2 slices, "
                                         f"got {text!r}")
    return value


def device(text: str) -> str:
    try:
        kind = torch.device(text).type
    except (RuntimeError, TypeError, ValueError):
        kind = None
    if kind not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"expected a device that can run synthesis: cpu, cuda, cuda:N or mps; "
                                         f"got {text!r}")
    return text


def slice_count(text: str) -> int | str:
    return NATIVE if text == NATIVE else positive(text)


def in_plane_size(text: str) -> tuple[int, int] | str:
    if text == NATIVE:
        return NATIVE
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected N, HxW or 'native', got {text!r}")
    h, w = (int(parts[0]), int(parts[-1]))
    return h, w
