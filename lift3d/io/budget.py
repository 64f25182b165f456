"""Sizes implied by a header or a config, checked against a memory budget before anything is allocated.

A NIfTI header of 32767^3 voxels or a U-Net of widths ``[65536, 65536]`` must be refused with one
line giving the size and the limit, not by the kernel's OOM killer. The budget is the memory
available now (``MemAvailable``), or ``LIFT3D_MEMORY_BUDGET`` (bytes, or with a unit: ``512MiB``,
``8GB``) where it is set.
"""

from __future__ import annotations

import math
import os
import re
from decimal import Decimal

from lift3d.io.errors import BudgetError, Lift3dError

ENV = "LIFT3D_MEMORY_BUDGET"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


MAX_BUDGET = 2**63 - 1  # 8 EiB: more than any machine has, and what the sizes compared with it stay within
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """``"512MiB"`` -> 536870912; plain digits are bytes. The number is read exactly (no float), and a
    size past ``MAX_BUDGET`` is refused, so no string of digits overflows."""
    text = str(text)
    shown = repr(text) if len(text) <= 40 else repr(text[:37] + "...")
    match = _SIZE.fullmatch(text) if len(text) <= 64 else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise Lift3dError(f"{ENV}={shown} is not a size; use bytes or a unit: "
                          f"{', '.join(u for u in _UNITS if u)} (e.g. 8GiB), at most 64 characters")
    size = Decimal(match.group(1)) * _UNITS[unit]
    if size > MAX_BUDGET:
        raise Lift3dError(f"{ENV}={shown} is more than lift3d can count; use a size of at most {MAX_BUDGET} "
                          "bytes (8 EiB)")
    return int(size)


def _available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30  # no way to ask: a workstation's worth


def memory_budget() -> int:
    """Bytes lift3d may allocate for one thing: ``LIFT3D_MEMORY_BUDGET``, else the memory available now."""
    text = os.environ.get(ENV)
    return parse_size(text) if text else _available()


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"  # pragma: no cover


def check_bytes(nbytes: float, what: str, *, copies: float = 1.0) -> None:
    """Refuse ``what`` when ``nbytes`` (times ``copies`` working copies) exceeds the budget.

    ``what`` names the thing and where its size came from, e.g.
    ``"a.nii.gz: its header's 2000 x 2000 x 1000 float32 voxels"``.
    """
    need = float(nbytes) * copies
    limit = memory_budget()
    if not math.isfinite(need) or need > limit:
        source = f"{ENV}" if os.environ.get(ENV) else f"the memory available now; set {ENV} to change it"
        raise BudgetError(f"{what} need {human(need)}, more than the {human(limit)} lift3d may use ({source})")


def check_count(count: float, bytes_per_item: int, what: str, *, copies: float = 1.0) -> None:
    """``check_bytes`` for ``count`` items of ``bytes_per_item`` bytes each."""
    check_bytes(float(count) * bytes_per_item, what, copies=copies)
